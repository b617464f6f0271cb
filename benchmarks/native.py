# -*- test-case-name: tests.test_benchmarks -*-
"""
The C backend and load generators (C{benchmarks/native/mpbench.c}), built
with the system C compiler on first use and cached by the hash of the
source.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).parent / "native" / "mpbench.c"


def cacheDirectory() -> Path:
    """
    Where built binaries are kept: C{$XDG_CACHE_HOME/miniproxy-bench}, or
    C{~/.cache/miniproxy-bench}.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "miniproxy-bench"


def compiler() -> str | None:
    """
    The C compiler to build with (C{$CC}, C{cc} or C{gcc}), or L{None} if
    there is none.
    """
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(directory: Path | None = None) -> Path:
    """
    Build C{mpbench} if it is not built yet.

    @param directory: Where to put it; L{cacheDirectory} by default.
    @raise RuntimeError: If there is no C compiler or the build fails.
    @return: The path of the binary.
    """
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    directory = directory or cacheDirectory()
    binary = directory / f"mpbench-{digest}"
    if binary.exists():
        return binary
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) to build benchmarks/native/mpbench.c")
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".mpbench-{digest}.{os.getpid()}"
    result = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(temporary), str(SOURCE)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building mpbench failed:\n{result.stderr}")
    os.replace(temporary, binary)
    return binary
