# -*- test-case-name: tests.test_evaluation -*-
"""
What the experiments share: the transparent line of proxies, the cells of
flows through it and the lines that run them (L{measureLines}), the
model's prediction for each, the stored rows read back (L{readRows}), and
the command line with its measure-or-rebuild loop (L{arguments},
L{runExperiment}).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
from typing import Any, Callable, Iterable, Mapping, Sequence

from attrs import frozen
from twisted.internet.defer import Deferred, inlineCallbacks

from miniproxy.evaluation import report
from miniproxy.evaluation.runner import (
    ACCEPT_LISTENER,
    ACCEPT_PORT,
    DIRECT_PORT,
    EARLY_LISTENER,
    EARLY_PORT,
    Bed,
    KeepAwake,
    interleave,
    measured,
    onBed,
    removeWorkDirectory,
    transparentConfig,
    workDirectory,
)
from miniproxy.model import Mode, congestionControlNamed, predict
from miniproxy.testbed.topology import LineTopology

#: Bytes in a KB, as the paper and the model count them.
KB = 1000
#: The numbers of proxies of Figure 4 (and of the experiments on its line).
PROXIES = (0, 1, 2, 3)
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


@frozen
class Line:
    """
    One line of hosts that L{measureLines} runs cells of flows on.

    @ivar topology: The line, not yet built.
    @ivar name: Its subdirectory of the work directory.
    @ivar label: What the progress lines call it.
    @ivar modes: The modes of its cells (L{cells}).
    @ivar tag: What tags its rows besides the mode and size (C{proxies},
        C{delay}).
    @ivar seed: Seeds the order of each round of flows (L{interleave}).
    """

    topology: LineTopology
    name: str
    label: str
    modes: Sequence[str]
    tag: Mapping[str, Any]
    seed: int


@inlineCallbacks
def measureLines(
    reactor: Any,
    directory: str,
    lines: Iterable[Line],
    setUp: Callable[[Bed], Any],
    sizes: Sequence[int],
    runs: int,
    warmUp: int,
    gap: float,
    fastOpen: bool = False,
    congestionControl: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> Any:
    """
    Build each line in turn, set it up, run its cells (each mode and size)
    from one client process in rounds of shuffled order, and tear it down
    (L{onBed}).

    @param directory: Where each line's proxy configurations and logs go
        (in the line's subdirectory).
    @param setUp: Starts the server and the proxies on a built line.
    @param sizes: The flow sizes, bytes.
    @param runs: Measured flows per cell.
    @param warmUp: Flows per cell before those measured.
    @param gap: Seconds between flows.
    @param fastOpen: See L{Bed.build}.
    @param congestionControl: Another congestion control than the
        kernel's default, in every namespace (to investigate only).
    @param log: Called with a line of progress.
    @return: A L{Deferred} firing with the measured rows of every line
        (L{measured}), each tagged with its line's C{tag}.
    """
    rows: list[dict[str, Any]] = []
    for line in lines:
        where = os.path.join(directory, line.name)
        os.makedirs(where, exist_ok=True)

        def body(bed: Bed, line: Line = line) -> Deferred[list[dict[str, Any]]]:
            plan = cells(bed.line.serverAddress, line.modes, sizes, **line.tag)
            flows = interleave(plan, runs, warmUp, seed=line.seed)
            log(f"{line.label}: {len(flows)} flows")
            return bed.runFlows(flows, gap)

        results = yield onBed(reactor, line.topology, where, setUp, body, fastOpen=fastOpen,
                              congestionControl=congestionControl)
        rows += measured(results)
        log(f"{line.label}: done")
    return rows


def evenLines(
    name: str, proxyCounts: Iterable[int], modes: Callable[[int], Sequence[str]], rtt: float,
    rate: int | None,
) -> list[Line]:
    """
    The lines of Figure 4: for each number of proxies, a round trip of
    C{rtt} milliseconds split evenly over its links, tagged C{proxies}.

    @param name: The experiment's name, for the progress lines.
    @param modes: The modes to measure for a number of proxies.
    """
    return [
        Line(LineTopology(proxies=proxies, rtt=rtt, rate=rate, ipv6=False), f"proxies{proxies}",
             f"{name}: {proxies} proxies", modes(proxies), {"proxies": proxies}, proxies)
        for proxies in proxyCounts
    ]


#: The headers of the model's columns of a table of cells (L{modelColumns}).
MODEL_HEADERS = ("TTFB [p10, p90]", "model", "dev", "TTC [p10, p90]", "model", "dev", "failed")


def modelColumns(cell: Mapping[str, Any]) -> tuple[str, ...]:
    """
    A cell (L{cellStats}) against the model, for a markdown table under
    L{MODEL_HEADERS}: the median TTFB with its p10 and p90, the model's
    and the deviation, the same for the TTC, and the failed flows.
    """
    return (
        f"{report.ms(cell['ttfbMedian'])} [{report.ms(cell['ttfbP10'])}, {report.ms(cell['ttfbP90'])}]",
        report.ms(cell["ttfbModel"]), report.pct(cell["ttfbDev"]),
        f"{report.ms(cell['ttcMedian'])} [{report.ms(cell['ttcP10'])}, {report.ms(cell['ttcP90'])}]",
        report.ms(cell["ttcModel"]), report.pct(cell["ttcDev"]),
        f"{cell['failures']}/{cell['runs']}",
    )


def withinModel(cellList: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """
    The cells whose TTFB and TTC are both within
    L{report.TARGET_DEVIATION} of the model.
    """
    return [
        c for c in cellList
        if abs(c["ttfbDev"]) <= report.TARGET_DEVIATION and abs(c["ttcDev"]) <= report.TARGET_DEVIATION
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
    prog: str,
    description: str,
    flows: str,
    runs: int = RUNS,
    gap: bool = True,
    quick: int = QUICK_RUNS,
    congestionControl: bool = False,
    proxies: bool = False,
    sizes: bool = False,
) -> argparse.ArgumentParser:
    """
    The command line every experiment shares: C{--runs N}, C{--quick},
    C{--out DIRECTORY}, C{--keep DIRECTORY}, C{--no-keep-awake},
    C{--from-csv}; for sequential flows C{--gap SECONDS}; and as asked,
    C{--congestion-control NAME}, C{--proxies 0,1,...} and C{--sizes
    10,25,...}.

    @param flows: The file in C{--out} that C{--from-csv} rebuilds the
        other outputs from.
    @param runs: The measured flows per cell (or runs) by default.
    @param quick: The same with C{--quick}.
    @param congestionControl: Whether the outputs have a model column, and
        the command takes C{--congestion-control}.
    @param proxies: Whether it takes C{--proxies} (L{proxyCountsFrom}).
    @param sizes: Whether it takes C{--sizes} (L{sizesFrom}).
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.set_defaults(defaultRuns=runs, quickRuns=quick)
    parser.add_argument("--runs", type=int, default=None,
                        help=f"measured flows per cell ({runs}; {quick} with --quick)")
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
    if proxies:
        parser.add_argument("--proxies", default=",".join(map(str, PROXIES)),
                            help="numbers of proxies (0,1,2,3)")
    if sizes:
        parser.add_argument("--sizes", default=",".join(map(str, SIZES_KB)), help="flow sizes in KB")
    if congestionControl:
        parser.add_argument("--congestion-control", default=None,
                            help="set this congestion control in every namespace instead of the "
                                 "kernel's default (to investigate; not for the published results; "
                                 "a namespace may only set those in "
                                 "net.ipv4.tcp_allowed_congestion_control)")
    parser.add_argument("--from-csv", action="store_true",
                        help=f"measure nothing: rebuild the other outputs in --out from its {flows}"
                             + (" (the model anew, with --congestion-control or the one the flows "
                                "ran with)" if congestionControl else ""))
    return parser


def runsFrom(args: argparse.Namespace, runs: int | None = None, quick: int | None = None) -> int:
    """
    The measured flows per cell the command line asks for.

    @param runs: The default (else the one L{arguments} was given).
    @param quick: The default with C{--quick}, likewise.
    """
    if args.runs is not None:
        return int(args.runs)
    if args.quick:
        return quick if quick is not None else getattr(args, "quickRuns", QUICK_RUNS)
    return runs if runs is not None else getattr(args, "defaultRuns", RUNS)


def proxyCountsFrom(args: argparse.Namespace) -> list[int]:
    """
    The numbers of proxies of C{--proxies}.
    """
    return [int(p) for p in args.proxies.split(",")]


def sizesFrom(args: argparse.Namespace) -> list[int]:
    """
    The flow sizes of C{--sizes}, in bytes.
    """
    return [int(float(s) * KB) for s in args.sizes.split(",")]


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


#: An experiment's measurement: C{(reactor, work directory, the parsed
#: command line)} to a L{Deferred} of its rows.
Measure = Callable[[Any, str, argparse.Namespace], "Deferred[list[dict[str, Any]]]"]
#: An experiment's C{write(out, rows, command, machine, **options)}, which
#: writes its outputs and returns their paths.
Write = Callable[..., list[str]]
#: What an experiment's C{write} needs of the command line the rows were
#: measured with, as keyword arguments (the Fast Open run's mode).
Options = Callable[[argparse.Namespace], dict[str, Any]]


def _writeOptions(options: Options | None, measuredWith: argparse.Namespace,
                  congestionControl: str) -> dict[str, Any]:
    """
    The keyword arguments of an experiment's C{write}: its C{options} of
    the command line the rows were measured with, and if the command takes
    C{--congestion-control} (its outputs have a model column), the hosts'
    congestion control for the model.
    """
    found = options(measuredWith) if options is not None else {}
    if hasattr(measuredWith, "congestion_control"):
        found["congestionControl"] = congestionControl
    return found


def measuredOptions(parser: argparse.ArgumentParser, command: str) -> argparse.Namespace | None:
    """
    The options of the command that measured an experiment's rows (as its
    markdown recorded it), or L{None} if it is not one this parser reads.
    """
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if words[:2] != ["python", "-m"]:
        return None
    try:
        return parser.parse_known_args(words[3:])[0]
    except SystemExit:
        return None


def rebuild(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    name: str,
    flows: str,
    read: Callable[[str], list[dict[str, Any]]],
    write: Write,
    options: Options | None,
    command: str,
    before: dict[str, str],
    kernel: str,
) -> list[str]:
    """
    C{--from-csv}: rebuild an experiment's outputs in C{args.out} from the
    rows it stored there, without measuring.

    The markdown keeps the command and the machine of the measurement
    (from the markdown there, if any: L{report.readPreamble}) with a line
    C{tables rebuilt} that says when and how; C{write} gets the C{options}
    of the command that measured them (L{measuredOptions}) and the
    congestion control of C{--congestion-control}, else the one the
    markdown recorded, else the kernel's.

    @param name: The experiment's name: its markdown is C{name.md}.
    @param flows: The stored rows' file, in C{args.out}.
    @param read: Reads the rows from that file.
    @param command: This command.
    @param before: This machine (L{report.machine}).
    @param kernel: The kernel's congestion control.
    @return: The paths written.
    """
    rows = read(os.path.join(args.out, flows))
    measuredWith, measuredOn = report.readPreamble(os.path.join(args.out, f"{name}.md"))
    recorded = measuredOn.get("congestion control", "").split(" ")[0]
    info = measuredOn or dict(before)
    info["tables rebuilt"] = f"{before['date']} from the flows' CSV: `{command}`"
    measuredArgs = (measuredOptions(parser, measuredWith) if measuredWith else None) or args
    congestionControl = getattr(args, "congestion_control", None) or recorded or kernel
    return write(args.out, rows, measuredWith or command, info,
                 **_writeOptions(options, measuredArgs, congestionControl))


def runExperiment(
    argv: Sequence[str] | None,
    parser: argparse.ArgumentParser,
    name: str,
    flows: str,
    read: Callable[[str], list[dict[str, Any]]],
    measure: Measure,
    write: Write,
    options: Options | None = None,
) -> None:
    """
    An experiment's command: measure its rows in a work directory
    (L{workDirectory}, removed afterwards unless C{--keep}), with the CPUs
    kept awake (L{run}), and write its outputs; or with C{--from-csv},
    rebuild them from the stored rows (L{rebuild}).  Prints each path
    written.

    @param argv: The arguments (L{None}: C{sys.argv}).
    @param parser: Its command line, from L{arguments}.
    @param name: Its name (C{figure4}): the markdown is C{name.md}.
    @param flows: The file of its rows in C{--out}, which C{--from-csv}
        reads.
    @param read: Reads that file back (L{readFlows}, L{readRows}).
    @param measure: Measures the rows.
    @param write: Writes the outputs: C{write(out, rows, command, machine,
        **keywords)}, with the keywords of C{options} and, if the command
        takes C{--congestion-control}, C{congestionControl}: that option
        or the kernel's default (for the model's column).
    @param options: The keywords C{write} needs of the command line.
    """
    args = parser.parse_args(argv)
    before = report.machine()
    kernel = before["congestion control"]
    chosen = getattr(args, "congestion_control", None)
    if chosen:
        before["congestion control"] = f"{chosen} (set in every namespace)"
    command = report.commandLine(argv)
    if args.from_csv:
        _printPaths(rebuild(args, parser, name, flows, read, write, options, command, before, kernel))
        return

    @inlineCallbacks
    def experiment(reactor: Any) -> Any:
        directory = workDirectory(args.keep)
        try:
            rows = yield measure(reactor, directory, args)
        finally:
            removeWorkDirectory(directory, args.keep)
        _printPaths(write(args.out, rows, command, before,
                          **_writeOptions(options, args, chosen or kernel)))

    run(experiment, args, before)


def _printPaths(paths: Iterable[str]) -> None:
    for path in paths:
        print(f"wrote {path}")
