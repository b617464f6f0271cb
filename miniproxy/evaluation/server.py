# -*- test-case-name: tests.test_evaluation -*-
"""
The evaluation's server: C{python -m miniproxy.evaluation.server --port P
[--port P ...] [--request BYTES] [--fast-open] [--watch-stdin]}.

It listens on each port (IPv4, every address), and on every connection
reads a request of exactly C{--request} bytes (default L{REQUEST}) whose
first line is a decimal size, answers with that many bytes at once, and
closes.  It prints C{ready} on its standard output when it listens, and
runs until it is killed (with C{--watch-stdin}, also until its standard
input ends: its parent is gone).

One thread, one C{selectors} loop, non-blocking sockets: it serves the
sequential flows of Figures 4 and 5 and the hundreds of simultaneous ones
of Table 1 alike, and writes each answer as fast as the kernel takes it
(the model's server answers with all its bytes at once).

With C{--fast-open} its listening sockets accept TCP Fast Open SYNs
(C{TCP_FASTOPEN}; the namespace needs C{net.ipv4.tcp_fastopen} with bit 2
set), so a request in a SYN is answered at once.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
from typing import Sequence

#: The size of a request, in bytes (the model's C{requestSize}).
REQUEST = 100
#: Linux's C{TCP_FASTOPEN} on a listening socket: its queue of pending
#: Fast Open requests.
TCP_FASTOPEN = 23
#: The largest answer served, in bytes.
MAX_ANSWER = 100_000_000

_ANSWER_BYTE = b"a"


def makeRequest(size: int, length: int = REQUEST) -> bytes:
    """
    The request for C{size} bytes: the size as a decimal line, padded with
    spaces to C{length} bytes.

    @raise ValueError: If the size does not fit.
    """
    line = b"%d\n" % size
    if size < 0 or len(line) > length:
        raise ValueError(f"cannot ask for {size} bytes in {length} bytes")
    return line.ljust(length, b" ")


def parseRequest(request: bytes) -> int | None:
    """
    The size a request asks for, or L{None} if it is not a valid request.
    """
    first = request.split(b"\n", 1)[0]
    if not first.isdigit():
        return None
    size = int(first)
    return size if size <= MAX_ANSWER else None


class _Connection:
    def __init__(self, sock: socket.socket, requestLength: int) -> None:
        self.sock = sock
        self.request = bytearray()
        self.requestLength = requestLength
        self.answer = memoryview(b"")


def serve(listeners: Sequence[socket.socket], requestLength: int = REQUEST,
          stop: socket.socket | int | None = None) -> None:
    """
    Serve on listening sockets until C{stop} (a readable descriptor) is
    readable or ends.

    @param listeners: Non-blocking listening sockets.
    @param requestLength: Bytes in a request.
    @param stop: A descriptor whose input (or end) stops the loop.
    """
    selector = selectors.DefaultSelector()
    for listener in listeners:
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, None)
    if stop is not None:
        selector.register(stop, selectors.EVENT_READ, "stop")
    answers: dict[int, bytes] = {}

    def close(connection: _Connection) -> None:
        selector.unregister(connection.sock)
        connection.sock.close()

    while True:
        for key, events in selector.select():
            if key.data == "stop":
                return
            if key.data is None:
                while True:
                    try:
                        sock, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    sock.setblocking(False)
                    selector.register(sock, selectors.EVENT_READ, _Connection(sock, requestLength))
                continue
            connection: _Connection = key.data
            if events & selectors.EVENT_READ and len(connection.request) < requestLength:
                try:
                    data = connection.sock.recv(requestLength - len(connection.request))
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    close(connection)
                    continue
                if not data:
                    close(connection)
                    continue
                connection.request += data
                if len(connection.request) < requestLength:
                    continue
                size = parseRequest(bytes(connection.request))
                if size is None:
                    close(connection)
                    continue
                if size not in answers:
                    answers[size] = _ANSWER_BYTE * size
                connection.answer = memoryview(answers[size])
                selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
                events = selectors.EVENT_WRITE
            if events & selectors.EVENT_WRITE:
                try:
                    sent = connection.sock.send(connection.answer) if connection.answer else 0
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    close(connection)
                    continue
                connection.answer = connection.answer[sent:]
                if not connection.answer:
                    close(connection)


def listen(port: int, fastOpen: bool = False, backlog: int = 4096) -> socket.socket:
    """
    A listening IPv4 socket on every address.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    if fastOpen:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, 1024)
    sock.listen(backlog)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the server; see the module docstring.

    @return: The exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m miniproxy.evaluation.server")
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--request", type=int, default=REQUEST)
    parser.add_argument("--fast-open", action="store_true")
    parser.add_argument("--watch-stdin", action="store_true")
    args = parser.parse_args(argv)
    listeners = [listen(port, args.fast_open) for port in args.port]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    serve(listeners, args.request, stop=sys.stdin.fileno() if args.watch_stdin else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
