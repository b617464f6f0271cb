# -*- test-case-name: tests.test_benchmarks -*-
"""
The one command: C{python -m benchmarks.run [--quick] [--out DIR]}.

It installs what it lacks (HAProxy, socat, iperf3, a C compiler from apt;
matplotlib and, with C{--profile}, py-spy from pip), then measures every
peer of L{benchmarks.peers.PEERS} on loopback, with the proxy on core 0
and the load generators and backends on core 1, and writes the raw
results (JSON, CSV), a markdown table and plots to C{DIR}
(C{docs/performance} by default).  See C{docs/performance.md}.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from attrs import asdict, frozen

from benchmarks import measure, native
from benchmarks.peers import (
    MINIPROXY_ACCEPT,
    MINIPROXY_NOOP,
    MINIPROXY_USERSPACE,
    PEERS,
    REPO,
    Peer,
    cpuCount,
    pinSelf,
)

#: The apt packages the peers and tools come from, by executable.
APT_PACKAGES = {
    "haproxy": "haproxy",
    "socat": "socat",
    "iperf3": "iperf3",
    "taskset": "util-linux",
    "gcc": "gcc",
}


@frozen
class Sizes:
    """
    How big each measurement is.

    @ivar throughputSeconds: iperf3's C{-t}.
    @ivar burstSizes: The numbers of simultaneous connection attempts.
    @ivar burstRepeats: Bursts per size, pooled.
    @ivar shortClients: Concurrent short-flow clients.
    @ivar shortSeconds: How long the short flows run.
    @ivar idlePairs: Idle pairs held for the memory measurement.
    @ivar coldRuns: Cold starts per peer.
    @ivar listenerRuns: Listeners added per connect mode.
    @ivar hookFlows: Flows per run of the in-memory hook benchmark.
    @ivar hookChunks: Chunks per run of the in-memory hook benchmark.
    @ivar hookRounds: Alternating runs with and without the no-op
        function, each.
    @ivar rounds: Rounds of the throughput, short-flow and simultaneous
        connection measurements over all peers; the best counts.
    """

    throughputSeconds: float = 5.0
    burstSizes: tuple[int, ...] = (30, 70, 110, 150, 190, 230)
    burstRepeats: int = 3
    shortClients: int = 50
    shortSeconds: float = 5.0
    idlePairs: int = 1000
    coldRuns: int = 7
    listenerRuns: int = 20
    hookFlows: int = 1000
    hookChunks: int = 10000
    hookRounds: int = 2
    rounds: int = 3


FULL = Sizes()
QUICK = Sizes(
    throughputSeconds=2.0,
    burstSizes=(30, 110, 230),
    burstRepeats=1,
    shortSeconds=1.5,
    idlePairs=500,
    coldRuns=3,
    listenerRuns=5,
    hookFlows=500,
    hookChunks=5000,
    hookRounds=1,
    rounds=1,
)

#: Every measurement, in order.
MEASUREMENTS = (
    "throughput",
    "simultaneous",
    "shortFlows",
    "idleMemory",
    "coldStart",
    "startupImports",
    "pythonMemory",
    "newListener",
    "controlAdd",
    "hookComparison",
    "hookMicro",
)


def ensureTools(peers: Sequence[Peer], profile: bool, log: Callable[[str], None]) -> None:
    """
    Install, with apt and pip, what the run needs and lacks.
    """
    wanted = {"iperf3", "taskset"} | {n for p in peers for n in p.needs}
    if native.compiler() is None:
        wanted.add("gcc")
    missing = sorted(APT_PACKAGES[n] for n in wanted if shutil.which(n) is None)
    if missing:
        log(f"installing from apt: {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       env=env, check=True)
    pip = []
    if importlib.util.find_spec("matplotlib") is None:
        pip.append("matplotlib")
    if profile and shutil.which("py-spy") is None:
        pip.append("py-spy")
    if pip:
        log(f"installing from pip: {' '.join(pip)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pip], check=True)


def _version(command: Sequence[str]) -> str | None:
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else None


def _socatVersion() -> str | None:
    try:
        result = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in result.stdout.splitlines():
        if line.startswith("socat version"):
            return " ".join(line.split()[:3])
    return None


def machine() -> dict[str, Any]:
    """
    What the run ran on.
    """
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import twisted

    return {
        "nproc": os.cpu_count(),
        "usableCpus": cpuCount(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "haproxy": _version(["haproxy", "-v"]),
        "socat": _socatVersion(),
        "iperf3": _version(["iperf3", "--version"]),
    }


def loadAverage() -> list[float]:
    """
    The 1, 5 and 15 minute load averages.
    """
    return [round(x, 2) for x in os.getloadavg()]


#: The measurements that run in rounds, and how the best round is chosen:
#: the one with the highest (C{max}) or lowest (C{min}) key.
ROUNDED: dict[str, tuple[Callable[..., Any], Callable[[dict[str, Any]], float]]] = {
    "throughput": (max, lambda r: r["gbps"]),
    "shortFlows": (max, lambda r: r["flowsPerSecond"]),
    "simultaneous": (min, lambda r: sum(
        s["firstByteMeanMs"] if s["firstByteMeanMs"] is not None else float("inf")
        for s in r.values())),
}


def measureOne(bench: measure.Bench, peer: Peer, name: str, sizes: Sizes) -> Any:
    """
    Run the measurement C{name} once against C{peer}.
    """
    if name == "throughput":
        return measure.throughput(bench, peer, sizes.throughputSeconds)
    if name == "simultaneous":
        return measure.simultaneous(bench, peer, sizes.burstSizes, sizes.burstRepeats)
    if name == "shortFlows":
        return measure.shortFlows(bench, peer, sizes.shortClients, sizes.shortSeconds)
    if name == "idleMemory":
        return measure.idleMemory(bench, peer, sizes.idlePairs)
    if name == "coldStart":
        return measure.coldStart(bench, peer, sizes.coldRuns)
    if name == "startupImports":
        return measure.startupImports(sizes.coldRuns)
    if name == "pythonMemory":
        return measure.pythonMemory(bench, sizes.idlePairs)
    if name == "newListener":
        return measure.newListener(bench, sizes.listenerRuns)
    if name == "controlAdd":
        return measure.controlAdd(bench, peer, sizes.listenerRuns)
    if name == "hookComparison":
        return measure.hookComparison(
            bench, MINIPROXY_USERSPACE, MINIPROXY_NOOP, sizes.hookRounds, sizes.shortClients,
            sizes.shortSeconds, sizes.throughputSeconds)
    if name == "hookMicro":
        return measure.hookMicro(bench, sizes.hookFlows, sizes.hookChunks)
    raise ValueError(name)


#: The measurements only miniproxy (C{miniproxy-accept}) takes part in.
MINIPROXY_ONLY = ("startupImports", "pythonMemory", "newListener", "controlAdd",
                  "hookComparison", "hookMicro")


def takesPart(peer: Peer, name: str) -> bool:
    """
    Whether C{peer} is measured by C{name}.
    """
    if name in MINIPROXY_ONLY:
        return peer.name == MINIPROXY_ACCEPT.name
    return peer.takesPart(name)


def runMeasurements(bench: measure.Bench, peers: Sequence[Peer], sizes: Sizes,
                    measurements: Sequence[str], results: dict[str, dict[str, Any]],
                    log: Callable[[str], None]) -> None:
    """
    Run each measurement against every peer in turn, measurement by
    measurement, so that the peers compared in one table are measured
    close together in time.  The measurements of L{ROUNDED} run
    C{sizes.rounds} times over all peers; the best round of each peer
    counts, and every round is kept under C{rounds}.
    """
    for name in MEASUREMENTS:
        if name not in measurements:
            continue
        rounds = sizes.rounds if name in ROUNDED else 1
        for round in range(rounds):
            for peer in peers:
                if "error" in results[peer.name] or not takesPart(peer, name):
                    continue
                started = time.monotonic()
                try:
                    result = measureOne(bench, peer, name, sizes)
                except Exception as e:  # a peer's failure is a result, not the end
                    result = {"error": f"{type(e).__name__}: {e}"}
                log(f"{name} {round + 1}/{rounds}: {peer.name} "
                    f"({time.monotonic() - started:.1f} s)")
                if rounds == 1:
                    results[peer.name][name] = result
                else:
                    results[peer.name].setdefault(f"{name}Rounds", []).append(result)
        if rounds > 1:
            pick, key = ROUNDED[name]
            for peer in peers:
                every = results[peer.name].pop(f"{name}Rounds", None)
                if not every:
                    continue
                good = [r for r in every if isinstance(r, dict) and "error" not in r]
                best = dict(pick(good, key=key)) if good else dict(every[-1])
                best["rounds"] = [key(r) if r in good else r for r in every]
                results[peer.name][name] = best


def runProfiles(bench: measure.Bench, sizes: Sizes, out: Path,
                log: Callable[[str], None]) -> dict[str, Any]:
    """
    Sample miniproxy with py-spy during a short-flow run and a throughput
    run of their own (so that sampling touches no other figure).
    """
    profiles: dict[str, Any] = {}
    peer = MINIPROXY_ACCEPT
    for kind, f in (
        ("shortFlows", lambda: measure.shortFlows(
            bench, peer, sizes.shortClients, sizes.shortSeconds,
            profileTo=out / "profile-shortflows.txt")),
        ("throughput", lambda: measure.throughput(
            bench, peer, sizes.throughputSeconds,
            profileTo=out / "profile-throughput.txt")),
    ):
        try:
            profiles[kind] = f().get("profile")
        except Exception as e:
            profiles[kind] = {"error": f"{type(e).__name__}: {e}"}
        log(f"profile of {kind}: {peer.name}")
    return profiles


def hookOverhead(peers: dict[str, Any]) -> dict[str, Any] | None:
    """
    What the no-op function costs: the real-socket comparison and the
    in-memory figures of the C{miniproxy-accept} peer, together.
    """
    plain = peers.get(MINIPROXY_ACCEPT.name, {})
    result: dict[str, Any] = {}
    comparison = plain.get("hookComparison")
    if isinstance(comparison, dict) and "perFlowUs" in comparison:
        result.update(comparison)
    micro = plain.get("hookMicro")
    if isinstance(micro, dict) and "perFlowUs" in micro:
        result["inMemoryPerFlowUs"] = micro["perFlowUs"]
        result["inMemoryPerChunkNs"] = micro["perChunkNs"]
        result["dispatchFlowUs"] = micro["dispatchFlowUs"]
        result["dispatchChunkNs"] = micro["dispatchChunkNs"]
    return result or None


def runAll(out: Path, sizes: Sizes = FULL, peers: Sequence[Peer] = PEERS,
           measurements: Sequence[str] = MEASUREMENTS, profile: bool = False,
           command: str = "", doc: Path | None = None, plots: bool = True,
           log: Callable[[str], None] = print, pin: bool = True) -> dict[str, Any]:
    """
    Run the benchmarks and write the results to C{out}.

    @param out: The output directory.
    @param sizes: How big each measurement is.
    @param peers: The peers to measure (ratios need HAProxy among them).
    @param measurements: Which of L{MEASUREMENTS} to run.
    @param profile: Sample miniproxy with py-spy during its short-flow and
        throughput runs.
    @param command: The command line to record.
    @param doc: A markdown file whose results section (between the
        C{<!-- results:begin -->} and C{<!-- results:end -->} lines) is
        replaced with the new table.
    @param plots: Whether to draw the plots.
    @param pin: Whether to move this process to the load generators'
        core (the peers are pinned to theirs either way).
    @param log: Where progress lines go.  Set C{BENCH_WORKDIR} to keep the
        peers' configs and logs in that directory.
    @return: Everything measured, as written to C{results.json}.
    """
    from benchmarks import report

    out.mkdir(parents=True, exist_ok=True)
    if pin:
        pinSelf()
    binary = native.build()
    started = datetime.datetime.now(datetime.timezone.utc)
    results: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(),
        "loadBefore": loadAverage(),
        "sizes": json.loads(json.dumps(asdict(sizes))),
        "placement": {
            "proxyCpu": 0 if cpuCount() >= 2 else None,
            "loadCpu": 1 if cpuCount() >= 2 else None,
        },
        "peers": {},
    }
    with tempfile.TemporaryDirectory(prefix="miniproxy-bench-") as tmp:
        workdir = Path(os.environ.get("BENCH_WORKDIR") or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        bench = measure.Bench(workdir, binary)
        try:
            for peer in peers:
                missing = peer.missing()
                results["peers"][peer.name] = {"label": peer.label}
                if missing:
                    results["peers"][peer.name]["error"] = (
                        f"not installed: {', '.join(missing)}")
            runMeasurements(bench, peers, sizes, measurements, results["peers"], log)
            if profile and MINIPROXY_ACCEPT in peers:
                results["peers"][MINIPROXY_ACCEPT.name]["profiles"] = runProfiles(
                    bench, sizes, out, log)
        finally:
            bench.close()
    results["loadAfter"] = loadAverage()
    results["elapsedSeconds"] = (
        datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    results["hookOverhead"] = hookOverhead(results["peers"])
    report.write(results, out, plots=plots, doc=doc)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """
    Parse the command line, install what is missing, and run.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark miniproxy beside HAProxy, socat and Twisted's portforward.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: the whole run in about two minutes")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "performance",
                        help="where results go (default: docs/performance)")
    parser.add_argument("--peers", default=",".join(p.name for p in PEERS),
                        help="comma-separated peers (default: all)")
    parser.add_argument("--only", default=",".join(MEASUREMENTS),
                        help="comma-separated measurements (default: all)")
    parser.add_argument("--profile", action="store_true",
                        help="sample miniproxy with py-spy (short flows, throughput)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not install missing tools with apt or pip")
    parser.add_argument("--no-doc", action="store_true",
                        help="do not update the results section of docs/performance.md")
    args = parser.parse_args(argv)
    byName = {p.name: p for p in PEERS}
    try:
        peers = [byName[n] for n in args.peers.split(",") if n]
    except KeyError as e:
        parser.error(f"unknown peer {e}; known: {', '.join(byName)}")
    measurements = [m for m in args.only.split(",") if m]
    for m in measurements:
        if m not in MEASUREMENTS:
            parser.error(f"unknown measurement {m!r}; known: {', '.join(MEASUREMENTS)}")
    if not args.no_install:
        ensureTools(peers, args.profile, print)
    sizes = QUICK if args.quick else FULL
    command = shlex.join(["python", "-m", "benchmarks.run", *(argv if argv is not None
                                                              else sys.argv[1:])])
    doc = None
    if not args.no_doc and args.out.resolve() == (REPO / "docs" / "performance").resolve():
        doc = REPO / "docs" / "performance.md"
    results = runAll(args.out, sizes, peers, measurements, args.profile, command, doc)
    print(f"done in {results['elapsedSeconds']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
