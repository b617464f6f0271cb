# -*- test-case-name: tests.test_evaluation -*-
"""
The paper's Table 1: connection establishment with 30 to 230 simultaneous
connection attempts through one proxy.

C{python -m miniproxy.evaluation.table1 [--runs N] [--quick] [--out
docs/evaluation] [--levels 30,70,...]}

The line is C{client -- p1 -- server} joined by plain veth pairs: no delay
line, so that what is measured is the hosts' and the proxy's own cost (the
paper's table is the proxy's establishment time), not a forwarder's (a
delay line is a Python process that would queue hundreds of handshakes
itself).  The proxy is set up as in Figure 4, with its per-source bounds
raised so that every one of the 230 connections from the one client
address begins at its SYN (C{max-pending-syns-per-source} is 64 by
default: the rest would begin at accept).

For each level K, each run starts K connections at once from one client
process (non-blocking C{connect()}s, then one event loop); each sends a
100-byte request as soon as it is connected and reads a 100-byte answer.
Three paths, in turn: through the proxy in early mode (port 80), in accept
mode (port 81), and straight through p1 without the proxy (port 82, only
forwarded).  Per connection: the connect time (C{connect()} to connected:
the handshake, which the proxy's kernel answers) and the time to first
byte (C{connect()} to the answer's first byte: the handshake, the proxy's
accept and its connection to the server, the request and the answer).

Outputs: C{table1-flows.csv}, C{table1.csv}, C{table1.md},
C{table1.png}.  C{--from-csv} rebuilds the last three from
C{table1-flows.csv} in C{--out}, without measuring.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import inlineCallbacks

from miniproxy.evaluation import report
from miniproxy.evaluation.common import (
    arguments,
    readBool,
    readRows,
    runExperiment,
    runsFrom,
    setUpTransparent,
)
from miniproxy.evaluation.runner import ACCEPT_PORT, DIRECT_PORT, EARLY_PORT, onBed
from miniproxy.evaluation.packets import WireFlow, connections
from miniproxy.testbed.topology import SERVER_SIDE, Link, LineTopology

#: Simultaneous connection attempts.
LEVELS = (30, 70, 110, 150, 190, 230)
#: Runs (bursts) per level and path.
RUNS = 10
QUICK_RUNS = 2
#: Bytes each connection asks for.
ANSWER = 100
#: The paths, and the port that takes each.
PATHS = {"early": EARLY_PORT, "accept": ACCEPT_PORT, "no proxy": DIRECT_PORT}
#: The proxy's bounds, raised above the largest level.
LIMITS = {"max-pending-syns-per-source": 1024, "max-flows-per-source": 1024}
NAME = "table1"
#: The file of its connections, which C{--from-csv} reads.
FLOWS = f"{NAME}-flows.csv"
#: Its columns.
FLOW_COLUMNS = ("level", "path", "run", "index", "ok", "connect", "ttfb", "clientConnect",
                "clientTtfb", "proxyEstablish", "error")


@inlineCallbacks
def measure(
    reactor: Any,
    directory: str,
    levels: Sequence[int] = LEVELS,
    runs: int = RUNS,
    paths: Mapping[str, int] = PATHS,
    size: int = ANSWER,
    log: Callable[[str], None] = lambda line: None,
) -> Any:
    """
    Run Table 1's bursts on one zero-delay line.

    @return: A L{Deferred} firing with one row per connection (see
        L{row}).
    """
    line = LineTopology(proxies=1, links=[Link(veth=True), Link(veth=True)], ipv6=False)
    os.makedirs(directory, exist_ok=True)

    @inlineCallbacks
    def body(bed: Any) -> Any:
        rows: list[dict[str, Any]] = []
        server = bed.line.serverAddress
        proxy = bed.line.proxies[0]
        capture = bed.capture(bed.line.client, bed.line.interface(bed.line.client, SERVER_SIDE))
        # A warm-up burst per path, not measured.
        for port in paths.values():
            yield bed.runBurst(server, port, 10, size)
        capture.read()
        logged = len(bed.accessLog(proxy.shortName))
        for level in levels:
            for runIndex in range(runs):
                for path, port in paths.items():
                    results = yield bed.runBurst(server, port, level, size)
                    wire = connections(capture.read(), port)
                    events = bed.accessLog(proxy.shortName)
                    flows = proxyFlows(events[logged:])
                    logged = len(events)
                    for result in results:
                        rows.append(row(level, path, runIndex, result, wire, flows))
            log(f"{NAME}: {level} simultaneous connections: done")
        if capture.dropped:
            raise RuntimeError(f"the capture on the client's device lost {capture.dropped} packets")
        return rows

    def setUp(bed: Any) -> None:
        setUpTransparent(bed, LIMITS)

    rows = yield onBed(reactor, line, directory, setUp, body)
    return rows


def proxyFlows(events: Sequence[Mapping[str, Any]]) -> dict[int, Mapping[str, float | None]]:
    """
    The proxy's times of each flow in access-log events, by the client's
    port.
    """
    flows = {}
    for event in events:
        client = str(event.get("client", ""))
        if ":" in client:
            flows[int(client.rsplit(":", 1)[1])] = event["times"]
    return flows


def _ms(start: float | None, end: float | None, scale: float) -> float | None:
    if start is None or end is None:
        return None
    return (end - start) * scale


def row(
    level: int,
    path: str,
    runIndex: int,
    result: Mapping[str, Any],
    wire: Mapping[int, WireFlow],
    flows: Mapping[int, Mapping[str, float | None]],
) -> dict[str, Any]:
    """
    One connection's row: what the client saw, what the capture on its
    device saw, and what the proxy logged.

    @return: C{level}, C{path}, C{run}, C{index}, C{ok}, C{error}; in ms:
        C{connect} and C{ttfb} (the capture: SYN to SYN-ACK, SYN to the
        first byte of the answer), C{clientConnect} and C{clientTtfb} (the
        client program's own clock), C{proxyEstablish} (the proxy's log:
        from the flow's SYN, or its accept in accept mode, to its
        connection to the server being made).
    """
    port = result.get("port")
    flow = wire.get(port) if port else None
    times = flows.get(port) if port else None
    out: dict[str, Any] = {
        "level": level, "path": path, "run": runIndex, "index": result.get("tag"),
        "ok": bool(result.get("ok")), "error": result.get("error", ""),
        "connect": flow.ms(flow.synAck) if flow else None,
        "ttfb": flow.ms(flow.firstData) if flow else None,
        "clientConnect": _ms(0, result.get("connect"), 1000),
        "clientTtfb": _ms(0, result.get("ttfb"), 1000),
        "proxyEstablish": None,
    }
    if times:
        begin = times.get("synSeen") or times.get("accepted")
        out["proxyEstablish"] = _ms(begin, times.get("outgoingConnected"), 1000)
    if out["ok"] and (out["connect"] is None or out["ttfb"] is None):
        out["ok"] = False
        out["error"] = "not seen in the capture"
    return out


def summarise(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """
    Each level and path: the mean and p99 of the connect time and of the
    time to first byte, the failures, and the proxy's cost (its mean time
    to first byte less the path without the proxy's).
    """
    out = []
    levels = sorted({r["level"] for r in rows})
    paths = list(dict.fromkeys(r["path"] for r in rows))
    for level in levels:
        base = None
        cells = []
        for path in paths:
            group = [r for r in rows if r["level"] == level and r["path"] == path]
            ok = [r for r in group if r["ok"]]
            connect = report.summarise(r["connect"] for r in ok)
            ttfb = report.summarise(r["ttfb"] for r in ok)
            establish = report.summarise(
                r["proxyEstablish"] for r in ok if r.get("proxyEstablish") is not None)
            clientTtfb = report.summarise(r["clientTtfb"] for r in ok if r.get("clientTtfb") is not None)
            cell = {
                "level": level, "path": path, "connections": len(group),
                "failures": len(group) - len(ok),
                "connectMean": connect.mean, "connectMedian": connect.median, "connectP99": connect.p99,
                "ttfbMean": ttfb.mean, "ttfbMedian": ttfb.median, "ttfbP99": ttfb.p99,
                "establishMean": establish.mean, "establishP99": establish.p99,
                "clientTtfbMean": clientTtfb.mean,
                "paperMs": report.PAPER_TABLE1_MS.get(level, float("nan")),
            }
            if path == "no proxy":
                base = cell
            cells.append(cell)
        for cell in cells:
            cell["proxyCostMean"] = cell["ttfbMean"] - base["ttfbMean"] if base else float("nan")
        out += cells
    return out


COLUMNS = ("level", "path", "connections", "failures", "connectMean", "connectMedian",
           "connectP99", "ttfbMean", "ttfbMedian", "ttfbP99", "proxyCostMean", "establishMean",
           "establishP99", "clientTtfbMean", "paperMs")


def markdown(rows: Sequence[Mapping[str, Any]], cells: Sequence[Mapping[str, Any]],
             command: str, before: Mapping[str, str]) -> str:
    """
    The markdown report of Table 1.
    """
    runs = len({r["run"] for r in rows})
    notes = (
        "client -- p1 -- server joined by veth pairs (no delay); the proxy as in Figure 4 with "
        f"`max-pending-syns-per-source` and `max-flows-per-source` at 1024. {runs} runs per level "
        "and path, each starting the level's connections at once from one client process. "
        "Times in ms: *connect* is the handshake (answered by p1's kernel on the proxied paths, "
        "by the server's on the direct one); *first byte* is from `connect()` to the first byte "
        "of the 100-byte answer; *proxy cost* is the proxied path's mean first byte less the "
        "direct path's at the same level. The paper's Table 1 gives the average establishment "
        "time of its userspace-TCP proxy."
    )
    text = [report.preamble("Table 1: simultaneous connection attempts through one proxy",
                            command, before, notes)]
    levels = sorted({c["level"] for c in cells})
    byKey = {(c["level"], c["path"]): c for c in cells}
    text.append("## The table\n")
    headers = ["simultaneous connections", *[str(level) for level in levels]]
    table = [["paper: average establishment (ms)",
              *[f"{report.PAPER_TABLE1_MS.get(level, float('nan')):g}" for level in levels]]]
    for path in dict.fromkeys(c["path"] for c in cells):
        table.append([f"{path}: connect, mean / p99",
                      *[f"{report.ms(byKey[level, path]['connectMean'], 2)} / "
                        f"{report.ms(byKey[level, path]['connectP99'], 2)}" for level in levels]])
        table.append([f"{path}: first byte, mean / p99",
                      *[f"{report.ms(byKey[level, path]['ttfbMean'], 2)} / "
                        f"{report.ms(byKey[level, path]['ttfbP99'], 2)}" for level in levels]])
        if path != "no proxy":
            table.append([f"{path}: proxy cost (mean)",
                          *[report.ms(byKey[level, path]["proxyCostMean"], 2) for level in levels]])
            table.append([f"{path}: split connection established (proxy's log), mean / p99",
                          *[f"{report.ms(byKey[level, path]['establishMean'], 2)} / "
                            f"{report.ms(byKey[level, path]['establishP99'], 2)}" for level in levels]])
        table.append([f"{path}: failures",
                      *[f"{byKey[level, path]['failures']}/{byKey[level, path]['connections']}"
                        for level in levels]])
    text.append(report.markdownTable(headers, table))
    return "\n".join(text)


def plot(cells: Sequence[Mapping[str, Any]], path: str) -> bool:
    """
    Draw Table 1: mean connect time and time to first byte by level, per
    path, with the paper's numbers.

    @return: Whether it was drawn.
    """
    plt = report.pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(figsize=(11, 5))
    levels = sorted({c["level"] for c in cells})
    for name, colour in (("early", "tab:blue"), ("accept", "tab:orange"), ("no proxy", "black")):
        line = [c for c in cells if c["path"] == name]
        if not line:
            continue
        axes.plot([c["level"] for c in line], [c["ttfbMean"] for c in line], marker="o",
                  color=colour, label=f"{name}: first byte (mean)")
        axes.plot([c["level"] for c in line], [c["connectMean"] for c in line], marker="s",
                  linestyle="--", color=colour, label=f"{name}: connect (mean)")
        if name != "no proxy":
            axes.plot([c["level"] for c in line], [c["establishMean"] for c in line], marker="^",
                      linestyle=":", color=colour, label=f"{name}: split connection established (mean)")
    axes.plot(levels, [report.PAPER_TABLE1_MS.get(level, float("nan")) for level in levels], "k*",
              markersize=10, label="paper (its proxy's establishment)")
    axes.set_yscale("log")
    axes.set_xlabel("simultaneous connection attempts")
    axes.set_ylabel("ms (log scale)")
    axes.set_title("Table 1: establishment through one proxy (zero-delay links)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    report.savePlot(figure, path)
    return True


def write(out: str, rows: Sequence[Mapping[str, Any]], command: str, before: Mapping[str, str]) -> list[str]:
    """
    Write Table 1's outputs into directory C{out}.

    @return: The paths written.
    """
    cells = summarise(rows)
    return report.writeOutputs(
        out, NAME, [("-flows", rows, FLOW_COLUMNS), ("", cells, COLUMNS)],
        markdown(rows, cells, command, before), lambda path: plot(cells, path),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """
    C{python -m miniproxy.evaluation.table1}; C{--help} says more.
    """
    parser = arguments("python -m miniproxy.evaluation.table1", "The paper's Table 1.", FLOWS,
                       RUNS, gap=False, quick=QUICK_RUNS)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)),
                        help="simultaneous connection attempts")

    def measureAll(reactor: Any, directory: str, args: argparse.Namespace) -> Any:
        return measure(reactor, directory, levels=[int(x) for x in args.levels.split(",")],
                       runs=runsFrom(args), log=print)

    def read(path: str) -> list[dict[str, Any]]:
        return readRows(path, {"level": int, "path": str, "run": int, "index": int, "ok": readBool,
                               "error": str})

    runExperiment(argv, parser, NAME, FLOWS, read, measureAll, write)


if __name__ == "__main__":
    main()
