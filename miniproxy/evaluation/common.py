# -*- test-case-name: tests.test_evaluation -*-
"""
What the experiments of Figures 4 and 5 share: the transparent line of
proxies, the cells of flows through it, the model's prediction for each,
and the command line.
"""

from __future__ import annotations

import argparse
import csv
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from twisted.internet.defer import Deferred

from miniproxy.evaluation import report
from miniproxy.evaluation.runner import (
    ACCEPT_LISTENER,
    ACCEPT_PORT,
    DIRECT_PORT,
    EARLY_LISTENER,
    EARLY_PORT,
    Bed,
    KeepAwake,
    transparentConfig,
)
from miniproxy.model import Mode, congestionControlNamed, predict

#: Bytes in a KB, as the paper and the model count them.
KB = 1000
#: The flow sizes of Figures 4 and 5, in KB.
SIZES_KB = (10, 25, 50, 100, 250, 500)
#: Each link's rate, bits per second.
RATE = 100_000_000
#: Measured flows per cell.
RUNS = 20
#: Flows per cell run first and not measured (imports, caches).
WARM_UP = 2
#: Seconds between the end of one flow and the start of the next: the
#: previous flow's closing (its FIN crossing each proxy, which closes both
#: legs and writes its access-log line) is over before the next SYN comes,
#: as when flows come from different clients.  Back to back, that work
#: delays the next SYN by about 0.5 ms at each proxy (docs/evaluation.md).
GAP = 0.1
#: Measured flows per cell with C{--quick}.
QUICK_RUNS = 3

#: How each mode's flows are addressed, and the model's mode for them.
PORTS = {"direct": EARLY_PORT, "early": EARLY_PORT, "accept": ACCEPT_PORT}
MODEL_MODES = {"direct": Mode.ESF, "early": Mode.ESF, "accept": Mode.ACCEPT, "tfo": Mode.TFO_ALL}


def setUpTransparent(bed: Bed, limits: Mapping[str, Any] | None = None) -> None:
    """
    Start the server (ports L{EARLY_PORT}, L{ACCEPT_PORT}, L{DIRECT_PORT})
    and, on every proxy host, C{twistd miniproxy} with two transparent
    listeners (early and accept mode) that the host's nftables rules send
    the flows to ports 80 and 81 to (TPROXY).  Port 82 is not intercepted:
    its flows are only forwarded.
    """
    bed.startServer([EARLY_PORT, ACCEPT_PORT, DIRECT_PORT])
    for proxy in bed.line.proxies:
        bed.startProxy(
            proxy, transparentConfig(bed.line.serverAddress, limits),
            [EARLY_LISTENER, ACCEPT_LISTENER], tap=True,
        )
        bed.intercept(proxy, {EARLY_PORT: EARLY_LISTENER, ACCEPT_PORT: ACCEPT_LISTENER})


def cells(
    serverAddress: str, modes: Iterable[str], sizes: Iterable[int], **tag: Any
) -> list[dict[str, Any]]:
    """
    One flow per mode and size, addressed to the server (on the port of
    its mode), tagged with its mode, size and C{tag}.
    """
    return [
        {
            "host": serverAddress,
            "port": PORTS.get(mode, EARLY_PORT),
            "size": size,
            "fastOpen": mode == "tfo",
            "tag": {**tag, "mode": mode, "size": size},
        }
        for mode in modes
        for size in sizes
    ]


def cellStats(
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    rtts: Callable[[Mapping[str, Any]], list[float]],
    rate: float | None,
    congestionControl: str = "reno",
) -> list[dict[str, Any]]:
    """
    Summarise measured rows by cell, beside the model.

    @param keys: The tag keys that name a cell (besides C{mode} and
        C{size}, which every cell has).
    @param rtts: Each hop's round trip in seconds, for a cell's key dict.
    @param rate: The links' rate for the model.
    @param congestionControl: The hosts' congestion control, by its
        kernel name, for the model (L{congestionControlNamed}).
    @return: One dict per cell: its keys, C{sizeKB}, C{runs},
        C{failures}, and for C{ttfb}, C{ttc} and C{connect} the median,
        p10 and p90 in milliseconds, the model's C{ttfbModel} and
        C{ttcModel}, and the deviations C{ttfbDev} and C{ttcDev} (percent).
    """
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in (*keys, "mode", "size")), []).append(row)
    result = []
    for key, group in sorted(groups.items(), key=lambda item: tuple(map(_order, item[0]))):
        cell: dict[str, Any] = dict(zip((*keys, "mode", "size"), key))
        ok = [r for r in group if r["ok"]]
        cell["sizeKB"] = cell["size"] / KB
        cell["runs"] = len(group)
        cell["failures"] = len(group) - len(ok)
        for what in ("ttfb", "ttc", "connect"):
            stats = report.summarise(r[what] for r in ok if r[what] is not None)
            cell[f"{what}Median"] = stats.median
            cell[f"{what}P10"] = stats.p10
            cell[f"{what}P90"] = stats.p90
        prediction = predict(rtts(cell), cell["size"], MODEL_MODES[cell["mode"]], rate=rate,
                             congestionControl=congestionControlNamed(congestionControl))
        cell["ttfbModel"] = prediction.ttfb * 1000
        cell["ttcModel"] = prediction.ttc * 1000
        cell["ttfbDev"] = report.deviation(cell["ttfbMedian"], cell["ttfbModel"])
        cell["ttcDev"] = report.deviation(cell["ttcMedian"], cell["ttcModel"])
        result.append(cell)
    return result


