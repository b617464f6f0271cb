# -*- test-case-name: tests.test_benchmarks -*-
"""
The measurements made inside one Python process: adding a listener to a
running miniproxy service, the Python objects an idle pair holds, and the
cost of a no-op function's hooks on the
in-memory relay of L{miniproxy.testing.FlowHarness}.

Run as C{python -m benchmarks.inproc listener BACKEND_PORT RUNS},
C{python -m benchmarks.inproc memory BACKEND_PORT PAIRS} or C{python -m
benchmarks.inproc hooks FLOWS CHUNKS}; each prints one JSON object.
"""

from __future__ import annotations

import gc
import json
import socket
import statistics
import sys
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from miniproxy.address import NextHop
from miniproxy.config import buildConfig
from miniproxy.flow import ConnectMode
from miniproxy.listener import ListenerSettings


@implementer(IReadDescriptor)
class FirstByte:
    """
    The lightest client the reactor can wait on: a non-blocking socket
    that connects, and is read once, so that what is timed is the proxy's
    work rather than a client protocol's.

    @ivar received: Fires with the time the first byte came, or fails if
        the connection ended before one came.
    """

    def __init__(self, reactor: Any, port: int) -> None:
        self.reactor = reactor
        self.received: Deferred = Deferred()
        self.socket = socket.socket()
        self.socket.setblocking(False)
        self.socket.connect_ex(("127.0.0.1", port))
        reactor.addReader(self)

    def fileno(self) -> int:
        """
        The socket's descriptor.
        """
        return self.socket.fileno()

    def logPrefix(self) -> str:
        """
        What the reactor logs this reader as.
        """
        return "FirstByte"

    def doRead(self) -> None:
        """
        Read the first byte (or learn that none will come), then stop.
        """
        try:
            data = self.socket.recv(16)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            error: Exception | None = e
        else:
            error = None
        now = time.perf_counter()
        self.close()
        if data:
            self.received.callback(now)
        else:
            self.received.errback(error or ConnectionError("closed before the first byte"))

    def connectionLost(self, reason: Any) -> None:
        """
        The reactor dropped this reader.
        """
        self.close()

    def close(self) -> None:
        """
        Stop reading and close the socket.
        """
        if self.socket.fileno() >= 0:
            self.reactor.removeReader(self)
            self.socket.close()


async def listenerTimes(reactor: Any, backendPort: int, runs: int) -> dict[str, Any]:
    """
    Add C{runs} listeners, one at a time, to a running service (one per
    connect mode in turn: C{accept}, then C{early}), and time each from the
    call to L{miniproxy.service.ProxyService.addListener} until its port
    listens, and until a client through it got the backend's first byte.

    @param reactor: The running reactor.
    @param backendPort: A local backend that sends a byte on accept.
    @param runs: Listeners per mode.
    @return: Per mode, the median, minimum and maximum times (ms) and every
        run.
    """
    from miniproxy.service import ProxyService

    to = f"tcp:host=127.0.0.1:port={backendPort}"
    config = buildConfig(
        {}, listen=["tcp:0:interface=127.0.0.1"], to=to, mode="accept",
        limits={"max-flows-per-source": 100000},
    )
    # Tuned as twistd miniproxy tunes it (tuneGC), so that a collection of
    # the harness's own objects does not land in a run.
    service = ProxyService(config, reactor, tuneGC=True)
    service.startService()
    await service.whenListening()
    results: dict[str, Any] = {}
    try:
        for mode in (ConnectMode.ACCEPT, ConnectMode.EARLY):
            listening, firstByte = [], []
            for _ in range(runs + 1):
                settings = ListenerSettings(
                    endpoint="tcp:0:interface=127.0.0.1", mode=mode,
                    to=NextHop.fromString(to),
                )
                started = time.perf_counter()
                port = await service.addListener(settings)
                listened = time.perf_counter()
                received = await FirstByte(reactor, port.getHost().port).received
                listening.append((listened - started) * 1000)
                firstByte.append((received - started) * 1000)
            # The first run pays for imports and first use: drop it.
            listening, firstByte = listening[1:], firstByte[1:]
            results[mode.value] = {
                "listeningMedianMs": statistics.median(listening),
                "firstByteMedianMs": statistics.median(firstByte),
                "firstByteMinMs": min(firstByte),
                "firstByteMaxMs": max(firstByte),
                "firstByteRunsMs": firstByte,
            }
    finally:
        await service.stopService()
    return results


