# -*- test-case-name: tests.test_benchmarks -*-
"""
Benchmarks of miniproxy beside its peers (HAProxy, socat, Twisted's port
forwarder), run on loopback with the proxy pinned to one core.

Run them with C{python -m benchmarks.run}; see C{docs/performance.md}.
They are not tests: C{tests/test_benchmarks} only checks that they run.
"""
