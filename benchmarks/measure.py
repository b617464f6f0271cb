# -*- test-case-name: tests.test_benchmarks -*-
"""
The measurements, each run against one peer at a time.

A L{Bench} holds what the measurements share: the work directory, the
C{mpbench} binary, and the processes to stop at the end.  Each
measurement starts its own backend and peer, and stops them before it
returns.
"""

from __future__ import annotations

import json
import math
import shutil
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from attrs import define, evolve, field

from benchmarks.profile import finish, startRecording
from benchmarks.peers import (
    LOAD_CPU,
    PROXY_CPU,
    REPO,
    Peer,
    Process,
    freePort,
    listeningPorts,
    memoryOf,
    pinned,
    processTree,
    waitFor,
)


def percentile(values: Sequence[float], p: float) -> float | None:
    """
    The C{p}th percentile of C{values} (nearest rank), or L{None} if there
    are none.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def mean(values: Sequence[float]) -> float | None:
    """
    The mean of C{values}, or L{None} if there are none.
    """
    return statistics.fmean(values) if values else None


@define
class Bench:
    """
    What the measurements of one run share.

    @ivar workdir: Where configs and logs go.
    @ivar binary: The C{mpbench} binary.
    @ivar processes: The processes started and not yet stopped.
    """

    workdir: Path
    binary: Path
    processes: list[Process] = field(factory=list)

    def start(self, name: str, command: Sequence[str], **kwargs: Any) -> Process:
        """
        Start a process that L{close} stops if it is still running.
        """
        process = Process.start(name, command, **kwargs)
        self.processes.append(process)
        return process

    def stop(self, process: Process) -> None:
        """
        Stop a process now.
        """
        process.stop()
        if process in self.processes:
            self.processes.remove(process)

    def close(self) -> None:
        """
        Stop every process still running.
        """
        while self.processes:
            self.processes.pop().stop()

    # -- backends and peers ----------------------------------------------

    def backend(self, greet: int = 0, request: int = 0, reply: int = 0) -> tuple[Process, int]:
        """
        Start the C{mpbench} server on the load core.

        @return: The process and its port.
        """
        process = self.start(
            "backend",
            pinned([str(self.binary), "server", "0", str(greet), str(request), str(reply)],
                   LOAD_CPU),
            stdout=subprocess.PIPE,
        )
        assert process.popen.stdout is not None
        line = process.popen.stdout.readline().decode()
        if not line.startswith("ready "):
            self.stop(process)
            raise RuntimeError(f"the mpbench server did not start: {line!r}")
        return process, int(line.split()[1])

    @contextmanager
    def peer(self, peer: Peer, backendPort: int,
             env: dict[str, str] | None = None) -> Iterator[int]:
        """
        Run C{peer} in front of C{backendPort} for the duration of the
        C{with} block.

        @return: The port clients connect to: the peer's, or the backend's
            for C{direct}.
        """
        if not peer.proxy:
            yield backendPort
            return
        port = freePort()
        process = self.startPeer(peer, port, backendPort, env)
        try:
            yield port
        finally:
            self.stop(process)

    def startPeer(self, peer: Peer, port: int, backendPort: int,
                   env: dict[str, str] | None = None) -> Process:
        """
        Start C{peer} on C{port} and wait until it listens.
        """
        if env:
            peer = evolve(peer, env={**peer.env, **env})
        process = peer.start(port, backendPort, self.workdir)
        self.processes.append(process)
        return process

    def peerProcess(self) -> Process | None:
        """
        The most recently started peer process that is still running.
        """
        for process in reversed(self.processes):
            if process.name not in ("backend", "iperf3-server", "hold"):
                return process
        return None

    def runTool(self, args: Sequence[str], timeout: float) -> str:
        """
        Run C{mpbench} on the load core and return its output.
        """
        result = subprocess.run(
            pinned([str(self.binary), *args], LOAD_CPU),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"mpbench {args[0]} failed: {result.stderr}")
        return result.stdout


# -- 1. single-flow throughput ---------------------------------------------


def throughput(bench: Bench, peer: Peer, seconds: float = 5.0,
               env: dict[str, str] | None = None,
               profileTo: Path | None = None) -> dict[str, Any]:
    """
    One iperf3 flow through C{peer} for C{seconds}.

    @param profileTo: Sample the peer with py-spy during the run into
        this file, and add the summary as C{profile}.

    @return: C{gbps} (received), C{retransmits}, and C{cpuSender}/
        C{cpuReceiver} (iperf3's own CPU use, percent).
    """
    port = freePort()
    server = bench.start(
        "iperf3-server",
        pinned(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)], LOAD_CPU),
    )
    try:
        waitFor(lambda: port in listeningPorts(), 10, "iperf3 -s", server.popen)
        with bench.peer(peer, port, env) as target:
            recorder = _profile(bench, peer, seconds, profileTo)
            result = subprocess.run(
                pinned(
                    ["iperf3", "-c", "127.0.0.1", "-p", str(target), "-t", str(seconds),
                     "-J"],
                    LOAD_CPU,
                ),
                capture_output=True,
                text=True,
                timeout=seconds + 30,
            )
            profile = finish(recorder, profileTo) if recorder is not None else None
    finally:
        bench.stop(server)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        raise RuntimeError(f"iperf3 gave no JSON: {result.stdout[-500:]} {result.stderr}")
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    end = report["end"]
    return {
        "gbps": end["sum_received"]["bits_per_second"] / 1e9,
        "bytes": end["sum_received"]["bytes"],
        "seconds": end["sum_received"]["seconds"],
        "retransmits": end["sum_sent"].get("retransmits"),
        "cpuSender": end.get("cpu_utilization_percent", {}).get("host_total"),
        "cpuReceiver": end.get("cpu_utilization_percent", {}).get("remote_total"),
        **({"profile": profile} if profile is not None else {}),
    }


def _profile(bench: Bench, peer: Peer, seconds: float,
             output: Path | None) -> subprocess.Popen | None:
    if output is None or not peer.proxy:
        return None
    process = bench.peerProcess()
    assert process is not None
    return startRecording(process.pid, seconds, output)


# -- 2. simultaneous connection attempts (the paper's Table 1) -------------


def parseBurst(output: str) -> list[dict[str, Any]]:
    """
    Parse C{mpbench burst} output into one dictionary per connection:
    C{connectUs}, C{firstByteUs} (L{None} when it never happened) and
    C{status}.
    """
    connections = []
    for line in output.splitlines():
        fields = line.split()
        if fields and fields[0] == "conn":
            connect, first = int(fields[2]), int(fields[3])
            connections.append(
                {
                    "connectUs": connect if connect >= 0 else None,
                    "firstByteUs": first if first >= 0 else None,
                    "status": fields[4],
                }
            )
    return connections


def summarizeBurst(connections: list[dict[str, Any]]) -> dict[str, Any]:
    """
    Average and 99th percentile of the connect times and times to first
    byte (ms) of the connections that got their byte, and the failures.
    """
    ok = [c for c in connections if c["status"] == "ok"]
    connects = [c["connectUs"] / 1000 for c in ok]
    firsts = [c["firstByteUs"] / 1000 for c in ok]
    failures: dict[str, int] = {}
    for c in connections:
        if c["status"] != "ok":
            failures[c["status"]] = failures.get(c["status"], 0) + 1
    return {
        "attempts": len(connections),
        "connectMeanMs": mean(connects),
        "connectP99Ms": percentile(connects, 99),
        "firstByteMeanMs": mean(firsts),
        "firstByteP99Ms": percentile(firsts, 99),
        "failures": sum(failures.values()),
        "failureKinds": failures,
    }


def simultaneous(bench: Bench, peer: Peer, sizes: Sequence[int] = (30, 70, 110, 150, 190, 230),
                 repeats: int = 3, timeout: float = 5.0) -> dict[str, Any]:
    """
    For each size N, N connects at once through C{peer} to a backend that
    sends one byte on accept; C{repeats} bursts per size, pooled.

    @return: Per size (as a string), L{summarizeBurst} of the pooled
        connections.
    """
    backend, backendPort = bench.backend(greet=1)
    results: dict[str, Any] = {}
    try:
        with bench.peer(peer, backendPort) as port:
            # One small burst first, so that no peer pays its first-use
            # costs (imports, allocations) inside the measurement.
            bench.runTool(["burst", "127.0.0.1", str(port), "5", "5000", "1"], 30)
            for size in sizes:
                pooled: list[dict[str, Any]] = []
                for _ in range(repeats):
                    output = bench.runTool(
                        ["burst", "127.0.0.1", str(port), str(size),
                         str(int(timeout * 1000)), "1"],
                        timeout + 30,
                    )
                    pooled.extend(parseBurst(output))
                results[str(size)] = summarizeBurst(pooled)
    finally:
        bench.stop(backend)
    return results


# -- 3. short flows --------------------------------------------------------


def shortFlows(bench: Bench, peer: Peer, clients: int = 50, seconds: float = 5.0,
               request: int = 100, reply: int = 1024, timeout: float = 5.0,
               env: dict[str, str] | None = None,
               profileTo: Path | None = None) -> dict[str, Any]:
    """
    C{clients} concurrent clients doing connect, C{request} bytes, a
    C{reply}-byte reply and close through C{peer} for C{seconds}.

    @param profileTo: As for L{throughput}.

    @return: C{flowsPerSecond}, C{flows}, C{errors} (total) and
        C{errorKinds}, and the flow latency.
    """
    backend, backendPort = bench.backend(request=request, reply=reply)
    try:
        with bench.peer(peer, backendPort, env) as port:
            # Warm up (see simultaneous).
            bench.runTool(["flows", "127.0.0.1", str(port), "5", "200", str(request),
                           str(reply), "5000"], 30)
            recorder = _profile(bench, peer, seconds, profileTo)
            output = bench.runTool(
                ["flows", "127.0.0.1", str(port), str(clients), str(int(seconds * 1000)),
                 str(request), str(reply), str(int(timeout * 1000))],
                seconds + timeout + 30,
            )
            profile = finish(recorder, profileTo) if recorder is not None else None
    finally:
        bench.stop(backend)
    result = json.loads(output)
    if profile is not None:
        result["profile"] = profile
    kinds = result.pop("errors")
    return {
        "flowsPerSecond": result["flows"] / result["elapsed"],
        "errors": sum(kinds.values()),
        "errorKinds": kinds,
        **result,
    }


# -- 4. memory per idle pair -----------------------------------------------


def idleMemory(bench: Bench, peer: Peer, pairs: int = 1000,
               timeout: float = 30.0) -> dict[str, Any] | None:
    """
    The proxy's userspace memory with C{pairs} idle proxied connection
    pairs, less its memory with none, per pair.

    @return: C{rssPerPair} and C{pssPerPair} (bytes), the raw figures, and
        how many pairs were held; L{None} for C{direct}.
    """
    if not peer.proxy:
        return None
    backend, backendPort = bench.backend(greet=1)
    try:
        with bench.peer(peer, backendPort) as port:
            process = bench.peerProcess()
            assert process is not None
            # Warm up with a few pairs, so that one-time allocations are
            # in the baseline; a forking server's children for them must
            # be gone first.
            processes = len(processTree(process.pid))
            _hold(bench, port, min(20, pairs), timeout, lambda: None)
            waitFor(lambda: len(processTree(process.pid)) <= processes, timeout,
                    f"{peer.name}: children of the warm-up pairs")
            before = memoryOf(process.pid)
            during: dict[str, int] = {}
            held = _hold(bench, port, pairs, timeout,
                         lambda: during.update(memoryOf(process.pid)))
    finally:
        bench.stop(backend)
    count = held["ok"] or 1
    return {
        "pairs": pairs,
        "held": held["ok"],
        "failed": held["failed"],
        "before": before,
        "during": during,
        "rssPerPair": (during["rss"] - before["rss"]) / count,
        "pssPerPair": (during["pss"] - before["pss"]) / count,
    }


def _hold(bench: Bench, port: int, pairs: int, timeout: float,
          whileHeld: Any) -> dict[str, int]:
    process = subprocess.Popen(
        pinned([str(bench.binary), "hold", "127.0.0.1", str(port), str(pairs),
                str(int(timeout * 1000))], LOAD_CPU),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        line = process.stdout.readline().split()
        if not line or line[0] != "held":
            raise RuntimeError(f"mpbench hold: {line!r}")
        ok, failed = int(line[1]), int(line[2])
        # Every pair got the backend's byte through the proxy: both of its
        # legs are up.
        whileHeld()
        process.stdin.close()
        process.stdout.readline()
        process.wait(timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout):
            if stream is not None and not stream.closed:
                stream.close()
    return {"ok": ok, "failed": failed}


# -- 5. cold start ---------------------------------------------------------


def compileRepository() -> None:
    """
    Write the bytecode of miniproxy's packages in the repository, as
    C{pip install .} does for an installed copy, so that a cold start
    measures loading miniproxy, not compiling it.  (The benchmark runs
    miniproxy from the repository; with C{PYTHONDONTWRITEBYTECODE} set, as
    on some machines, every start would otherwise compile every module,
    about 110 ms of CPU here.)
    """
    import compileall

    for package in ("miniproxy", "plugins", "twisted/plugins"):
        compileall.compile_dir(str(REPO / package), quiet=1)


def spread(times: list[float]) -> dict[str, Any]:
    """
    The median, least and greatest of C{times} (ms), and every one.
    """
    return {
        "medianMs": statistics.median(times),
        "minMs": min(times),
        "maxMs": max(times),
        "runsMs": times,
    }


def coldStart(bench: Bench, peer: Peer, runs: int = 5, timeout: float = 20.0) -> dict[str, Any] | None:
    """
    From the exec of C{peer} to the first byte relayed from a backend that
    sends one on accept (connect, retried while refused, then read), in
    ms; C{runs} runs.

    @return: C{medianMs}, C{minMs}, C{maxMs} and every run; L{None} for
        C{direct}.
    """
    if not peer.proxy:
        return None
    if peer.name.startswith("miniproxy"):
        compileRepository()
    backend, backendPort = bench.backend(greet=1)
    times = []
    try:
        for _ in range(runs):
            port = freePort()
            command = peer.command(port, backendPort, bench.workdir)
            environment = peer.environment()
            log = bench.workdir / f"{peer.name}.coldstart.log"
            started = time.perf_counter()
            process = bench.start(peer.name, command, log=log, env=environment)
            try:
                times.append((_firstByte(port, started + timeout, process) - started) * 1000)
            finally:
                bench.stop(process)
    finally:
        bench.stop(backend)
    return spread(times)


def _firstByte(port: int, deadline: float, process: Process) -> float:
    while True:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{process.name}: no byte before the deadline\n{process.tail()}")
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited: {process.tail()}")
        with socket.socket() as s:
            s.settimeout(max(0.1, deadline - time.perf_counter()))
            try:
                s.connect(("127.0.0.1", port))
            except ConnectionRefusedError:
                time.sleep(0.0005)
                continue
            try:
                data = s.recv(1)
            except (ConnectionResetError, socket.timeout):
                data = b""
            if data:
                return time.perf_counter()
            time.sleep(0.0005)


#: The modules whose cumulative import time L{startupImports} reports.
STARTUP_MODULES = (
    "site",
    "twisted.scripts.twistd",
    "twisted.application.app",
    "twisted.logger",
    "miniproxy.tap",
    "miniproxy.service",
    "miniproxy.listener",
    "twisted.internet.endpoints",
    "twisted.internet.ssl",
    "OpenSSL",
    "cryptography.x509",
    "urllib.request",
)


def startupImports(runs: int = 3) -> dict[str, Any]:
    """
    Where miniproxy's start-up time goes before it listens: the wall time
    of a bare interpreter (with and without C{site}), and C{python -X
    importtime}'s cumulative time of L{STARTUP_MODULES} when importing
    what C{twistd miniproxy} imports; medians of C{runs} runs, in ms, on
    the proxy core.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )

    def wall(args: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(pinned([sys.executable, *args], PROXY_CPU), env=env, check=True,
                       capture_output=True)
        return (time.perf_counter() - started) * 1000

    bare = [wall(["-S", "-c", "pass"]) for _ in range(runs)]
    plain = [wall(["-c", "pass"]) for _ in range(runs)]
    imports = [wall(["-c", "from twisted.scripts.twistd import run; import miniproxy.tap, "
                     "miniproxy.service"]) for _ in range(runs)]
    modules: dict[str, list[float]] = {m: [] for m in STARTUP_MODULES}
    for _ in range(runs):
        result = subprocess.run(
            pinned([sys.executable, "-X", "importtime", "-c",
                    "from twisted.scripts.twistd import run; import miniproxy.tap, "
                    "miniproxy.service"], PROXY_CPU),
            env=env, capture_output=True, text=True, check=True,
        )
        seen = {}
        for line in result.stderr.splitlines():
            if not line.startswith("import time:") or "|" not in line:
                continue
            _, cumulative, name = line.split("|")
            name = name.strip()
            if name in modules and name not in seen and cumulative.strip().isdigit():
                seen[name] = int(cumulative) / 1000
        for name, ms in seen.items():
            modules[name].append(ms)
    return {
        "interpreterNoSiteMs": statistics.median(bare),
        "interpreterMs": statistics.median(plain),
        "importsMs": statistics.median(imports),
        "importTimeMs": {m: statistics.median(v) for m, v in modules.items() if v},
    }


# -- 7. the cost of a no-op function ---------------------------------------


def hookComparison(bench: Bench, plain: Peer, noop: Peer, rounds: int = 2,
                   clients: int = 50, seconds: float = 5.0,
                   throughputSeconds: float = 5.0) -> dict[str, Any]:
    """
    Short flows and throughput through C{plain} and C{noop} (the same
    proxy with the no-op function), alternating, C{rounds} times each; the
    best run of each counts.  A function that wants data keeps its flows
    off the splice path, so C{plain} should relay in userspace too (splice
    off) for the difference to be the hooks'.  The proxy's core is busy throughout these
    runs, so the inverse of a rate is the proxy's time per flow or per
    byte, and the difference is the function's cost.

    @return: Both sides' best figures, C{perFlowUs}, C{perChunkNs} (from
        the chunks the function counted during its best throughput run)
        and the ratios.
    """
    counts = bench.workdir / "noop-counts.json"
    short: dict[str, list[float]] = {"plain": [], "noop": []}
    speed: dict[str, list[tuple[float, dict[str, int] | None]]] = {"plain": [], "noop": []}
    for _ in range(rounds):
        for side, peer in (("plain", plain), ("noop", noop)):
            short[side].append(shortFlows(bench, peer, clients, seconds)["flowsPerSecond"])
        for side, peer in (("plain", plain), ("noop", noop)):
            env = {"BENCH_NOOP_STATS": str(counts)} if side == "noop" else None
            if counts.exists():
                counts.unlink()
            gbps = throughput(bench, peer, throughputSeconds, env=env)["gbps"]
            seen = json.loads(counts.read_text()) if side == "noop" and counts.exists() else None
            speed[side].append((gbps, seen))
    ratePlain, rateNoop = max(short["plain"]), max(short["noop"])
    gbpsPlain = max(g for g, _ in speed["plain"])
    gbpsNoop, seen = max(speed["noop"], key=lambda x: x[0])
    result: dict[str, Any] = {
        "rounds": rounds,
        "shortFlowsPlain": short["plain"],
        "shortFlowsNoop": short["noop"],
        "throughputPlainGbps": [g for g, _ in speed["plain"]],
        "throughputNoopGbps": [g for g, _ in speed["noop"]],
        "perFlowUs": (1 / rateNoop - 1 / ratePlain) * 1e6,
        "shortFlowRatio": rateNoop / ratePlain,
        "throughputRatio": gbpsNoop / gbpsPlain,
    }
    if seen and seen.get("chunks"):
        chunkBytes = seen["bytes"] / seen["chunks"]
        result["noopCounts"] = seen
        result["chunkBytes"] = chunkBytes
        result["perChunkNs"] = (8 / (gbpsNoop * 1e9) - 8 / (gbpsPlain * 1e9)) * chunkBytes * 1e9
    return result


# -- 6 and 7. in-process measurements of miniproxy -------------------------


def inProcess(bench: Bench, what: str, *args: str, timeout: float = 300) -> dict[str, Any]:
    """
    Run C{python -m benchmarks.inproc WHAT ARGS} on the proxy core and
    return its JSON result.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    result = subprocess.run(
        pinned([sys.executable, "-m", "benchmarks.inproc", what, *args], PROXY_CPU),
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"benchmarks.inproc {what} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def newListener(bench: Bench, runs: int = 20) -> dict[str, Any]:
    """
    The time to add a listener to a running miniproxy service until it
    relays its first byte (see L{benchmarks.inproc.listenerTimes}).
    """
    backend, backendPort = bench.backend(greet=1)
    try:
        return inProcess(bench, "listener", str(backendPort), str(runs))
    finally:
        bench.stop(backend)


def controlAdd(bench: Bench, peer: Peer, runs: int = 20,
               timeout: float = 20.0) -> dict[str, Any]:
    """
    A listener added to a running C{peer} (miniproxy, with C{--control
    unix:PATH} added to its options) from outside: from the exec of the
    control client (C{python -m miniproxy.ctl add}, on the proxy core) to
    the first byte relayed through the new listener from a backend that
    sends one on accept, in ms; C{runs} runs, each listener removed after
    its run.  The figure to set beside a cold start of a new process.

    When C{socat} is installed, each run is also done with it as the client
    (the request line written to C{socat - UNIX-CONNECT:PATH}, which needs
    no interpreter), alternating with the Python client.

    @return: C{medianMs}, C{minMs}, C{maxMs} and every run (C{runsMs}) of
        the Python client, and the same under C{socat} for socat's runs.
    """
    socketPath = bench.workdir / "control.sock"
    build = peer.build
    assert build is not None
    controlled = evolve(peer, build=lambda listen, backend, workdir: [
        *build(listen, backend, workdir), "--control", f"unix:{socketPath}"])
    backend, backendPort = bench.backend(greet=1)
    env = peer.environment()
    times: list[float] = []
    socatTimes: list[float] = []
    socat = shutil.which("socat")

    def ctl(*args: str) -> list[str]:
        return pinned([sys.executable, "-m", "miniproxy.ctl", "--socket", str(socketPath),
                       *args], PROXY_CPU)

    def addWith(python: bool, name: str, process: Any) -> float:
        port = freePort()
        request = b""
        if python:
            command = ctl("add", "--listen", f"tcp:{port}:interface=127.0.0.1", "--to",
                          f"tcp:host=127.0.0.1:port={backendPort}", "--name", name)
        else:
            assert socat is not None
            command = pinned([socat, "-", f"UNIX-CONNECT:{socketPath}"], PROXY_CPU)
            request = json.dumps({
                "command": "add", "name": name,
                "listener": {"endpoint": f"tcp:{port}:interface=127.0.0.1",
                             "to": f"tcp:host=127.0.0.1:port={backendPort}"},
            }).encode() + b"\n"
        started = time.perf_counter()
        client = subprocess.Popen(command, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            if request:
                client.stdin.write(request)  # type: ignore[union-attr]
                client.stdin.flush()  # type: ignore[union-attr]
            took = (_firstByte(port, started + timeout, process) - started) * 1000
            out, error = client.communicate(timeout=timeout)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        if client.returncode != 0 or (
                not python and not json.loads(out.splitlines()[0]).get("ok")):
            raise RuntimeError(f"control add failed: {(out + error).decode()}")
        subprocess.run(ctl("remove", name), env=env, check=True,
                       capture_output=True, timeout=timeout)
        return took

    try:
        with bench.peer(controlled, backendPort):
            process = bench.peerProcess()
            assert process is not None
            for i in range(runs):
                times.append(addWith(True, f"bench-{i}", process))
                if socat is not None:
                    socatTimes.append(addWith(False, f"bench-socat-{i}", process))
    finally:
        bench.stop(backend)
    result = spread(times)
    if socatTimes:
        result["socat"] = spread(socatTimes)
    return result


def pythonMemory(bench: Bench, pairs: int = 1000) -> dict[str, Any]:
    """
    miniproxy's Python-level view of idle pairs (see
    L{benchmarks.inproc.memoryView}).
    """
    backend, backendPort = bench.backend(greet=1)
    try:
        return inProcess(bench, "memory", str(backendPort), str(pairs))
    finally:
        bench.stop(backend)


def hookMicro(bench: Bench, flows: int = 2000, chunks: int = 20000) -> dict[str, Any]:
    """
    The no-op function's cost per flow and per chunk on the in-memory
    relay (see L{benchmarks.inproc.hookCosts}).
    """
    return inProcess(bench, "hooks", str(flows), str(chunks))
