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


def summarize(raw: str, top: int = 15) -> dict[str, Any]:
    """
    The functions that take the most samples in collapsed stacks: by self
    time (the innermost frame) and inclusively (anywhere in the stack),
    each as a share of all samples.

    @param raw: C{py-spy --format raw} output: one C{frame;frame;... N}
        line per stack, outermost frame first.
    @param top: How many functions to list.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frameName(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    share = lambda c: [  # noqa: E731
        {"function": name, "share": n / total} for name, n in c.most_common(top)
    ] if total else []
    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


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
