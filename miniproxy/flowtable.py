# -*- test-case-name: tests.test_flowtable -*-
"""
The flows a service has open: admission against the limits, and the count
per source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from miniproxy.flow import Flow


class FlowTable:
    """
    The open flows of one service, shared by all its listeners.

    @ivar flows: The open flows.
    @ivar refused: How many flows were refused for being over a limit.
    @ivar idleTimers: The idle timeouts of the flows (a
        L{miniproxy.flow.IdleTimers}), made by the first flow with one.
    """

    idleTimers: Any = None

    def __init__(self, maxFlows: int, maxFlowsPerSource: int) -> None:
        self.maxFlows = maxFlows
        self.maxFlowsPerSource = maxFlowsPerSource
        self.flows: set[Flow] = set()
        self._perSource: dict[str, int] = {}
        self.refused = 0

    def admit(self, source: str, count: bool = True) -> str | None:
        """
        Check whether one more flow from C{source} fits the limits.

        @param count: Whether a refusal counts in C{refused}; L{False} for a
            look at the SYN, since the accept of the same connection is
            refused (and counted) again.
        @return: L{None} if it fits, or the reason it does not.
        """
        if len(self.flows) >= self.maxFlows:
            self.refused += count
            return f"too many flows ({self.maxFlows} open)"
        if self._perSource.get(source, 0) >= self.maxFlowsPerSource:
            self.refused += count
            return f"too many flows from {source} ({self.maxFlowsPerSource} open)"
        return None

    def add(self, flow: Flow) -> None:
        """
        Count an admitted flow.
        """
        self.flows.add(flow)
        source = flow.client.host
        self._perSource[source] = self._perSource.get(source, 0) + 1

    def remove(self, flow: Flow) -> None:
        """
        Forget a closed flow.  Removing one twice is harmless.
        """
        if flow not in self.flows:
            return
        self.flows.discard(flow)
        source = flow.client.host
        count = self._perSource[source] - 1
        if count:
            self._perSource[source] = count
        else:
            del self._perSource[source]

    def countFrom(self, source: str) -> int:
        """
        How many flows from C{source} are open.
        """
        return self._perSource.get(source, 0)
