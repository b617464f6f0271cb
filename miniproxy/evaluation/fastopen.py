# -*- test-case-name: tests.test_evaluation -*-
"""
Beyond the paper: TCP Fast Open on every hop, with the destination carried
in the SYN.

C{python -m miniproxy.evaluation.fastopen [--runs N] [--quick] [--out
docs/evaluation] [--proxies 0,1,2,3] [--sizes 10,25,...] [--mode
first-data]}

The line of Figure 4 (100 ms end to end, split evenly, 100 Mb/s), with
C{net.ipv4.tcp_fastopen=3} in every namespace:

  - the client connects to the server with C{TCP_FASTOPEN_CONNECT}, so its
    request rides in its SYN once it holds a cookie;
  - p1 intercepts the flow (TPROXY, a transparent listener, which accepts
    Fast Open SYNs) and its policy sends it on to p2 with C{fastopen=yes}
    and C{carry=proxy-v2}: p1's SYN to p2 carries a PROXY v2 header naming
    the server, and the request;
  - p2 .. pn are explicit proxies: a C{tcp:9000} listener with C{explicit
    = ["proxy-v2"]} and C{trusted = ["10.0.0.0/8"]}, whose policy allows
    the server and sends the flow on in the same way (the last one to the
    server itself, C{fastopen=yes} without a carrier);
  - the server's listening socket accepts Fast Open SYNs, so it answers at
    once.

So every hop's SYN carries the request, and the first byte comes back
after one end-to-end round trip whatever the number of proxies
(L{miniproxy.model.Mode.TFO_ALL}).  The listeners run in C{first-data}
mode: the outgoing leg starts when the request (which came in the SYN) is
read, so the PROXY header and the request leave in one Fast Open SYN.  In
C{early} mode the leg starts at the SYN and writes the header at once, so
a middle proxy's SYN carries the header alone and the request follows a
hop's round trip later (C{--mode early} shows it).  Warm-up flows (not
measured) make every hop fetch its Fast Open cookie first.

Outputs: C{fastopen-flows.csv}, C{fastopen.csv}, C{fastopen.md},
C{fastopen.png}.

C{--from-csv} rebuilds the CSV of cells, the markdown and the plot from
C{fastopen-flows.csv} in C{--out}, without measuring (the model's column
anew, with C{--congestion-control} or the congestion control the flows
ran with; the mode the flows ran in is read from the command that
measured them).
"""

from __future__ import annotations

import csv
import math
import os
import shlex
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import inlineCallbacks

from miniproxy.evaluation import report
from miniproxy.evaluation.common import (
    CELL_COLUMNS,
    FLOW_COLUMNS,
    KB,
    RATE,
    GAP,
    RUNS,
    SIZES_KB,
    arguments,
    cells,
    cellStats,
    readFlows,
    run,
    runsFrom,
)
from miniproxy.evaluation.runner import (
    CHAIN_LISTENER,
    EARLY_LISTENER,
    EARLY_PORT,
    Bed,
    Listener,
    Rule,
    interleave,
    measured,
    onBed,
    proxyConfig,
    removeWorkDirectory,
    workDirectory,
)
from miniproxy.model import Mode, congestionControlNamed, evenRTTs, predict
from miniproxy.testbed.topology import CLIENT_SIDE, LineTopology

#: The end-to-end round trip, in milliseconds.
RTT = 100.0
PROXIES = (0, 1, 2, 3)
#: Warm-up flows per cell: the first fetches the cookies.
WARM_UP = 3
#: The proxies' connect mode.
MODE = "first-data"
#: The addresses trusted to carry a destination.
TRUSTED = "10.0.0.0/8"
NAME = "fastopen"


def nextHop(bed: Bed, index: int, proxies: int) -> str:
    """
    Where proxy C{index} (1 for p1) sends flows: the next proxy's explicit
    listener with Fast Open and a PROXY v2 header, or, from the last
    proxy, the server with Fast Open.
    """
    server = bed.line.serverAddress
    if index == proxies:
        return f"tcp:host={server}:port={EARLY_PORT}:fastopen=yes"
    following = bed.line.address(index + 1, CLIENT_SIDE)
    return f"tcp:host={following}:port={CHAIN_LISTENER}:fastopen=yes:carry=proxy-v2"


