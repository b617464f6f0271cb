# -*- test-case-name: tests.test_evaluation -*-
"""
The evaluation's client: C{python -m miniproxy.evaluation.client}, run in
the client's namespace, reads a plan (JSON) on its standard input, runs
it, and writes one JSON object per flow on its standard output, one a
line, as each flow ends.

Two kinds of plan:

  - C{{"flows": [FLOW, ...], "request": 100, "timeout": 10, "gap": 0.1}}:
    flows one after the other, C{gap} seconds apart (from the end of one
    to the start of the next; default 0).  Each C{FLOW} is C{{"host": H, "port": P, "size": N,
    "fastOpen": false, "tag": ANYTHING}}: connect (with
    C{TCP_FASTOPEN_CONNECT} if C{fastOpen}), send a request for C{N} bytes
    (L{miniproxy.evaluation.server.makeRequest}), read C{N} bytes, close.
  - C{{"burst": {"host": H, "port": P, "count": K, "size": N}, "request":
    100, "timeout": 10}}: start C{K} connections at once (non-blocking
    C{connect()}s, one after the other as fast as the process can), send
    each its request as soon as it is connected, read its answer; all in
    one C{selectors} loop.

Each result: C{{"tag": ..., "ok": true, "connect": S, "ttfb": S, "ttc": S,
"bytes": N, "port": LOCAL_PORT, "start": NS}}, times in seconds from the
start of C{connect()} (C{time.monotonic_ns}): C{connect} to the connection
being made (with Fast Open, C{connect()} returns before the SYN is even
sent), C{ttfb} to the first byte of the answer read, C{ttc} to its last
byte read; C{start} is the wall-clock time of C{connect()} (C{time.time_ns},
the kernel's C{CLOCK_REALTIME} that packet captures use).  A failed flow
has C{"ok": false} and C{"error"}.
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import sys
import time
from typing import IO, Any, Sequence

from miniproxy.evaluation.server import REQUEST, makeRequest

#: Linux's C{TCP_FASTOPEN_CONNECT}.
TCP_FASTOPEN_CONNECT = 30
#: Seconds a flow may take.
TIMEOUT = 10.0
#: Bytes read at most per C{recv}.
READ_SIZE = 1 << 20


def _seconds(start: int, end: int | None) -> float | None:
    return None if end is None else (end - start) / 1e9


def runFlow(
    host: str,
    port: int,
    size: int,
    fastOpen: bool = False,
    request: int = REQUEST,
    timeout: float = TIMEOUT,
) -> dict[str, Any]:
    """
    Run one flow: connect, ask for C{size} bytes, read them, close.

    @return: The result (see the module docstring).
    """
    buffer = bytearray(READ_SIZE)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    result: dict[str, Any] = {"ok": False, "bytes": 0}
    try:
        if fastOpen:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        sock.settimeout(timeout)
        payload = makeRequest(size, request)
        result["start"] = time.time_ns()
        start = time.monotonic_ns()
        sock.connect((host, port))
        connected = time.monotonic_ns()
        result["port"] = sock.getsockname()[1]
        sock.sendall(payload)
        got = 0
        first = last = None
        while got < size:
            n = sock.recv_into(buffer)
            if not n:
                break
            last = time.monotonic_ns()
            if first is None:
                first = last
            got += n
        result.update(
            bytes=got,
            connect=_seconds(start, connected),
            ttfb=_seconds(start, first),
            ttc=_seconds(start, last),
            ok=got == size,
        )
        if got != size:
            result["error"] = f"closed after {got} of {size} bytes"
    except OSError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        sock.close()
    return result


class _Attempt:
    def __init__(self, index: int) -> None:
        self.index = index
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.start = 0
        self.wall = 0
        self.connected: int | None = None
        self.first: int | None = None
        self.last: int | None = None
        self.got = 0
        self.toSend = memoryview(b"")
        self.error: str | None = None
        self.done = False
        self.port = 0

    def result(self, size: int) -> dict[str, Any]:
        return {
            "tag": self.index,
            "ok": self.error is None and self.got == size,
            "bytes": self.got,
            "port": self.port,
            "start": self.wall,
            "connect": _seconds(self.start, self.connected),
            "ttfb": _seconds(self.start, self.first),
            "ttc": _seconds(self.start, self.last),
            **({"error": self.error} if self.error is not None else {}),
        }


def runBurst(
    host: str,
    port: int,
    count: int,
    size: int,
    request: int = REQUEST,
    timeout: float = TIMEOUT,
) -> list[dict[str, Any]]:
    """
    Start C{count} connections at once and run a flow of C{size} bytes on
    each, in one event loop.

    @return: A result per connection (see the module docstring), in the
        order they were started.
    """
    payload = makeRequest(size, request)
    selector = selectors.DefaultSelector()
    buffer = bytearray(READ_SIZE)
    attempts = []
    for index in range(count):
        attempt = _Attempt(index)
        attempts.append(attempt)
        attempt.wall = time.time_ns()
        attempt.start = time.monotonic_ns()
        code = attempt.sock.connect_ex((host, port))
        attempt.port = attempt.sock.getsockname()[1]
        if code not in (0, errno.EINPROGRESS):
            attempt.error = f"connect: {errno.errorcode.get(code, code)}"
            attempt.done = True
            attempt.sock.close()
            continue
        selector.register(attempt.sock, selectors.EVENT_WRITE, attempt)
    deadline = time.monotonic() + timeout
    pending = sum(1 for a in attempts if not a.done)

    def finish(attempt: _Attempt, error: str | None = None) -> None:
        nonlocal pending
        attempt.error = attempt.error or error
        attempt.done = True
        pending -= 1
        selector.unregister(attempt.sock)
        attempt.sock.close()

    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for key, events in selector.select(left):
            attempt: _Attempt = key.data
            now = time.monotonic_ns()
            if attempt.connected is None:
                code = attempt.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    finish(attempt, f"connect: {errno.errorcode.get(code, code)}")
                    continue
                attempt.connected = now
                attempt.toSend = memoryview(payload)
            if attempt.toSend:
                try:
                    sent = attempt.sock.send(attempt.toSend)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    finish(attempt, f"send: {e}")
                    continue
                attempt.toSend = attempt.toSend[sent:]
                if not attempt.toSend:
                    selector.modify(attempt.sock, selectors.EVENT_READ, attempt)
                continue
            try:
                n = attempt.sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                finish(attempt, f"recv: {e}")
                continue
            if not n:
                finish(attempt, None if attempt.got == size else f"closed after {attempt.got} bytes")
                continue
            attempt.last = time.monotonic_ns()
            if attempt.first is None:
                attempt.first = attempt.last
            attempt.got += n
            if attempt.got >= size:
                finish(attempt)
    for attempt in attempts:
        if not attempt.done:
            finish(attempt, "timed out")
    return [attempt.result(size) for attempt in attempts]


def runPlan(plan: dict[str, Any], out: IO[str]) -> int:
    """
    Run a plan (see the module docstring), writing each result as a line
    of JSON to C{out}.

    @return: How many flows failed.
    """
    request = int(plan.get("request", REQUEST))
    timeout = float(plan.get("timeout", TIMEOUT))
    failures = 0
    if "burst" in plan:
        burst = plan["burst"]
        results = runBurst(
            burst["host"], int(burst["port"]), int(burst["count"]), int(burst["size"]),
            request, timeout,
        )
        for result in results:
            failures += not result["ok"]
            out.write(json.dumps(result) + "\n")
        out.flush()
        return failures
    gap = float(plan.get("gap", 0))
    for index, flow in enumerate(plan["flows"]):
        if index and gap > 0:
            # The workload: flows one at a time, idle in between (not a
            # wait for anything).
            time.sleep(gap)
        result = runFlow(
            flow["host"], int(flow["port"]), int(flow["size"]), bool(flow.get("fastOpen")),
            request, timeout,
        )
        result["tag"] = flow.get("tag")
        failures += not result["ok"]
        out.write(json.dumps(result) + "\n")
        out.flush()
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    """
    Read a plan from standard input, run it, write the results.

    @return: 0 (failed flows are results too).
    """
    plan = json.loads(sys.stdin.read())
    runPlan(plan, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
