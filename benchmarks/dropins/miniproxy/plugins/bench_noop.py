# -*- test-case-name: tests.test_benchmarks -*-
"""
The benchmarks' no-op proxy function, as a third-party dropin: put
C{benchmarks/dropins} on C{PYTHONPATH} and run miniproxy with
C{--function bench-noop}.
"""

from miniproxy.functions.base import FunctionMaker

benchNoop = FunctionMaker(
    "bench-noop",
    "benchmarks.noop",
    "Benchmarks only: wants data, and every hook continues (the cost of a hook).",
)