def setUpChain(bed: Bed, mode: str = MODE) -> None:
    """
    Start the Fast Open server and the chain of proxies (see the module
    docstring).
    """
    bed.startServer([EARLY_PORT], fastOpen=True)
    proxies = len(bed.line.proxies)
    server = bed.line.serverAddress
    tap = mode == "early"
    for index, node in enumerate(bed.line.proxies, 1):
        rule = Rule([f"{server}/32"], [EARLY_PORT], nextHop(bed, index, proxies))
        if index == 1:
            listener = Listener(
                f"tproxy:port={EARLY_LISTENER}:interface=0.0.0.0", mode,
                [EARLY_PORT] if tap else [],
            )
            bed.startProxy(node, proxyConfig([listener], [rule]), [EARLY_LISTENER], tap)
            bed.intercept(node, {EARLY_PORT: EARLY_LISTENER})
        else:
            listener = Listener(
                f"tcp:{CHAIN_LISTENER}:interface=0.0.0.0", mode, (), ["proxy-v2"], [TRUSTED]
            )
            bed.startProxy(node, proxyConfig([listener], [rule]), [CHAIN_LISTENER], tap)


@inlineCallbacks
def measure(
    reactor: Any,
    directory: str,
    proxyCounts: Sequence[int] = PROXIES,
    sizes: Sequence[int] = tuple(s * KB for s in SIZES_KB),
    runs: int = RUNS,
    rtt: float = RTT,
    rate: int | None = RATE,
    mode: str = MODE,
    warmUp: int = WARM_UP,
    gap: float = GAP,
    congestionControl: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> Any:
    """
    Run the Fast Open flows: one line per number of proxies.

    @param congestionControl: Another congestion control than the
        kernel's default, in every namespace (to investigate only).

    @return: A L{Deferred} firing with the measured rows, tagged with
        C{proxies} and mode C{tfo}.
    """
    rows: list[dict[str, Any]] = []
    for proxies in proxyCounts:
        line = LineTopology(proxies=proxies, rtt=rtt, rate=rate, ipv6=False)
        where = os.path.join(directory, f"proxies{proxies}")
        os.makedirs(where, exist_ok=True)

        def body(bed: Any, proxies: int = proxies) -> Any:
            plan = cells(bed.line.serverAddress, ["tfo"], sizes, proxies=proxies)
            flows = interleave(plan, runs, warmUp, seed=proxies)
            log(f"{NAME}: {proxies} proxies: {len(flows)} flows")
            return bed.runFlows(flows, gap)

        def setUp(bed: Bed) -> None:
            setUpChain(bed, mode)

        results = yield onBed(reactor, line, where, setUp, body, fastOpen=True,
                              congestionControl=congestionControl)
        rows += measured(results)
    return rows


def summarise(rows: Sequence[Mapping[str, Any]], rtt: float = RTT, rate: int | None = RATE,
              congestionControl: str = "reno") -> list[dict[str, Any]]:
    """
    The cells (see L{cellStats}) against L{Mode.TFO_ALL} with this
    congestion control.
    """
    return cellStats(rows, ["proxies"], lambda c: evenRTTs(rtt / 1000, c["proxies"]), rate,
                     congestionControl)


def figure4Medians(out: str) -> dict[tuple[int, str, float], tuple[float, float]]:
    """
    Figure 4's measured medians, if C{figure4.csv} is in C{out}: C{(proxies,
    mode, sizeKB) -> (TTFB, TTC)}.
    """
    path = os.path.join(out, "figure4.csv")
    found: dict[tuple[int, str, float], tuple[float, float]] = {}
    if not os.path.exists(path):
        return found
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                found[int(row["proxies"]), row["mode"], float(row["sizeKB"])] = (
                    float(row["ttfbMedian"]), float(row["ttcMedian"]))
            except (KeyError, ValueError):
                continue
    return found


def markdown(
    rows: Sequence[Mapping[str, Any]],
    cellList: Sequence[Mapping[str, Any]],
    command: str,
    before: Mapping[str, str],
    esf: Mapping[tuple[int, str, float], tuple[float, float]],
    mode: str = MODE,
    rtt: float = RTT,
    rate: int | None = RATE,
    congestionControl: str = "reno",
) -> str:
    """
    The markdown report: each cell against the model (with this
    congestion control), beside ESF (the model, and Figure 4's
    measurement when there is one).
    """
    cc = congestionControlNamed(congestionControl)
    failures = sum(1 for r in rows if not r["ok"])
    notes = (
        f"The line of Figure 4 with `net.ipv4.tcp_fastopen=3` everywhere; the client uses "
        f"`TCP_FASTOPEN_CONNECT`; p1 is transparent, p2..pn explicit (`explicit = [\"proxy-v2\"]`), "
        f"each next hop `fastopen=yes` and (between proxies) `carry=proxy-v2`; listeners in "
        f"`{mode}` mode. {len(rows)} measured flows, {failures} failed. Medians in ms with "
        "[p10, p90]; the model is `Mode.TFO_ALL` at the links' rate with the hosts' congestion "
        f"control (`{congestionControl}`); 'ESF' is Figure 4's early mode, measured "
        "(from figure4.csv, when present) and by the model."
    )
    text = [report.preamble("Beyond the paper: Fast Open on every hop", command, before, notes)]
    text.append("## Headline: TTFB and 25 KB TTC\n")
    headline = []
    for proxies in sorted({c["proxies"] for c in cellList}):
        ttfbs = [r["ttfb"] for r in rows if r["ok"] and r["proxies"] == proxies]
        ttfb = report.summarise(ttfbs).median
        model = predict(evenRTTs(rtt / 1000, proxies), 25 * KB, Mode.TFO_ALL, rate=rate,
                        congestionControl=cc)
        esfModel = predict(evenRTTs(rtt / 1000, proxies), 25 * KB, Mode.ESF, rate=rate,
                           congestionControl=cc)
        cell25 = next((c for c in cellList if c["proxies"] == proxies and c["size"] == 25 * KB), None)
        esfMode = "direct" if proxies == 0 else "early"
        measuredESF = [v for (p, m, _), v in esf.items() if p == proxies and m == esfMode]
        esfTTFB = sorted(v[0] for v in measuredESF)[len(measuredESF) // 2] if measuredESF else math.nan
        esf25 = esf.get((proxies, esfMode, 25.0), (math.nan, math.nan))[1]
        headline.append((
            proxies,
            report.ms(ttfb), report.ms(model.ttfb * 1000), report.pct(report.deviation(ttfb, model.ttfb * 1000)),
            report.ms(esfTTFB), report.ms(esfModel.ttfb * 1000),
            report.ms(cell25["ttcMedian"]) if cell25 else "–", report.ms(model.ttc * 1000),
            report.pct(report.deviation(cell25["ttcMedian"], model.ttc * 1000)) if cell25 else "–",
            report.ms(esf25), report.ms(esfModel.ttc * 1000),
        ))
    text.append(report.markdownTable(
        ["proxies", "TFO TTFB", "model", "dev", "ESF TTFB (Fig. 4)", "ESF model",
         "TFO 25 KB TTC", "model", "dev", "ESF 25 KB TTC (Fig. 4)", "ESF model"],
        headline,
    ))
    text.append("\n## Every cell against the model\n")
    text.append(report.markdownTable(
        ["proxies", "KB", "TTFB [p10, p90]", "model", "dev", "TTC [p10, p90]", "model", "dev", "failed"],
        [
            (
                c["proxies"], f"{c['sizeKB']:g}",
                f"{report.ms(c['ttfbMedian'])} [{report.ms(c['ttfbP10'])}, {report.ms(c['ttfbP90'])}]",
                report.ms(c["ttfbModel"]), report.pct(c["ttfbDev"]),
                f"{report.ms(c['ttcMedian'])} [{report.ms(c['ttcP10'])}, {report.ms(c['ttcP90'])}]",
                report.ms(c["ttcModel"]), report.pct(c["ttcDev"]),
                f"{c['failures']}/{c['runs']}",
            )
            for c in cellList
        ],
    ))
    return "\n".join(text)


def plot(cellList: Sequence[Mapping[str, Any]], esf: Mapping[tuple[int, str, float], tuple[float, float]],
         path: str) -> bool:
    """
    Draw TTC against flow size with Fast Open everywhere (solid), ESF from
    Figure 4 (dashed, when known) and the model (dotted).

    @return: Whether it was drawn.
    """
    plt = report.pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(figsize=(8, 5))
    colours = {0: "black", 1: "tab:blue", 2: "tab:orange", 3: "tab:green"}
    for proxies in sorted({c["proxies"] for c in cellList}):
        line = [c for c in cellList if c["proxies"] == proxies]
        x = [c["sizeKB"] for c in line]
        colour = colours.get(proxies)
        name = "no proxy" if proxies == 0 else f"{proxies} {'proxy' if proxies == 1 else 'proxies'}"
        axes.errorbar(
            x, [c["ttcMedian"] for c in line],
            yerr=[[c["ttcMedian"] - c["ttcP10"] for c in line], [c["ttcP90"] - c["ttcMedian"] for c in line]],
            marker="o", markersize=4, capsize=2, color=colour, label=f"{name}, Fast Open everywhere",
        )
        axes.plot(x, [c["ttcModel"] for c in line], linestyle=":", color=colour, linewidth=1)
        esfMode = "direct" if proxies == 0 else "early"
        points = sorted((k[2], v[1]) for k, v in esf.items() if k[0] == proxies and k[1] == esfMode)
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], linestyle="--", marker="s",
                      markersize=3, color=colour, alpha=0.6, label=f"{name}, ESF (Figure 4)")
    sizes = sorted({c["sizeKB"] for c in cellList})
    axes.set_xscale("log")
    axes.minorticks_off()
    axes.set_xticks(sizes)
    axes.set_xticklabels([f"{s:g}" for s in sizes])
    axes.set_xlabel("flow size (KB)")
    axes.set_ylabel("time to complete (ms)")
    axes.set_title("Fast Open on every hop (median, p10–p90; dotted: model)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7)
    report.savePlot(figure, path)
    return True


def write(out: str, rows: Sequence[Mapping[str, Any]], command: str, before: Mapping[str, str],
          mode: str = MODE, congestionControl: str = "reno") -> list[str]:
    """
    Write the outputs into directory C{out}, against the model with the
    congestion control the flows ran with.

    @return: The paths written.
    """
    os.makedirs(out, exist_ok=True)
    cellList = summarise(rows, congestionControl=congestionControl)
    esf = figure4Medians(out)
    paths = [os.path.join(out, f"{NAME}-flows.csv"), os.path.join(out, f"{NAME}.csv"),
             os.path.join(out, f"{NAME}.md")]
    report.writeCSV(paths[0], rows, ("proxies", *FLOW_COLUMNS))
    report.writeCSV(paths[1], cellList, ("proxies", *CELL_COLUMNS))
    with open(paths[2], "w") as f:
        f.write(markdown(rows, cellList, command, before, esf, mode,
                         congestionControl=congestionControl))
    png = os.path.join(out, f"{NAME}.png")
    if plot(cellList, esf, png):
        paths.append(png)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """
    C{python -m miniproxy.evaluation.fastopen}; C{--help} says more.
    """
    parser = arguments("python -m miniproxy.evaluation.fastopen", "Fast Open on every hop.")
    parser.add_argument("--proxies", default=",".join(map(str, PROXIES)),
                        help="numbers of proxies (0,1,2,3)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES_KB)), help="flow sizes in KB")
    parser.add_argument("--mode", default=MODE, help="the proxies' connect mode (first-data)")
    parser.add_argument("--congestion-control", default=None,
                        help="set this congestion control in every namespace instead of the "
                             "kernel's default (to investigate; not for the figure; a namespace may only set those in net.ipv4.tcp_allowed_congestion_control)")
    parser.add_argument("--from-csv", action="store_true",
                        help="measure nothing: rebuild the cells' CSV, the markdown and the plot in "
                             "--out from its fastopen-flows.csv (the model anew, with "
                             "--congestion-control or the one the flows ran with)")
    args = parser.parse_args(argv)
    runs = runsFrom(args)
    before = report.machine()
    congestionControl = args.congestion_control or before["congestion control"]
    if args.congestion_control:
        before["congestion control"] = f"{args.congestion_control} (set in every namespace)"
    command = report.commandLine(argv)
    if args.from_csv:
        rows = readFlows(os.path.join(args.out, f"{NAME}-flows.csv"), ["proxies"])
        measuredWith, measuredOn = report.readPreamble(os.path.join(args.out, f"{NAME}.md"))
        recorded = measuredOn.get("congestion control", "").split(" ")[0]
        measuredOn["tables rebuilt"] = f"{before['date']} from the flows' CSV: `{command}`"
        mode = parser.parse_known_args(shlex.split(measuredWith)[3:])[0].mode if measuredWith else args.mode
        for path in write(args.out, rows, measuredWith or command, measuredOn or before, mode,
                          congestionControl=args.congestion_control or recorded or congestionControl):
            print(f"wrote {path}")
        return

    @inlineCallbacks
    def experiment(reactor: Any) -> Any:
        directory = workDirectory(args.keep)
        try:
            rows = yield measure(
                reactor, directory,
                proxyCounts=[int(p) for p in args.proxies.split(",")],
                sizes=[int(float(s) * KB) for s in args.sizes.split(",")],
                runs=runs, gap=args.gap, mode=args.mode,
                congestionControl=args.congestion_control, log=print,
            )
        finally:
            removeWorkDirectory(directory, args.keep)
        for path in write(args.out, rows, command, before, args.mode,
                          congestionControl=congestionControl):
            print(f"wrote {path}")

    run(experiment, args, before)


if __name__ == "__main__":
    main()
