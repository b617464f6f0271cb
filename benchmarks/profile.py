# -*- test-case-name: tests.test_benchmarks -*-
"""
Sampling a running peer with C{py-spy record --format raw}, and reading
what its collapsed stacks say: where the process's CPU time goes.
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any


def pySpy() -> str | None:
    """
    The C{py-spy} executable, or L{None}.
    """
    return shutil.which("py-spy")


def startRecording(pid: int, seconds: float, output: Path, rate: int = 200) -> subprocess.Popen:
    """
    Start sampling C{pid} for C{seconds} into C{output} (collapsed stacks).
    """
    executable = pySpy()
    if executable is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    return subprocess.Popen(
        [executable, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--rate", str(rate), "--format", "raw", "--nonblocking", "--output", str(output)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _frameName(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def _area(frame: str) -> str:
    # Where a frame's code lives, as py-spy shortens it: a package
    # directory ("twisted/internet", "miniproxy"), or for a bare file name
    # a module of the standard library ("stdlib socket").
    where = frame.partition(" (")[2].rsplit(":", 1)[0]
    if "/" in where:
        return where.rsplit("/", 1)[0]
    if where.endswith(".py"):
        return "stdlib " + where.removesuffix(".py")
    return where or "?"


def summarize(raw: str, top: int = 15, mine: str = "miniproxy/") -> dict[str, Any]:
    """
    Where the samples of collapsed stacks fall: the functions by self time
    (the innermost frame), the package directories by self time, and the
    functions whose file path contains C{mine}, inclusively (anywhere in
    the stack); each as a share of all samples.

    @param raw: C{py-spy --format raw} output: one C{frame;frame;... N}
        line per stack, outermost frame first.
    @param top: How many entries to list.
    @param mine: What marks the project's own frames.
    """
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        own[_frameName(frames[-1])] += n
        areas[_area(frames[-1])] += n
        for name in {_frameName(f) for f in frames if mine in f}:
            inclusive[name] += n

    def shares(counter: Counter[str], key: str) -> list[dict[str, Any]]:
        if not total:
            return []
        return [{key: name, "share": n / total} for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "self": shares(own, "function"),
        "selfByArea": shares(areas, "area"),
        "inclusive": shares(inclusive, "function"),
    }


def finish(recorder: subprocess.Popen, output: Path, timeout: float = 60) -> dict[str, Any]:
    """
    Wait for a recording to end and summarize it.
    """
    try:
        _, err = recorder.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        recorder.kill()
        _, err = recorder.communicate()
    if not output.exists():
        return {"error": (err or b"").decode(errors="replace")[-500:], "samples": 0}
    summary = summarize(output.read_text(errors="replace"))
    summary["file"] = output.name
    return summary
