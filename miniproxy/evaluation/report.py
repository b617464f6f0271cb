# -*- test-case-name: tests.test_evaluation -*-
"""
What the evaluation's experiments share to report their results: the
machine they ran on, statistics, CSV files, markdown tables and plots.

Every output names the exact command that made it, the date, the machine
(C{nproc}, CPU model, kernel, Python) and the load average before and
after the run (others may share the machine).  Plots need matplotlib (the
C{evaluation} extra); without it the experiments still write their CSV and
markdown files and say the plot was skipped.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import shlex
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

from attrs import frozen

#: The paper's numbers (section 5.2 and Table 1).
PAPER_TTFB_REDUCTION = {1: 25.0, 2: 33.3, 3: 37.5}
PAPER_TTC25_REDUCTION = {1: 33.0, 2: 44.0, 3: 49.0}
PAPER_TABLE1_MS = {30: 0.1, 70: 1.0, 110: 2.0, 150: 2.0, 190: 3.0, 230: 3.0}
#: The issue's targets for the measured medians, percent.
TARGET_TTFB_REDUCTION = {1: 23.0, 2: 31.0, 3: 35.0}
TARGET_TTC25_REDUCTION = {1: 30.0, 2: 40.0, 3: 45.0}
#: How close each cell should be to the model, percent.
TARGET_DEVIATION = 5.0


def _read(path: str, default: str = "?") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def cpuModel() -> str:
    """
    The CPU's model name, from C{/proc/cpuinfo}.
    """
    for line in _read("/proc/cpuinfo", "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def loadAverage() -> str:
    """
    The 1, 5 and 15 minute load averages, as C{uptime} shows them.
    """
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine() -> dict[str, str]:
    """
    What describes the machine and the moment: date (UTC), C{nproc}, CPU
    model, kernel, Python, the host's TCP congestion control and Fast Open
    setting (new namespaces start with the same), and the load average.
    """
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": cpuModel(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "congestion control": _read("/proc/sys/net/ipv4/tcp_congestion_control"),
        "tcp_fastopen": _read("/proc/sys/net/ipv4/tcp_fastopen"),
        "load before": loadAverage(),
    }


def commandLine(argv: Sequence[str] | None = None) -> str:
    """
    The command that runs this module with these arguments, as typed.
    """
    module = sys.modules["__main__"].__spec__
    name = module.name if module is not None else os.path.basename(sys.argv[0])
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", name, *args])


@frozen
class Stats:
    """
    A summary of measured values (milliseconds when they are times).

    @ivar n: How many.
    @ivar median: The median.
    @ivar p10: The 10th percentile.
    @ivar p90: The 90th percentile.
    @ivar mean: The mean.
    @ivar p99: The 99th percentile.
    """

    n: int
    median: float
    p10: float
    p90: float
    mean: float
    p99: float


def percentile(values: Sequence[float], q: float) -> float:
    """
    The C{q}-th percentile (0 to 100) of C{values}, interpolated linearly
    between the closest ranks (numpy's default).
    """
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(values: Iterable[float]) -> Stats:
    """
    Summarise values; all L{math.nan} if there are none.
    """
    data = list(values)
    if not data:
        return Stats(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    return Stats(
        n=len(data),
        median=percentile(data, 50),
        p10=percentile(data, 10),
        p90=percentile(data, 90),
        mean=sum(data) / len(data),
        p99=percentile(data, 99),
    )


def deviation(measured: float, model: float) -> float:
    """
    How far a measurement is from the model, in percent of the model.
    """
    return (measured - model) / model * 100


def reduction(value: float, base: float) -> float:
    """
    How much lower C{value} is than C{base}, in percent of C{base}.
    """
    return (1 - value / base) * 100


def writeCSV(path: str, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """
    Write rows (dicts) as CSV with these columns; floats with 4 decimals.
    """
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(column)) for column in columns])


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else value


def markdownTable(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """
    A markdown table.
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


def ms(value: float, places: int = 1) -> str:
    """
    A number of milliseconds for a table.
    """
    return "–" if math.isnan(value) else f"{value:.{places}f}"


def pct(value: float, places: int = 1, sign: bool = True) -> str:
    """
    A percentage for a table.
    """
    if math.isnan(value):
        return "–"
    return f"{value:+.{places}f} %" if sign else f"{value:.{places}f} %"


def preamble(title: str, command: str, before: Mapping[str, str], notes: str = "") -> str:
    """
    The head of an experiment's markdown output: what it is, the command,
    the date and the machine, the load before and after.
    """
    info = dict(before)
    info.setdefault("load after", loadAverage())
    lines = [
        f"# {title}",
        "",
        "Regenerate with:",
        "",
        "```sh",
        command,
        "```",
        "",
        markdownTable(["", ""], [(key, value) for key, value in info.items()]),
    ]
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


def readPreamble(path: str) -> tuple[str, dict[str, str]]:
    """
    The command and the machine's table of a markdown output that
    L{preamble} began, so that its tables can be rebuilt from its CSV
    without measuring again (with C{load after} kept).

    @return: The command and the table, or C{("", {})} if there is no
        such file.
    """
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return "", {}
    command = ""
    if "```sh" in lines:
        command = lines[lines.index("```sh") + 1]
    info: dict[str, str] = {}
    for line in lines:
        if line.startswith("## "):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[0] and cells[0] != "---":
            info[cells[0]] = cells[1]
    return command, info


def writeOutputs(
    out: str,
    name: str,
    tables: Sequence[tuple[str, Iterable[Mapping[str, Any]], Sequence[str]]],
    markdown: str,
    plot: Callable[[str], bool] | None = None,
) -> list[str]:
    """
    Write an experiment's outputs into directory C{out} (made if needed):
    its CSV files, its markdown C{name.md} and, if it draws one, its plot
    C{name.png}.

    @param tables: Each CSV file: the suffix of its name after C{name}
        (C{"-flows"}, C{""}), its rows and its columns (L{writeCSV}).
    @param plot: Draws the plot into the path it is given and says whether
        it did (not without matplotlib).
    @return: The paths written, in that order.
    """
    os.makedirs(out, exist_ok=True)
    paths = []
    for suffix, rows, columns in tables:
        paths.append(os.path.join(out, f"{name}{suffix}.csv"))
        writeCSV(paths[-1], rows, columns)
    paths.append(os.path.join(out, f"{name}.md"))
    with open(paths[-1], "w") as f:
        f.write(markdown)
    png = os.path.join(out, f"{name}.png")
    if plot is not None and plot(png):
        paths.append(png)
    return paths


def pyplot() -> Any:
    """
    matplotlib's C{pyplot} with a non-interactive backend, or L{None} if
    matplotlib is not installed (C{pip install -e '.[evaluation]'}).
    """
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spread(cells: Sequence[Mapping[str, Any]], what: str = "ttc") -> list[list[float]]:
    """
    Error bars from each cell's median down to its p10 and up to its p90
    (of C{what}: C{ttc} or C{ttfb}), as C{errorbar}'s C{yerr} takes them.
    """
    return [[c[f"{what}Median"] - c[f"{what}P10"] for c in cells],
            [c[f"{what}P90"] - c[f"{what}Median"] for c in cells]]


def sizeAxes(axes: Any, sizes: Iterable[float], title: str) -> None:
    """
    Lay out axes of times to complete against flow sizes: the sizes (KB)
    on a logarithmic scale, each one ticked, and a light grid.
    """
    ticks = sorted(set(sizes))
    axes.set_xscale("log")
    axes.minorticks_off()
    axes.set_xticks(ticks)
    axes.set_xticklabels([f"{s:g}" for s in ticks])
    axes.set_xlabel("flow size (KB)")
    axes.set_ylabel("time to complete (ms)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)


def savePlot(figure: Any, path: str) -> None:
    """
    Save a figure as PNG and close it.
    """
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