async def memoryView(reactor: Any, backendPort: int, pairs: int) -> dict[str, Any]:
    """
    miniproxy's Python-level view of idle pairs: a service in this
    process, C{pairs} clients (plain non-blocking sockets made beforehand)
    each holding a pair open, and what C{tracemalloc} and the garbage
    collector see added per pair.

    @param reactor: The running reactor.
    @param backendPort: A local backend that sends a byte on accept.
    @param pairs: How many idle pairs to hold.
    @return: C{tracedPerPair} (bytes of Python allocations per pair), the
        source lines that allocated most, and the objects per pair by type.
    """
    import tracemalloc
    from collections import Counter

    from twisted.internet.task import deferLater

    from miniproxy.service import ProxyService

    tracemalloc.start(1)
    to = f"tcp:host=127.0.0.1:port={backendPort}"
    config = buildConfig(
        {}, listen=["tcp:0:interface=127.0.0.1"], to=to, mode="accept",
        limits={"max-flows-per-source": 100000, "max-flows": 100000},
    )
    service = ProxyService(config, reactor)
    service.startService()
    [port] = await service.whenListening()
    address = ("127.0.0.1", port.getHost().port)

    async def hold(clients: list[socket.socket]) -> None:
        for c in clients:
            c.connect_ex(address)
        waiting = set(clients)
        deadline = time.monotonic() + 30
        while waiting and time.monotonic() < deadline:
            for c in list(waiting):
                try:
                    if c.recv(16):
                        waiting.discard(c)
                except BlockingIOError:
                    pass
            if waiting:
                await deferLater(reactor, 0.005, lambda: None)
        if waiting:
            raise RuntimeError(f"{len(waiting)} pairs never got their byte")

    def sockets(n: int) -> list[socket.socket]:
        made = [socket.socket() for _ in range(n)]
        for c in made:
            c.setblocking(False)
        return made

    def types() -> Counter[str]:
        return Counter(type(o).__qualname__ for o in gc.get_objects())

    try:
        warm = sockets(10)
        await hold(warm)
        for c in warm:
            c.close()
        while service.table.flows:
            await deferLater(reactor, 0.01, lambda: None)
        clients = sockets(pairs)
        gc.collect()
        before, typesBefore = tracemalloc.take_snapshot(), types()
        await hold(clients)
        await deferLater(reactor, 0.1, lambda: None)
        gc.collect()
        after, typesAfter = tracemalloc.take_snapshot(), types()
        held = len(service.table.flows)
        for c in clients:
            c.close()
    finally:
        await service.stopService()
        tracemalloc.stop()
    filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
    differences = after.filter_traces(filters).compare_to(
        before.filter_traces(filters), "lineno")
    added = sum(d.size_diff for d in differences)
    top = [
        {
            "line": f"{d.traceback[0].filename.rsplit('site-packages/', 1)[-1]}:"
            f"{d.traceback[0].lineno}",
            "bytesPerPair": d.size_diff / pairs,
        }
        for d in sorted(differences, key=lambda d: -d.size_diff)[:15]
    ]
    objects = typesAfter - typesBefore
    return {
        "pairs": pairs,
        "flowsHeld": held,
        "tracedPerPair": added / pairs,
        "topLines": top,
        "objectsPerPair": {name: n / pairs for name, n in objects.most_common(20)},
    }


def dispatchCosts(calls: int = 20000, repeats: int = 5) -> dict[str, float]:
    """
    The hook dispatch alone, as the flow calls it: a
    L{miniproxy.chain.HandlerChain} of one no-op handler running a data
    hook on a 1 KiB chunk (a flow without functions makes no such call),
    and the per-flow work (making the handler and the chain, the
    C{accepted}, C{outgoingConnected}, both half-close and the C{closed}
    hooks).  Best of C{repeats} runs of C{calls} calls, with the garbage
    collector off.

    @return: C{dispatchChunkNs} and C{dispatchFlowUs}.
    """
    from benchmarks.noop import configure
    from miniproxy.chain import HandlerChain

    factory = configure({}, None)
    data = b"r" * 1024
    chain = HandlerChain([("bench-noop", factory.handlerForFlow(None))])
    runData = chain.runData

    def chunkLoop() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            runData("dataFromClient", None, data)  # type: ignore[arg-type]
        return (time.perf_counter() - started) / calls

    def flowLoop() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            c = HandlerChain([("bench-noop", factory.handlerForFlow(None))])
            c.run("accepted", None)  # type: ignore[arg-type]
            c.run("outgoingConnected", None)  # type: ignore[arg-type]
            c.run("clientHalfClosed", None)  # type: ignore[arg-type]
            c.run("serverHalfClosed", None)  # type: ignore[arg-type]
            c.runClosed(None)  # type: ignore[arg-type]
        return (time.perf_counter() - started) / calls

    gc.collect()
    gc.disable()
    try:
        chunk = min(chunkLoop() for _ in range(repeats))
        flow = min(flowLoop() for _ in range(repeats))
    finally:
        gc.enable()
    return {"dispatchChunkNs": chunk * 1e9, "dispatchFlowUs": flow * 1e6}


