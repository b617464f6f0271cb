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

import argparse
import csv
import math
import os
from typing import Any, Mapping, Sequence

from twisted.internet.defer import Deferred

from miniproxy.evaluation import figure4, report
from miniproxy.evaluation.common import (
    CELL_COLUMNS,
    FLOW_COLUMNS,
    KB,
    MODEL_HEADERS,
    RATE,
    arguments,
    modelColumns,
    proxyCountsFrom,
    readFlows,
    runExperiment,
    runsFrom,
    sizesFrom,
)
from miniproxy.evaluation.runner import (
    CHAIN_LISTENER,
    EARLY_LISTENER,
    EARLY_PORT,
    Bed,
    Listener,
    Rule,
    proxyConfig,
)
from miniproxy.model import Mode, congestionControlNamed, evenRTTs, predict
from miniproxy.testbed.topology import CLIENT_SIDE

#: The end-to-end round trip, in milliseconds.
RTT = figure4.RTT
#: Warm-up flows per cell: the first fetches the cookies.
WARM_UP = 3
#: The proxies' connect mode.
MODE = "first-data"
#: The addresses trusted to carry a destination.
TRUSTED = "10.0.0.0/8"
NAME = "fastopen"
#: The file of its flows, which C{--from-csv} reads.
FLOWS = f"{NAME}-flows.csv"


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


def measure(
    reactor: Any, directory: str, mode: str = MODE, warmUp: int = WARM_UP, **options: Any
) -> Deferred[list[dict[str, Any]]]:
    """
    Run the Fast Open flows on the lines of Figure 4 (L{figure4.measure}),
    with Fast Open in every namespace and the chain of proxies of
    L{setUpChain}.

    @param mode: The proxies' connect mode.
    @param warmUp: Flows per cell before those measured: the first fetch
        the cookies.
    @param options: L{figure4.measure}'s: C{proxyCounts}, C{sizes},
        C{runs}, C{rtt}, C{rate}, C{gap}, C{congestionControl}, C{log}.
    @return: A L{Deferred} firing with the measured rows, tagged with
        C{proxies} and mode C{tfo}.
    """

    def setUp(bed: Bed) -> None:
        setUpChain(bed, mode)

    return figure4.measure(reactor, directory, warmUp=warmUp, modes=lambda proxies: ["tfo"],
                           setUp=setUp, fastOpen=True, name=NAME, **options)


def summarise(rows: Sequence[Mapping[str, Any]], rtt: float = RTT, rate: int | None = RATE,
              congestionControl: str = "reno") -> list[dict[str, Any]]:
    """
    The cells (see L{cellStats}) against L{Mode.TFO_ALL} with this
    congestion control: those of Figure 4's line (L{figure4.summarise}).
    """
    return figure4.summarise(rows, rtt, rate, congestionControl)


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
        ["proxies", "KB", *MODEL_HEADERS],
        [(c["proxies"], f"{c['sizeKB']:g}", *modelColumns(c)) for c in cellList],
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
            x, [c["ttcMedian"] for c in line], yerr=report.spread(line),
            marker="o", markersize=4, capsize=2, color=colour, label=f"{name}, Fast Open everywhere",
        )
        axes.plot(x, [c["ttcModel"] for c in line], linestyle=":", color=colour, linewidth=1)
        esfMode = "direct" if proxies == 0 else "early"
        points = sorted((k[2], v[1]) for k, v in esf.items() if k[0] == proxies and k[1] == esfMode)
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], linestyle="--", marker="s",
                      markersize=3, color=colour, alpha=0.6, label=f"{name}, ESF (Figure 4)")
    report.sizeAxes(axes, [c["sizeKB"] for c in cellList],
                    "Fast Open on every hop (median, p10–p90; dotted: model)")
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
    cellList = summarise(rows, congestionControl=congestionControl)
    esf = figure4Medians(out)
    return report.writeOutputs(
        out, NAME,
        [("-flows", rows, ("proxies", *FLOW_COLUMNS)), ("", cellList, ("proxies", *CELL_COLUMNS))],
        markdown(rows, cellList, command, before, esf, mode, congestionControl=congestionControl),
        lambda path: plot(cellList, esf, path),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """
    C{python -m miniproxy.evaluation.fastopen}; C{--help} says more.
    """
    parser = arguments("python -m miniproxy.evaluation.fastopen", "Fast Open on every hop.", FLOWS,
                       proxies=True, sizes=True, congestionControl=True)
    parser.add_argument("--mode", default=MODE, help="the proxies' connect mode (first-data)")

    def measureAll(reactor: Any, directory: str, args: argparse.Namespace) -> Deferred[Any]:
        return measure(reactor, directory, proxyCounts=proxyCountsFrom(args), sizes=sizesFrom(args),
                       runs=runsFrom(args), gap=args.gap, mode=args.mode,
                       congestionControl=args.congestion_control, log=print)

    runExperiment(argv, parser, NAME, FLOWS, lambda path: readFlows(path, ["proxies"]),
                  measureAll, write, lambda options: {"mode": options.mode})


if __name__ == "__main__":
    main()
