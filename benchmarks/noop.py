# -*- test-case-name: tests.test_benchmarks -*-
"""
A proxy function that does nothing, to measure what running a function's
hooks costs: it wants data, and every hook returns C{CONTINUE}.

It counts the data hooks it ran and, when C{BENCH_NOOP_STATS} names a
file, writes the counts there as JSON when the reactor shuts down (so the
benchmark knows how many chunks a throughput run made).
"""

from __future__ import annotations

import json
import os
from typing import Any

from miniproxy.functions.base import FlowHandler, HandlerFactory
from miniproxy.verdict import CONTINUE, Chunk, Verdict


class Counts:
    """
    What the no-op handlers saw, for the whole process.

    @ivar flows: Flows handled.
    @ivar chunks: Data hook calls.
    @ivar bytes: Bytes those chunks held.
    """

    def __init__(self) -> None:
        self.flows = 0
        self.chunks = 0
        self.bytes = 0

    def asDict(self) -> dict[str, int]:
        """
        The counts as a dictionary.
        """
        return {"flows": self.flows, "chunks": self.chunks, "bytes": self.bytes}


class NoopHandler(FlowHandler):
    """
    A handler whose hooks, data hooks too, all continue: the base class's
    hooks, with C{wantsData} set.
    """

    __slots__ = ()
    wantsData = True


class CountingNoopHandler(FlowHandler):
    """
    A L{NoopHandler} that counts its flows and data hooks.
    """

    __slots__ = ("counts",)
    wantsData = True

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        counts.flows += 1

    def dataFromClient(self, flow: Any, chunk: Chunk) -> Verdict:
        """
        Count the chunk and continue.
        """
        counts = self.counts
        counts.chunks += 1
        counts.bytes += len(chunk.data)
        return CONTINUE

    def dataFromServer(self, flow: Any, chunk: Chunk) -> Verdict:
        """
        Count the chunk and continue.
        """
        counts = self.counts
        counts.chunks += 1
        counts.bytes += len(chunk.data)
        return CONTINUE


def configure(settings: dict, reactor: Any) -> HandlerFactory:
    """
    The no-op function's factory; it takes no settings.

    With C{BENCH_NOOP_STATS} set, its handlers count, and the counts are
    written there when the reactor shuts down.

    @param settings: Ignored.
    @param reactor: Where to hook the shutdown that writes the counts.
    @return: A factory of L{NoopHandler}s, or of L{CountingNoopHandler}s
        sharing one L{Counts} (its C{counts} attribute).
    """
    counts = Counts()
    path = os.environ.get("BENCH_NOOP_STATS")
    if not path:
        factory = HandlerFactory("bench-noop", lambda flow: NoopHandler())
    else:
        factory = HandlerFactory("bench-noop", lambda flow: CountingNoopHandler(counts))
        if reactor is not None:

            def write() -> None:
                with open(path, "w") as f:
                    json.dump(counts.asDict(), f)

            reactor.addSystemEventTrigger("before", "shutdown", write)
    factory.counts = counts  # type: ignore[attr-defined]
    return factory
