# -*- test-case-name: tests.test_evaluation -*-
"""
The paper's evaluation (its section 5), reproduced on real kernel TCP in
network namespaces joined by delay lines (L{miniproxy.testbed}).

Each experiment is a module, runnable as C{python -m
miniproxy.evaluation.NAME [--runs N] [--quick] [--out docs/evaluation]}:

  - L{miniproxy.evaluation.figure4}: TTFB and TTC through 0 to 3 proxies,
    early (ESF) against accept mode;
  - L{miniproxy.evaluation.figure5}: one proxy whose links are longer than
    the direct path;
  - L{miniproxy.evaluation.table1}: connection establishment with many
    simultaneous connections;
  - L{miniproxy.evaluation.fastopen}: beyond the paper, TCP Fast Open on
    every hop with the destination carried in the SYN.

They share L{miniproxy.evaluation.runner} (the hosts on a line),
L{miniproxy.evaluation.client} and L{miniproxy.evaluation.server} (the
programs run in the client's and the server's namespaces),
L{miniproxy.evaluation.common} and L{miniproxy.evaluation.report}.  See
C{docs/evaluation.md}.
"""
