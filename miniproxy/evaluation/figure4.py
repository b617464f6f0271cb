# -*- test-case-name: tests.test_evaluation -*-
"""
The paper's Figure 4: time to first byte (TTFB) and time to complete (TTC)
of flows of 10 to 500 KB through 0, 1, 2 and 3 proxies.

C{python -m miniproxy.evaluation.figure4 [--runs N] [--quick] [--out
docs/evaluation] [--proxies 0,1,2,3] [--sizes 10,25,...]}

For each number of proxies, one line of hosts (L{LineTopology}): client --
p1 .. pn -- server joined by delay lines of 100 Mb/s that split the
end-to-end round trip of 100 ms evenly.  Every proxy runs C{twistd
miniproxy} with two transparent listeners, one in early mode (ESF, with a
SYN tap) and one in accept mode; the client addresses the server, on port
80 for early mode and 81 for accept mode, and each proxy on the way
intercepts the flow (TPROXY) and opens its own connection onwards, which
the next proxy intercepts in turn.  Flows run back to back from one client
process, each round of cells in a shuffled order.

Outputs in C{--out}: C{figure4-flows.csv} (every flow), C{figure4.csv}
(each cell: medians, p10, p90, the model and the deviation),
C{figure4.md} (the tables, against the paper and the model) and
C{figure4.png}.

C{--from-csv} rebuilds the CSV of cells, the markdown and the plot from
C{figure4-flows.csv} in C{--out}, without measuring (the model's column
anew, with C{--congestion-control} or the congestion control the flows
ran with, as the markdown recorded it).
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred

from miniproxy.evaluation import report
from miniproxy.evaluation.common import (
    CELL_COLUMNS,
    FLOW_COLUMNS,
    KB,
    MODEL_HEADERS,
    PROXIES,
    RATE,
    GAP,
    RUNS,
    SIZES_KB,
    WARM_UP,
    arguments,
    cellStats,
    evenLines,
    measureLines,
    modelColumns,
    proxyCountsFrom,
    readFlows,
    runExperiment,
    runsFrom,
    setUpTransparent,
    sizesFrom,
    withinModel,
)
from miniproxy.evaluation.runner import Bed
from miniproxy.model import evenRTTs

#: The end-to-end round trip, in milliseconds.
RTT = 100.0
NAME = "figure4"
#: The file of its flows, which C{--from-csv} reads.
FLOWS = f"{NAME}-flows.csv"


def modesFor(proxies: int) -> list[str]:
    """
    The modes measured with this many proxies: without a proxy there is
    only the direct path.
    """
    return ["direct"] if proxies == 0 else ["early", "accept"]


def measure(
    reactor: Any,
    directory: str,
    proxyCounts: Sequence[int] = PROXIES,
    sizes: Sequence[int] = tuple(s * KB for s in SIZES_KB),
    runs: int = RUNS,
    rtt: float = RTT,
    rate: int | None = RATE,
    warmUp: int = WARM_UP,
    gap: float = GAP,
    modes: Callable[[int], list[str]] = modesFor,
    congestionControl: str | None = None,
    log: Callable[[str], None] = lambda line: None,
    setUp: Callable[[Bed], Any] = setUpTransparent,
    fastOpen: bool = False,
    name: str = NAME,
) -> Deferred[list[dict[str, Any]]]:
    """
    Run the flows of Figure 4 (L{measureLines}), or others on its lines.

    @param directory: Where each line's proxy configurations and logs go
        (in a directory per line).
    @param proxyCounts: The numbers of proxies, one line each.
    @param sizes: The flow sizes, bytes.
    @param runs: Measured flows per cell.
    @param rtt: The end-to-end round trip, milliseconds, split evenly.
    @param rate: Each link's rate, bits per second.
    @param warmUp: Flows per cell before those measured.
    @param gap: Seconds between flows.
    @param modes: The modes to measure for a number of proxies.
    @param congestionControl: Another congestion control than the
        kernel's default, in every namespace (to investigate only).
    @param log: Called with a line of progress.
    @param setUp: Starts the server and the proxies on each line (by
        default transparent ones, L{setUpTransparent}).
    @param fastOpen: Whether to enable Fast Open in every namespace.
    @param name: The experiment's name, for the progress lines.
    @return: A L{Deferred} firing with the measured rows (see
        L{miniproxy.evaluation.runner.measured}), tagged with C{proxies}.
    """
    return measureLines(reactor, directory, evenLines(name, proxyCounts, modes, rtt, rate),
                        setUp, sizes, runs, warmUp, gap, fastOpen=fastOpen,
                        congestionControl=congestionControl, log=log)


def summarise(rows: Sequence[Mapping[str, Any]], rtt: float = RTT, rate: int | None = RATE,
              congestionControl: str = "reno") -> list[dict[str, Any]]:
    """
    The cells of Figure 4 (see L{cellStats}), with the model for evenly
    split round trips and this congestion control.
    """
    return cellStats(rows, ["proxies"], lambda c: evenRTTs(rtt / 1000, c["proxies"]), rate,
                     congestionControl)


def pooledTTFB(rows: Sequence[Mapping[str, Any]], proxies: int, mode: str) -> float:
    """
    The median TTFB of every flow (all sizes) of a number of proxies and a
    mode: the first byte does not depend on the size.
    """
    values = [r["ttfb"] for r in rows if r["ok"] and r["proxies"] == proxies and r["mode"] == mode]
    return report.summarise(values).median


def reductions(
    rows: Sequence[Mapping[str, Any]], cellList: Sequence[Mapping[str, Any]],
    rtt: float = RTT, rate: int | None = RATE, congestionControl: str = "reno",
) -> list[dict[str, Any]]:
    """
    The headline numbers for each number of proxies: how much ESF cuts the
    TTFB (pooled over sizes) and the 25 KB TTC against the direct path,
    and how much accept mode cuts the TTFB; measured, by the model, by the
    paper, and the target.
    """
    from miniproxy.model import Mode, congestionControlNamed, predict

    cc = congestionControlNamed(congestionControl)
    direct = pooledTTFB(rows, 0, "direct")
    byCell = {(c["proxies"], c["mode"], c["size"]): c for c in cellList}
    base25 = byCell.get((0, "direct", 25 * KB))
    modelBase = predict(evenRTTs(rtt / 1000, 0), 25 * KB, rate=rate, congestionControl=cc)
    out = []
    for proxies in sorted({r["proxies"] for r in rows} - {0}):
        early25 = byCell.get((proxies, "early", 25 * KB))
        model = predict(evenRTTs(rtt / 1000, proxies), 25 * KB, Mode.ESF, rate=rate,
                        congestionControl=cc)
        modelAccept = predict(evenRTTs(rtt / 1000, proxies), 25 * KB, Mode.ACCEPT, rate=rate,
                              congestionControl=cc)
        out.append({
            "proxies": proxies,
            "ttfbCut": report.reduction(pooledTTFB(rows, proxies, "early"), direct),
            "ttfbCutModel": report.reduction(model.ttfb, modelBase.ttfb),
            "ttfbCutPaper": report.PAPER_TTFB_REDUCTION.get(proxies, math.nan),
            "ttfbCutTarget": report.TARGET_TTFB_REDUCTION.get(proxies, math.nan),
            "ttc25Cut": (
                report.reduction(early25["ttcMedian"], base25["ttcMedian"])
                if early25 and base25 else math.nan
            ),
            "ttc25CutModel": report.reduction(model.ttc, modelBase.ttc),
            "ttc25CutPaper": report.PAPER_TTC25_REDUCTION.get(proxies, math.nan),
            "ttc25CutTarget": report.TARGET_TTC25_REDUCTION.get(proxies, math.nan),
            "acceptTtfbCut": report.reduction(pooledTTFB(rows, proxies, "accept"), direct),
            "acceptTtfbCutModel": report.reduction(modelAccept.ttfb, modelBase.ttfb),
        })
    return out


def _met(value: float, target: float) -> str:
    if math.isnan(value) or math.isnan(target):
        return "–"
    return "yes" if value >= target else "**no**"


def markdown(
    rows: Sequence[Mapping[str, Any]],
    cellList: Sequence[Mapping[str, Any]],
    cuts: Sequence[Mapping[str, Any]],
    command: str,
    before: Mapping[str, str],
    rtt: float = RTT,
    rate: int | None = RATE,
    congestionControl: str = "reno",
) -> str:
    """
    The markdown report of Figure 4, against the model with this
    congestion control.
    """
    failures = sum(1 for r in rows if not r["ok"])
    notes = (
        f"client -- p1 .. pn -- server, delay lines splitting {rtt:g} ms of round trip evenly, "
        f"{(rate or 0) / 1e6:g} Mb/s each way; every proxy is `twistd miniproxy` with a "
        "transparent (TPROXY) listener in early mode (ESF, SYN tap) and one in accept mode. "
        f"{len(rows)} measured flows, {failures} failed. Times are medians in ms with "
        "[p10, p90]; the model is `miniproxy.model.predict` at the links' rate with the hosts' "
        f"congestion control (`{congestionControl}`); deviation = (median − model) / model."
    )
    text = [report.preamble("Figure 4: TTFB and TTC through 0 to 3 proxies", command, before, notes)]
    text.append("## Reductions against the direct path (medians)\n")
    text.append(report.markdownTable(
        ["proxies", "ESF TTFB cut", "model", "paper", "target", "met",
         "ESF 25 KB TTC cut", "model", "paper", "target", "met", "accept TTFB cut", "model"],
        [
            (
                c["proxies"],
                report.pct(c["ttfbCut"], sign=False), report.pct(c["ttfbCutModel"], sign=False),
                report.pct(c["ttfbCutPaper"], sign=False), f"≥ {c['ttfbCutTarget']:g} %",
                _met(c["ttfbCut"], c["ttfbCutTarget"]),
                report.pct(c["ttc25Cut"], sign=False), report.pct(c["ttc25CutModel"], sign=False),
                report.pct(c["ttc25CutPaper"], sign=False), f"≥ {c['ttc25CutTarget']:g} %",
                _met(c["ttc25Cut"], c["ttc25CutTarget"]),
                report.pct(c["acceptTtfbCut"], sign=False),
                report.pct(c["acceptTtfbCutModel"], sign=False),
            )
            for c in cuts
        ],
    ))
    text.append("\n## Every cell against the model\n")
    text.append(report.markdownTable(
        ["proxies", "mode", "KB", *MODEL_HEADERS],
        [(c["proxies"], c["mode"], f"{c['sizeKB']:g}", *modelColumns(c)) for c in cellList],
    ))
    within = withinModel(cellList)
    worst = max(cellList, key=lambda c: max(abs(c["ttfbDev"]), abs(c["ttcDev"])), default=None)
    text.append(
        f"\n{len(within)} of {len(cellList)} cells have TTFB and TTC within "
        f"{report.TARGET_DEVIATION:g} % of the model"
        + (
            f"; the farthest is {worst['proxies']} proxies, {worst['mode']}, "
            f"{worst['sizeKB']:g} KB (TTFB {report.pct(worst['ttfbDev'])}, "
            f"TTC {report.pct(worst['ttcDev'])})."
            if worst else "."
        )
        + "\n"
    )
    return "\n".join(text)


def plot(cellList: Sequence[Mapping[str, Any]], path: str) -> bool:
    """
    Draw Figure 4: TTC against flow size for each number of proxies (early
    mode solid, accept mode dashed, the model dotted; bars from p10 to
    p90), and the TTFB by number of proxies.

    @return: Whether it was drawn (matplotlib is installed).
    """
    plt = report.pyplot()
    if plt is None:
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    colours = {0: "black", 1: "tab:blue", 2: "tab:orange", 3: "tab:green"}
    counts = sorted({c["proxies"] for c in cellList})
    for proxies in counts:
        colour = colours.get(proxies, None)
        for mode, style, marker in (("direct", "-", "o"), ("early", "-", "o"), ("accept", "--", "s")):
            line = [c for c in cellList if c["proxies"] == proxies and c["mode"] == mode]
            if not line:
                continue
            x = [c["sizeKB"] for c in line]
            y = [c["ttcMedian"] for c in line]
            label = "no proxy" if mode == "direct" else f"{proxies} {'proxy' if proxies == 1 else 'proxies'}, {'ESF' if mode == 'early' else 'accept'}"
            left.errorbar(x, y, yerr=report.spread(line), linestyle=style, marker=marker,
                          color=colour, label=label, capsize=2, markersize=4)
            if mode != "accept":
                left.plot(x, [c["ttcModel"] for c in line], linestyle=":", color=colour, linewidth=1)
    report.sizeAxes(left, [c["sizeKB"] for c in cellList], "TTC (median, p10–p90; dotted: model, ESF)")
    left.legend(fontsize=8)
    for mode, marker, label in (("early", "o", "ESF"), ("accept", "s", "accept")):
        points = []
        for proxies in counts:
            line = [c for c in cellList if c["proxies"] == proxies and c["mode"] in (mode, "direct")]
            if line:
                measured = report.percentile([c["ttfbMedian"] for c in line], 50)
                points.append((proxies, measured, line[0]["ttfbModel"]))
        if points:
            right.plot([p[0] for p in points], [p[1] for p in points], marker=marker,
                       label=f"{label}, measured")
            right.plot([p[0] for p in points], [p[2] for p in points], linestyle=":", marker=marker,
                       fillstyle="none", label=f"{label}, model")
    paper = [(0, 200.0)] + [(n, 200.0 * (1 - cut / 100)) for n, cut in report.PAPER_TTFB_REDUCTION.items()]
    right.plot([p[0] for p in paper], [p[1] for p in paper], "k*", label="paper (ESF)")
    right.set_xticks(sorted(set(counts) | set(report.PAPER_TTFB_REDUCTION) | {0}))
    right.set_xlabel("proxies")
    right.set_ylabel("time to first byte (ms)")
    right.set_title("TTFB (median over the sizes of the cells' medians)")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    report.savePlot(figure, path)
    return True


def write(out: str, rows: Sequence[Mapping[str, Any]], command: str, before: Mapping[str, str],
          rtt: float = RTT, rate: int | None = RATE, congestionControl: str = "reno") -> list[str]:
    """
    Write Figure 4's outputs into directory C{out}, against the model with
    the congestion control the flows ran with.

    @return: The paths written.
    """
    cellList = summarise(rows, rtt, rate, congestionControl)
    cuts = reductions(rows, cellList, rtt, rate, congestionControl)
    return report.writeOutputs(
        out, NAME,
        [("-flows", rows, ("proxies", *FLOW_COLUMNS)), ("", cellList, ("proxies", *CELL_COLUMNS))],
        markdown(rows, cellList, cuts, command, before, rtt, rate, congestionControl),
        lambda path: plot(cellList, path),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """
    C{python -m miniproxy.evaluation.figure4}; C{--help} says more.
    """
    parser = arguments("python -m miniproxy.evaluation.figure4", "The paper's Figure 4.", FLOWS,
                       proxies=True, sizes=True, congestionControl=True)

    def measureAll(reactor: Any, directory: str, args: argparse.Namespace) -> Deferred[Any]:
        return measure(reactor, directory, proxyCounts=proxyCountsFrom(args), sizes=sizesFrom(args),
                       runs=runsFrom(args), gap=args.gap,
                       congestionControl=args.congestion_control, log=print)

    runExperiment(argv, parser, NAME, FLOWS, lambda path: readFlows(path, ["proxies"]),
                  measureAll, write)


if __name__ == "__main__":
    main()
