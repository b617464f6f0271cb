# -*- test-case-name: tests.test_benchmarks -*-
"""
Writing a run's results: C{results.json} (everything), C{results.csv} (one
row per peer and figure, with its ratio to HAProxy), C{results.md} (the
tables) and the plots.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

from benchmarks.peers import REFERENCE

#: The markers of the results section of a markdown document.
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"

#: miniproxy's targets, as (key, description, comparison, bound); the bound
#: is absolute, or a ratio to a peer when the key ends with "Ratio".
TARGETS = (
    ("throughputVsSplice", "throughput ≥ 1.0× HAProxy forced splice", ">=", 1.0),
    ("firstByteVsHAProxy", "first byte (mean, each of 30–230 connects) ≤ 1.0× HAProxy", "<=", 1.0),
    ("burstFailures", "no failures at 30–230 simultaneous connects", "<=", 0),
    ("shortFlowsVsHAProxy", "short-flow rate ≥ 0.6× HAProxy", ">=", 0.6),
    ("memoryKiB", "memory ≤ 3.3 KB per idle pair", "<=", 3.3),
    ("coldStartMs", "cold start ≤ 100 ms", "<=", 100.0),
    ("newListenerMs", "new listener ≤ 2 ms (to first byte)", "<=", 2.0),
)


#: Figures measured earlier on this kind of machine, by peer and figure
#: (the keys of L{figures}).
REFERENCE_FIGURES: dict[str, dict[str, float]] = {
    "direct": {"throughputGbps": 23.6, "firstByteMeanMs": 0.5, "shortFlowsPerSecond": 17400},
    "haproxy": {"throughputGbps": 12.4, "firstByteMeanMs": 3.3, "shortFlowsPerSecond": 14700,
                "memoryKiBPerPair": 3.3, "coldStartMs": 28},
    "haproxy-splice": {"throughputGbps": 14.7},
    "portforward": {"throughputGbps": 11.8, "shortFlowsPerSecond": 6300,
                    "memoryKiBPerPair": 2.5, "coldStartMs": 127},
    "socat": {"throughputGbps": 7.8, "shortFlowsPerSecond": 1600, "memoryKiBPerPair": 64},
}

_FIGURE_NAMES = {
    "throughputGbps": "throughput, Gbit/s",
    "firstByteMeanMs": "TTFB at 230 connects, ms",
    "shortFlowsPerSecond": "short flows/s",
    "memoryKiBPerPair": "memory per idle pair, KB",
    "coldStartMs": "cold start, ms",
}


def referenceComparison(results: dict[str, Any]) -> list[str]:
    """
    Markdown rows setting this run's figures beside L{REFERENCE_FIGURES},
    each also as a ratio to HAProxy's (which cancels out most of a
    difference in machine speed).
    """
    peers = results["peers"]
    sizes = burstSizes(results)
    largest = sizes[-1] if sizes else None
    mine = {name: figures(peer, largest) for name, peer in peers.items()}
    rows = [
        "| peer | figure | reference | ratio to HAProxy | this run | ratio to HAProxy |",
        "|---|---|---|---|---|---|",
    ]
    for name, reference in REFERENCE_FIGURES.items():
        for key, value in reference.items():
            now = mine.get(name, {}).get(key)
            # socat's memory is its children's private memory: compare PSS.
            if name == "socat" and key == "memoryKiBPerPair":
                now = mine.get(name, {}).get("memoryPssKiBPerPair")
            refRatio = ratio(value, REFERENCE_FIGURES["haproxy"].get(key))
            nowRatio = ratio(now, mine.get("haproxy", {}).get(key))
            label = peers.get(name, {}).get("label", name)
            rows.append(
                f"| {label} | {_FIGURE_NAMES[key]} | {_fmt(float(value), 1)} | "
                f"{_fmt(refRatio, 2)} | {_fmt(now, 1)} | {_fmt(nowRatio, 2)} |"
            )
    return rows


def _get(result: Any, *keys: Any) -> Any:
    for key in keys:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


def figures(peer: dict[str, Any], largest: str | None) -> dict[str, float | None]:
    """
    The headline figures of one peer.

    @param largest: The largest burst size (as a string).
    """
    memory = _get(peer, "idleMemory", "rssPerPair")
    return {
        "throughputGbps": _get(peer, "throughput", "gbps"),
        "firstByteMeanMs": _get(peer, "simultaneous", largest, "firstByteMeanMs"),
        "firstByteP99Ms": _get(peer, "simultaneous", largest, "firstByteP99Ms"),
        "burstFailures": _get(peer, "simultaneous", largest, "failures"),
        "shortFlowsPerSecond": _get(peer, "shortFlows", "flowsPerSecond"),
        "shortFlowErrors": _get(peer, "shortFlows", "errors"),
        "memoryKiBPerPair": memory / 1024 if memory is not None else None,
        "memoryPssKiBPerPair": (_get(peer, "idleMemory", "pssPerPair") or 0) / 1024
        if _get(peer, "idleMemory", "pssPerPair") is not None else None,
        "coldStartMs": _get(peer, "coldStart", "medianMs"),
    }


def ratio(value: float | None, reference: float | None) -> float | None:
    """
    C{value / reference}, or L{None} when either is missing or the
    reference is zero.
    """
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def burstSizes(results: dict[str, Any]) -> list[str]:
    """
    The burst sizes measured, smallest first, as strings.
    """
    sizes = set()
    for peer in results["peers"].values():
        sizes.update((_get(peer, "simultaneous") or {}).keys())
    return sorted((s for s in sizes if s.isdigit()), key=int)


def targets(results: dict[str, Any], name: str = "miniproxy-accept") -> list[dict[str, Any]]:
    """
    Whether miniproxy (the peer C{name}) meets each target.
    """
    peers = results["peers"]
    mine = peers.get(name, {})
    haproxy = peers.get(REFERENCE, {})
    splice = peers.get("haproxy-splice", {})
    sizes = burstSizes(results)
    values: dict[str, float | None] = {}
    values["throughputVsSplice"] = ratio(_get(mine, "throughput", "gbps"),
                                         _get(splice, "throughput", "gbps"))
    worst = None
    failures = None
    for size in sizes:
        r = ratio(_get(mine, "simultaneous", size, "firstByteMeanMs"),
                  _get(haproxy, "simultaneous", size, "firstByteMeanMs"))
        if r is not None:
            worst = r if worst is None else max(worst, r)
        f = _get(mine, "simultaneous", size, "failures")
        if f is not None:
            failures = f if failures is None else failures + f
    values["firstByteVsHAProxy"] = worst
    values["burstFailures"] = failures
    values["shortFlowsVsHAProxy"] = ratio(_get(mine, "shortFlows", "flowsPerSecond"),
                                          _get(haproxy, "shortFlows", "flowsPerSecond"))
    memory = _get(mine, "idleMemory", "rssPerPair")
    values["memoryKiB"] = memory / 1024 if memory is not None else None
    values["coldStartMs"] = _get(mine, "coldStart", "medianMs")
    values["newListenerMs"] = _get(mine, "newListener", "accept", "firstByteMedianMs")
    rows = []
    for key, description, comparison, bound in TARGETS:
        value = values.get(key)
        met = None
        if value is not None:
            met = value >= bound if comparison == ">=" else value <= bound
        rows.append({"key": key, "target": description, "value": value, "met": met})
    return rows


def _sizes(sizes: dict[str, Any]) -> str:
    if not sizes:
        return "–"
    return (
        f"throughput {sizes['throughputSeconds']:g} s; bursts of "
        f"{', '.join(str(n) for n in sizes['burstSizes'])} connects, "
        f"{sizes['burstRepeats']}× each; {sizes['shortClients']} short-flow clients for "
        f"{sizes['shortSeconds']:g} s; {sizes['idlePairs']} idle pairs; "
        f"{sizes['coldRuns']} cold starts; best of {sizes.get('rounds', 1)} rounds for "
        "throughput, bursts and short flows"
    )


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def _withRatio(value: Any, reference: Any, digits: int = 1) -> str:
    r = ratio(value, reference)
    text = _fmt(value, digits)
    return f"{text} ({r:.2f}×)" if r is not None else text


def markdown(results: dict[str, Any], heading: str = "##") -> str:
    """
    The results as markdown: the machine, the summary with ratios to
    HAProxy, Table 1, miniproxy's own figures, and its targets.
    """
    peers = results["peers"]
    sizes = burstSizes(results)
    largest = sizes[-1] if sizes else None
    reference = figures(peers.get(REFERENCE, {}), largest)
    m = results["machine"]
    lines = [
        f"{heading} Run of {results['date']}",
        "",
        f"- Command: `{results['command'] or 'benchmarks.run.runAll(...)'}`",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), kernel {m['kernel']}, Python "
        f"{m['python']}, Twisted {m['twisted']}, {m['haproxy']}, {m['iperf3']}, "
        f"{m['socat']}",
        f"- Placement: proxy on CPU {results['placement']['proxyCpu']}, load generators "
        f"and backends on CPU {results['placement']['loadCpu']}",
        f"- Sizes: {_sizes(results.get('sizes', {}))}",
        f"- Load average (1, 5, 15 min) before: {results['loadBefore']}, after: "
        f"{results['loadAfter']}; run took {results['elapsedSeconds']:.0f} s",
        "",
        f"{heading}# Summary (ratio to HAProxy, 1 thread)",
        "",
        f"| peer | throughput Gbit/s | TTFB at {largest or '–'} connects, mean ms | p99 ms | "
        "short flows/s | errors | memory per idle pair, KiB (RSS) | PSS | cold start ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, peer in peers.items():
        if "error" in peer and len(peer) <= 2:
            lines.append(f"| {peer.get('label', name)} | {peer['error']} |||||||")
            continue
        f = figures(peer, largest)
        lines.append(
            "| " + " | ".join([
                peer.get("label", name),
                _withRatio(f["throughputGbps"], reference["throughputGbps"]),
                _withRatio(f["firstByteMeanMs"], reference["firstByteMeanMs"], 2),
                _withRatio(f["firstByteP99Ms"], reference["firstByteP99Ms"], 2),
                _withRatio(f["shortFlowsPerSecond"], reference["shortFlowsPerSecond"]),
                _fmt(f["shortFlowErrors"]),
                _withRatio(f["memoryKiBPerPair"], reference["memoryKiBPerPair"], 2),
                _fmt(f["memoryPssKiBPerPair"], 2),
                _withRatio(f["coldStartMs"], reference["coldStartMs"]),
            ]) + " |"
        )
    errors = [(name, key, value["error"]) for name, peer in peers.items()
              for key, value in peer.items() if isinstance(value, dict) and "error" in value]
    if errors:
        lines += ["", "Failed measurements:", ""]
        lines += [f"- {name} {key}: {error.splitlines()[0]}" for name, key, error in errors]
    if sizes:
        lines += [
            "",
            f"{heading}# Table 1: simultaneous connection attempts",
            "",
            "Per connection, from its `connect()`: connected, and first byte from the "
            "backend through the proxy; mean / p99 in ms; failures (TTFB ratio to HAProxy).",
            "",
            "| peer | " + " | ".join(f"{s} connects" for s in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        for name, peer in peers.items():
            cells = []
            for size in sizes:
                s = _get(peer, "simultaneous", size)
                if not isinstance(s, dict) or "firstByteMeanMs" not in s:
                    cells.append("–")
                    continue
                r = ratio(s["firstByteMeanMs"], _get(peers.get(REFERENCE, {}), "simultaneous",
                                                     size, "firstByteMeanMs"))
                cells.append(
                    f"conn {_fmt(s['connectMeanMs'], 2)}/{_fmt(s['connectP99Ms'], 2)}, "
                    f"TTFB {_fmt(s['firstByteMeanMs'], 2)}/{_fmt(s['firstByteP99Ms'], 2)}"
                    + (f" ({r:.2f}×)" if r is not None else "")
                    + f", fail {s['failures']}"
                )
            lines.append(f"| {peer.get('label', name)} | " + " | ".join(cells) + " |")
    if largest == "230":
        lines += [
            "",
            f"{heading}# Beside the reference figures",
            "",
            "Measured earlier on this kind of machine; the ratios to HAProxy cancel "
            "most of a difference in machine speed or load.",
            "",
            *referenceComparison(results),
        ]
    mine = peers.get("miniproxy-accept", {})
    listener = _get(mine, "newListener")
    hooks = results.get("hookOverhead")
    controlled = _get(mine, "controlAdd")
    if (listener or hooks or controlled or _get(mine, "pythonMemory")
            or _get(mine, "startupImports")):
        lines += ["", f"{heading}# miniproxy only", ""]
    startup = _get(mine, "startupImports")
    if isinstance(startup, dict) and "importsMs" in startup:
        lines.append(
            f"- Start-up before listening: a bare interpreter `python -S` "
            f"{_fmt(startup['interpreterNoSiteMs'], 0)} ms, with `site` "
            f"{_fmt(startup['interpreterMs'], 0)} ms, importing what `twistd miniproxy` "
            f"imports {_fmt(startup['importsMs'], 0)} ms; cumulative import times: "
            + ", ".join(f"`{m}` {_fmt(ms, 0)} ms"
                        for m, ms in startup["importTimeMs"].items())
        )
    python = _get(mine, "pythonMemory")
    if isinstance(python, dict) and "tracedPerPair" in python:
        lines.append(
            f"- Python's view of an idle pair (`tracemalloc`, {python['pairs']} pairs in "
            f"process): {_fmt(python['tracedPerPair'] / 1024, 2)} KiB per pair; objects per "
            "pair: " + ", ".join(
                f"{n:g} {name}" for name, n in list(python["objectsPerPair"].items())[:12])
        )
    if isinstance(listener, dict) and "accept" in listener:
        for mode in ("accept", "early"):
            x = listener.get(mode, {})
            lines.append(
                f"- New listener (`addListener`, {mode} mode): listening after "
                f"{_fmt(x.get('listeningMedianMs'), 2)} ms, first byte relayed after "
                f"{_fmt(x.get('firstByteMedianMs'), 2)} ms (median; min "
                f"{_fmt(x.get('firstByteMinMs'), 2)}, max {_fmt(x.get('firstByteMaxMs'), 2)})"
            )
    elif isinstance(listener, dict):
        lines.append(f"- New listener: {listener.get('error')}")
    if isinstance(controlled, dict) and "medianMs" in controlled:
        lines.append(
            f"- New listener from outside (`python -m miniproxy.ctl add` to a running "
            f"`twistd miniproxy --control`): first byte relayed "
            f"{_fmt(controlled['medianMs'], 1)} ms after the exec of the client (median; "
            f"min {_fmt(controlled['minMs'], 1)}, max {_fmt(controlled['maxMs'], 1)}); "
            + (f"with `socat - UNIX-CONNECT:` as the client, "
               f"{_fmt(controlled['socat']['medianMs'], 1)} ms (min "
               f"{_fmt(controlled['socat']['minMs'], 1)}, max "
               f"{_fmt(controlled['socat']['maxMs'], 1)}); "
               if isinstance(controlled.get("socat"), dict) else "")
            + f"a cold start of a new process: "
            f"{_fmt(_get(mine, 'coldStart', 'medianMs'), 1)} ms"
        )
    elif isinstance(controlled, dict):
        lines.append(f"- New listener from outside: {controlled.get('error')}")
    if hooks:
        lines.append(
            f"- No-op function (`wantsData`, every hook continues), against miniproxy with "
            f"splice off (a function that wants data keeps its flows in userspace): "
            f"{_fmt(hooks.get('perFlowUs'), 1)} µs per flow (short flows, "
            f"{_fmt(hooks.get('shortFlowRatio'), 2)}× the rate without it); "
            f"{_fmt(hooks.get('perChunkNs'), 0)} ns per chunk of "
            f"{_fmt(hooks.get('chunkBytes'), 0)} B on average (throughput, "
            f"{_fmt(hooks.get('throughputRatio'), 2)}× without it)"
        )
        lines.append(
            f"- The hook dispatch alone (`HandlerChain`, one no-op handler): "
            f"{_fmt(hooks.get('dispatchChunkNs'), 0)} ns per chunk, "
            f"{_fmt(hooks.get('dispatchFlowUs'), 1)} µs per flow (handler, chain and "
            f"lifecycle hooks); on the in-memory relay (`FlowHarness`): "
            f"{_fmt(hooks.get('inMemoryPerFlowUs'), 1)} µs per flow, "
            f"{_fmt(hooks.get('inMemoryPerChunkNs'), 0)} ns per 1 KiB chunk"
        )
    rows = targets(results)
    if any(r["value"] is not None for r in rows):
        lines += [
            "",
            f"{heading}# Targets (miniproxy --mode accept)",
            "",
            "| target | measured | met |",
            "|---|---|---|",
        ]
        for r in rows:
            met = {True: "yes", False: "**no**", None: "–"}[r["met"]]
            lines.append(f"| {r['target']} | {_fmt(r['value'], 2)} | {met} |")
    for kind in ("shortFlows", "throughput"):
        profile = _get(mine, "profiles", kind)
        if isinstance(profile, dict) and profile.get("samples"):
            lines += [
                "",
                f"{heading}# Where miniproxy's time goes ({kind}, py-spy, "
                f"{profile['samples']} samples, `{profile['file']}`)",
                "",
                "| function (self) | share | package (self) | share | "
                "miniproxy function (inclusive) | share |",
                "|---|---|---|---|---|---|",
            ]
            columns = [profile.get("self", []), profile.get("selfByArea", []),
                       profile.get("inclusive", [])]
            for i in range(12):
                cells = []
                for column, key in zip(columns, ("function", "area", "function")):
                    if i < len(column):
                        cells += [f"`{column[i][key]}`", f"{column[i]['share']:.0%}"]
                    else:
                        cells += ["", ""]
                if any(cells):
                    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csvRows(results: dict[str, Any]) -> Iterable[list[Any]]:
    """
    One row per peer and figure: peer, measurement, figure, value, and its
    ratio to HAProxy's.
    """
    peers = results["peers"]
    reference = peers.get(REFERENCE, {})
    yield ["peer", "measurement", "figure", "value", "ratio_to_haproxy"]
    for name, peer in peers.items():
        for measurement, value in peer.items():
            if not isinstance(value, dict):
                continue
            for key, x, ref in _flatten(value, _get(reference, measurement)):
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    r = ratio(x, ref if isinstance(ref, (int, float)) else None)
                    yield [name, measurement, key, x, "" if r is None else f"{r:.4f}"]


def _flatten(value: Any, reference: Any, prefix: str = "") -> Iterable[tuple[str, Any, Any]]:
    if isinstance(value, dict):
        for key, x in value.items():
            if key in ("profile", "firstByteRunsMs", "runsMs"):
                continue
            yield from _flatten(x, _get(reference, key), f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), value, reference


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """
    Draw C{table1.png} (connect time and time to first byte against the
    number of simultaneous attempts) and C{summary.png} (the headline
    figures per peer).

    @return: The names of the files drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = results["peers"]
    sizes = burstSizes(results)
    drawn = []
    if sizes:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for name, peer in peers.items():
            xs, means, p99s, connects = [], [], [], []
            for size in sizes:
                s = _get(peer, "simultaneous", size)
                if isinstance(s, dict) and s.get("firstByteMeanMs") is not None:
                    xs.append(int(size))
                    means.append(s["firstByteMeanMs"])
                    p99s.append(s["firstByteP99Ms"])
                    connects.append(s["connectMeanMs"])
            if xs:
                label = peer.get("label", name)
                axes[0].plot(xs, connects, marker="o", label=label)
                axes[1].plot(xs, means, marker="o", label=label)
                axes[2].plot(xs, p99s, marker="o", label=label)
        for ax, title in zip(axes, ("connect, mean", "first byte, mean", "first byte, p99")):
            ax.set_title(title)
            ax.set_xlabel("simultaneous connection attempts")
            ax.set_ylabel("ms")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        axes[2].legend(fontsize=8)
        fig.suptitle("Table 1 on loopback: time per connection through each peer")
        fig.tight_layout()
        fig.savefig(out / "table1.png", dpi=110)
        plt.close(fig)
        drawn.append("table1.png")
    largest = sizes[-1] if sizes else None
    names = [n for n in peers if "label" in peers[n]]
    figs = {n: figures(peers[n], largest) for n in names}
    panels = [
        ("throughputGbps", "single-flow throughput, Gbit/s", False),
        ("shortFlowsPerSecond", "short flows per second", False),
        ("memoryPssKiBPerPair", "memory per idle pair, KiB (PSS, log scale)", True),
        ("coldStartMs", "cold start, ms (log scale)", True),
    ]
    fig, grid = plt.subplots(2, 2, figsize=(14, 8))
    for ax, (key, title, log) in zip(grid.flat, panels):
        shown = [(peers[n]["label"], figs[n][key]) for n in names if figs[n][key] is not None]
        ax.barh([s[0] for s in shown], [s[1] for s in shown],
                color=["tab:red" if "miniproxy" in s[0] else "tab:blue" for s in shown])
        ax.set_title(title)
        if log:
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)
    drawn.append("summary.png")
    return drawn


def updateDocument(doc: Path, section: str) -> bool:
    """
    Replace the text between the L{BEGIN} and L{END} lines of C{doc}.

    @return: Whether the markers were there.
    """
    if not doc.exists():
        return False
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        return False
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    doc.write_text(f"{before}{BEGIN}\n{section}{END}{after}")
    return True


def write(results: dict[str, Any], out: Path, plots: bool = True,
          doc: Path | None = None) -> None:
    """
    Write C{results.json}, C{results.csv}, C{results.md} and, with
    C{plots}, the plots to C{out}; update C{doc}'s results section.
    """
    if plots:
        try:
            results["plots"] = plot(results, out)
        except ImportError as e:
            results["plots"] = {"error": str(e)}
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows(csvRows(results))
    table = markdown(results, heading="###")
    if isinstance(results.get("plots"), list):
        table += "\n" + "\n".join(
            f"![{name}](performance/{name})" for name in results["plots"]) + "\n"
    (out / "results.md").write_text("# miniproxy benchmark results\n\n" + markdown(results))
    if doc is not None:
        updateDocument(doc, table)