def hookCosts(flows: int, chunks: int, repeats: int = 5) -> dict[str, Any]:
    """
    What the no-op function costs on the in-memory relay: the extra time
    per flow (accept, connect, 100 bytes up, 1 KiB down, both FINs), and
    per 1 KiB chunk relayed on an open flow.

    Runs with and without the function alternate, C{repeats} times each,
    with the garbage collector off while timing; the best run of each
    counts.  A harness serves at most 100 flows, so that what it keeps of
    closed flows does not slow the later ones down.

    @param flows: Flows per run.
    @param chunks: Chunks per run.
    @param repeats: Runs of each kind.
    @return: Seconds per flow and per chunk without and with the function,
        and the differences in microseconds and nanoseconds.
    """
    from benchmarks.noop import configure
    from miniproxy.testing import FlowHarness

    request, reply = b"q" * 100, b"r" * 1024

    def flowRun(functions: tuple) -> float:
        elapsed = 0.0
        done = 0
        while done < flows:
            batch = min(100, flows - done)
            harness = FlowHarness(functions, mode=ConnectMode.ACCEPT)
            started = time.perf_counter()
            for _ in range(batch):
                driver = harness.accept()
                driver.connectOutgoing()
                driver.clientSends(request)
                driver.serverSends(reply)
                driver.clientHalfCloses()
                driver.serverHalfCloses()
            elapsed += time.perf_counter() - started
            if len(harness.closedFlows) != batch:
                raise RuntimeError("flows did not all close")
            done += batch
        return elapsed / flows

    def chunkRun(functions: tuple) -> float:
        harness = FlowHarness(functions, mode=ConnectMode.ACCEPT)
        driver = harness.accept()
        driver.connectOutgoing()
        server = driver.serverTransport
        started = time.perf_counter()
        for i in range(chunks):
            driver.clientSends(reply)
            if i % 256 == 0:
                server.clear()
        elapsed = time.perf_counter() - started
        driver.clientHalfCloses()
        driver.serverHalfCloses()
        return elapsed / chunks

    noop = (configure({}, None),)
    times: dict[str, list[float]] = {"plainFlow": [], "noopFlow": [], "plainChunk": [],
                                     "noopChunk": []}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            times["plainFlow"].append(flowRun(()))
            times["noopFlow"].append(flowRun(noop))
            times["plainChunk"].append(chunkRun(()))
            times["noopChunk"].append(chunkRun(noop))
            gc.collect()
    finally:
        gc.enable()
    best = {k: min(v) for k, v in times.items()}
    return {
        **dispatchCosts(),
        "flows": flows,
        "chunks": chunks,
        "repeats": repeats,
        "plainFlowUs": best["plainFlow"] * 1e6,
        "noopFlowUs": best["noopFlow"] * 1e6,
        "perFlowUs": (best["noopFlow"] - best["plainFlow"]) * 1e6,
        "plainChunkNs": best["plainChunk"] * 1e9,
        "noopChunkNs": best["noopChunk"] * 1e9,
        "perChunkNs": (best["noopChunk"] - best["plainChunk"]) * 1e9,
    }


def main(argv: list[str]) -> int:
    """
    Run one in-process measurement and print its JSON result.
    """
    what = argv[1] if len(argv) > 1 else ""
    if what == "listener" and len(argv) == 4:
        result: dict[str, Any] = {}

        def run(reactor: Any) -> Deferred:
            d = ensureDeferred(listenerTimes(reactor, int(argv[2]), int(argv[3])))
            return d.addCallback(result.update)

        from twisted.internet.task import react

        try:
            react(run)
        except SystemExit as e:
            if e.code:
                return int(e.code)
        print(json.dumps(result))
        return 0
    if what == "memory" and len(argv) == 4:
        memory: dict[str, Any] = {}

        def runMemory(reactor: Any) -> Deferred:
            d = ensureDeferred(memoryView(reactor, int(argv[2]), int(argv[3])))
            return d.addCallback(memory.update)

        from twisted.internet.task import react as reactMemory

        try:
            reactMemory(runMemory)
        except SystemExit as e:
            if e.code:
                return int(e.code)
        print(json.dumps(memory))
        return 0
    if what == "hooks" and len(argv) == 4:
        print(json.dumps(hookCosts(int(argv[2]), int(argv[3]))))
        return 0
    sys.stderr.write(
        "usage: python -m benchmarks.inproc listener BACKEND_PORT RUNS\n"
        "       python -m benchmarks.inproc memory BACKEND_PORT PAIRS\n"
        "       python -m benchmarks.inproc hooks FLOWS CHUNKS\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