_MODE_ORDER = {"direct": 0, "early": 1, "accept": 2, "tfo": 3}


def _order(value: Any) -> Any:
    if isinstance(value, str):
        return (_MODE_ORDER.get(value, 9), value)
    return (0, value)


#: The columns of a flows CSV.
FLOW_COLUMNS = ("run", "mode", "size", "ok", "connect", "ttfb", "ttc", "error")


def readRows(path: str, types: Mapping[str, Callable[[str], Any]]) -> list[dict[str, Any]]:
    """
    Read back a CSV that L{report.writeCSV} wrote, as the rows it was
    written from.

    @param types: What reads each column that is not a number of
        milliseconds (C{int}, C{str}, L{readBool}, ...); every other column
        is read as a C{float}.  An empty cell is L{None}, but in a C{str}
        column, where it is C{""}.
    @return: One dict per line, its keys in the CSV's order.
    """
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                kind = types.get(key, float)
                row[key] = kind(value) if value or kind is str else None
            rows.append(row)
    return rows


def readBool(value: str) -> bool:
    """
    A boolean as L{report.writeCSV} wrote it.
    """
    return value == "True"


def readFlows(path: str, keys: Sequence[str] | Mapping[str, Callable[[str], Any]]) -> list[dict[str, Any]]:
    """
    Read back a flows CSV (L{FLOW_COLUMNS} after the experiment's C{keys})
    as the rows its experiment measured.

    @param keys: The experiment's keys: their names (integers), or each
        name with the type that reads it (C{float} for Figure 5's delays).
    """
    types = dict(keys) if isinstance(keys, Mapping) else dict.fromkeys(keys, int)
    types.update(run=int, mode=str, size=int, ok=readBool, error=str)
    return readRows(path, types)


#: The columns of a cells CSV, after the experiment's own keys.
CELL_COLUMNS = (
    "mode", "sizeKB", "runs", "failures",
    "ttfbMedian", "ttfbP10", "ttfbP90", "ttfbModel", "ttfbDev",
    "ttcMedian", "ttcP10", "ttcP90", "ttcModel", "ttcDev",
    "connectMedian",
)


def arguments(
    prog: str, description: str, runs: int = RUNS, gap: bool = True
) -> argparse.ArgumentParser:
    """
    The command line every experiment shares: C{--runs N}, C{--quick},
    C{--out DIRECTORY}, C{--keep DIRECTORY}, and for sequential flows
    C{--gap SECONDS}.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--runs", type=int, default=None,
                        help=f"measured flows per cell ({runs}; {QUICK_RUNS} with --quick)")
    parser.add_argument("--quick", action="store_true", help="a short run: fewer flows per cell")
    parser.add_argument("--out", default=os.path.join("docs", "evaluation"),
                        help="where the CSV, PNG and markdown files go (docs/evaluation)")
    parser.add_argument("--keep", default=None,
                        help="keep the proxies' configurations and logs in this directory")
    parser.add_argument("--no-keep-awake", action="store_true",
                        help="let idle CPUs halt (by default a SCHED_IDLE process per CPU keeps "
                             "them awake: see runner.KeepAwake)")
    if gap:
        parser.add_argument("--gap", type=float, default=GAP,
                            help=f"seconds between one flow's end and the next one's start ({GAP:g})")
    return parser


def runsFrom(args: argparse.Namespace, runs: int = RUNS, quick: int = QUICK_RUNS) -> int:
    """
    The measured flows per cell the command line asks for.
    """
    if args.runs is not None:
        return int(args.runs)
    return quick if args.quick else runs


def run(main: Callable[[Any], Deferred[Any]], args: argparse.Namespace | None = None,
        before: dict[str, str] | None = None) -> None:
    """
    Run an experiment's C{main(reactor)} in the global reactor, and exit;
    unless C{args.no_keep_awake}, with the CPUs kept awake
    (L{KeepAwake}), which C{before} (the machine's description) then
    says.
    """
    from twisted.internet.task import react

    awake = args is None or not getattr(args, "no_keep_awake", False)
    if before is not None:
        before["idle CPUs"] = (
            "kept awake (a SCHED_IDLE spinner per CPU, counted in the load after)"
            if awake else "left to halt"
        )
    spinners = KeepAwake().start() if awake else None
    try:
        react(main)
    finally:
        if spinners is not None:
            spinners.stop()
