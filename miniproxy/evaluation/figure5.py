# -*- test-case-name: tests.test_evaluation -*-
"""
The paper's Figure 5: one proxy off the direct path.  Both of its links get
a one-way delay of 25 ms (the proxy on the path, splitting the direct
path's 50 ms) up to 37.5 ms in steps of 2.5 ms (the proxy's detour adds up
to 25 ms each way), against the direct path (50 ms one way).

C{python -m miniproxy.evaluation.figure5 [--runs N] [--quick] [--out
docs/evaluation] [--delays 25,27.5,...] [--modes early[,accept]]}

Each delay is a line C{client -- p1 -- server} of its own (100 Mb/s
links), with the proxy set up as in Figure 4 (transparent, ESF); the
direct path is C{client -- server}.  Outputs: C{figure5-flows.csv},
C{figure5.csv}, C{figure5.md}, C{figure5.png}.

C{--from-csv} rebuilds the CSV of cells, the markdown and the plot from
C{figure5-flows.csv} in C{--out}, without measuring (the model's column
anew, with C{--congestion-control} or the congestion control the flows
ran with).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred

from miniproxy.evaluation import report
from miniproxy.evaluation.common import (
    CELL_COLUMNS,
    FLOW_COLUMNS,
    KB,
    MODEL_HEADERS,
    RATE,
    GAP,
    RUNS,
    SIZES_KB,
    WARM_UP,
    Line,
    arguments,
    cellStats,
    measureLines,
    modelColumns,
    readFlows,
    runExperiment,
    runsFrom,
    setUpTransparent,
    sizesFrom,
    withinModel,
)
from miniproxy.testbed.topology import LineTopology

#: The direct path's one-way delay, in milliseconds.
DIRECT_DELAY = 50.0
#: The one-way delays of each of the proxy's links, in milliseconds.
DELAYS = (25.0, 27.5, 30.0, 32.5, 35.0, 37.5)
NAME = "figure5"
#: The file of its flows, which C{--from-csv} reads.
FLOWS = f"{NAME}-flows.csv"


def measure(
    reactor: Any,
    directory: str,
    delays: Sequence[float] = DELAYS,
    sizes: Sequence[int] = tuple(s * KB for s in SIZES_KB),
    runs: int = RUNS,
    modes: Sequence[str] = ("early",),
    rate: int | None = RATE,
    warmUp: int = WARM_UP,
    gap: float = GAP,
    direct: bool = True,
    congestionControl: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> Deferred[list[dict[str, Any]]]:
    """
    Run the flows of Figure 5 (L{measureLines}): the direct path, then one
    line per delay.

    @param delays: The one-way delays of the proxy's links, milliseconds.
    @param modes: The proxy's modes to measure.
    @param direct: Whether to measure the direct path too.
    @param congestionControl: Another congestion control than the
        kernel's default, in every namespace (to investigate only).
    @return: A L{Deferred} firing with the measured rows, tagged with
        C{delay} (the one-way delay of each link; the direct path's for
        mode C{direct}).
    """
    paths: list[tuple[float, int]] = ([(DIRECT_DELAY, 0)] if direct else []) + [(d, 1) for d in delays]
    lines = [
        Line(LineTopology(proxies=proxies, delays=[delay] * (proxies + 1), rate=rate, ipv6=False),
             f"line{index}", f"{NAME}: {delay:g} ms one way, {'1 proxy' if proxies else 'direct'}",
             list(modes) if proxies else ["direct"], {"delay": delay}, index)
        for index, (delay, proxies) in enumerate(paths)
    ]
    return measureLines(reactor, directory, lines, setUpTransparent, sizes, runs, warmUp, gap,
                        congestionControl=congestionControl, log=log)


def summarise(rows: Sequence[Mapping[str, Any]], rate: int | None = RATE,
              congestionControl: str = "reno") -> list[dict[str, Any]]:
    """
    The cells of Figure 5 (see L{cellStats}), with the model for this
    congestion control: one hop of twice the direct delay, or two hops of
    twice each link's delay.
    """

    def rtts(cell: Mapping[str, Any]) -> list[float]:
        hops = 1 if cell["mode"] == "direct" else 2
        return [2 * cell["delay"] / 1000] * hops

    return cellStats(rows, ["delay"], rtts, rate, congestionControl)


def markdown(
    rows: Sequence[Mapping[str, Any]],
    cellList: Sequence[Mapping[str, Any]],
    command: str,
    before: Mapping[str, str],
    congestionControl: str = "reno",
) -> str:
    """
    The markdown report of Figure 5: each cell against the model (with
    this congestion control), and each delay's TTC against the direct
    path's.
    """
    failures = sum(1 for r in rows if not r["ok"])
    notes = (
        f"client -- p1 -- server with both links delayed by the same one-way delay, against "
        f"client -- server with {DIRECT_DELAY:g} ms one way; 100 Mb/s links; the proxy as in "
        f"Figure 4. {len(rows)} measured flows, {failures} failed. Medians in ms with [p10, p90]; "
        "'vs direct' is the TTC's change against the direct path's median (negative: the "
        "proxy helps); the model is `miniproxy.model.predict` at the links' rate with the "
        f"hosts' congestion control (`{congestionControl}`)."
    )
    text = [report.preamble("Figure 5: one proxy with longer links", command, before, notes)]
    direct = {c["size"]: c for c in cellList if c["mode"] == "direct"}
    text.append("## TTC against the direct path\n")
    sizes = sorted({c["size"] for c in cellList})
    delays = sorted({c["delay"] for c in cellList if c["mode"] != "direct"})
    modes = sorted({c["mode"] for c in cellList if c["mode"] != "direct"})
    table = []
    for size in sizes:
        base = direct.get(size)
        row: list[Any] = [f"{size / KB:g}", report.ms(base["ttcMedian"]) if base else "–"]
        for mode in modes:
            for delay in delays:
                cell = next((c for c in cellList if c["mode"] == mode and c["delay"] == delay
                             and c["size"] == size), None)
                if cell is None or base is None:
                    row.append("–")
                else:
                    change = -report.reduction(cell["ttcMedian"], base["ttcMedian"])
                    model = -report.reduction(cell["ttcModel"], base["ttcModel"])
                    row.append(f"{report.ms(cell['ttcMedian'])} ({report.pct(change, 0)}; model {report.pct(model, 0)})")
        table.append(row)
    headers = ["KB", "direct"] + [
        f"{d:g} ms" + (f" {m}" if len(modes) > 1 else "") for m in modes for d in delays
    ]
    text.append(report.markdownTable(headers, table))
    text.append("\n## Every cell against the model\n")
    text.append(report.markdownTable(
        ["one-way delay", "mode", "KB", *MODEL_HEADERS],
        [(f"{c['delay']:g}", c["mode"], f"{c['sizeKB']:g}", *modelColumns(c)) for c in cellList],
    ))
    within = withinModel(cellList)
    text.append(f"\n{len(within)} of {len(cellList)} cells have TTFB and TTC within "
                f"{report.TARGET_DEVIATION:g} % of the model.\n")
    return "\n".join(text)


def plot(cellList: Sequence[Mapping[str, Any]], path: str) -> bool:
    """
    Draw Figure 5: TTC against flow size, one line per delay and one for
    the direct path; the model dotted.

    @return: Whether it was drawn.
    """
    plt = report.pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(figsize=(8, 5))
    delays = sorted({c["delay"] for c in cellList if c["mode"] != "direct"})
    colours = plt.cm.viridis([i / max(len(delays) - 1, 1) for i in range(len(delays))])
    series = [("direct", None, "black", "no proxy (50 ms one way)")] + [
        (mode, d, colours[i], f"1 proxy, {d:g} ms per link" + ("" if mode == "early" else f", {mode}"))
        for mode in sorted({c["mode"] for c in cellList if c["mode"] != "direct"})
        for i, d in enumerate(delays)
    ]
    for mode, delay, colour, label in series:
        line = [c for c in cellList if c["mode"] == mode and (delay is None or c["delay"] == delay)]
        if not line:
            continue
        x = [c["sizeKB"] for c in line]
        axes.errorbar(
            x, [c["ttcMedian"] for c in line], yerr=report.spread(line),
            marker="o", markersize=3, capsize=2, color=colour, label=label,
            linestyle="--" if mode == "accept" else "-",
        )
        axes.plot(x, [c["ttcModel"] for c in line], linestyle=":", color=colour, linewidth=1)
    report.sizeAxes(axes, [c["sizeKB"] for c in cellList],
                    "TTC with one proxy and longer links (median, p10–p90; dotted: model)")
    axes.legend(fontsize=8)
    report.savePlot(figure, path)
    return True


def write(out: str, rows: Sequence[Mapping[str, Any]], command: str, before: Mapping[str, str],
          congestionControl: str = "reno") -> list[str]:
    """
    Write Figure 5's outputs into directory C{out}, against the model with
    the congestion control the flows ran with.

    @return: The paths written.
    """
    cellList = summarise(rows, congestionControl=congestionControl)
    return report.writeOutputs(
        out, NAME,
        [("-flows", rows, ("delay", *FLOW_COLUMNS)), ("", cellList, ("delay", *CELL_COLUMNS))],
        markdown(rows, cellList, command, before, congestionControl),
        lambda path: plot(cellList, path),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """
    C{python -m miniproxy.evaluation.figure5}; C{--help} says more.
    """
    parser = arguments("python -m miniproxy.evaluation.figure5", "The paper's Figure 5.", FLOWS,
                       sizes=True, congestionControl=True)
    parser.add_argument("--delays", default=",".join(f"{d:g}" for d in DELAYS),
                        help="one-way delays of the proxy's links, ms")
    parser.add_argument("--modes", default="early", help="the proxy's modes: early[,accept]")

    def measureAll(reactor: Any, directory: str, args: argparse.Namespace) -> Deferred[Any]:
        return measure(reactor, directory, delays=[float(d) for d in args.delays.split(",")],
                       sizes=sizesFrom(args), modes=args.modes.split(","), runs=runsFrom(args),
                       gap=args.gap, congestionControl=args.congestion_control, log=print)

    runExperiment(argv, parser, NAME, FLOWS, lambda path: readFlows(path, {"delay": float}),
                  measureAll, write)


if __name__ == "__main__":
    main()
