# -*- test-case-name: tests.test_earlysyn -*-
"""
Early SYN forwarding: flows begun at their SYN, waiting for C{accept()}.

The L{SynTap} reports each SYN to L{EarlySyns}, which finds the listener it
is for, makes the L{Flow} and begins it at L{Moment.SYN}: the functions'
early-SYN hooks run and, in C{early} mode, the outgoing leg starts at once.
When the kernel hands over the accepted connection, the accepted leg claims
its flow by the client's address and port and pairs with the outgoing leg
already under way.

A SYN flood must not become a connection flood towards upstream: pending
flows are bounded in total and per source.  A SYN past a bound is counted
(and logged once per interval) and its flow simply starts at accept, as
without a tap.  A handshake that never completes is given up after
C{Limits.synTimeout}: its flow is aborted and its outgoing leg reset.

Every pending flow has the same timeout, so they expire in the order
their SYNs came, which is the order of the pending table: one delayed
call, due when the oldest pending flow expires, serves them all, instead
of a delayed call made and cancelled for each SYN.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Any, Callable

from twisted.logger import Logger

from miniproxy.address import HostPort
from miniproxy.flow import Flow, Moment
from miniproxy.limits import Limits
from miniproxy.syntap import READ_BATCH, SynTap, workerOf
from miniproxy.wire.packet import TCPSegment

_log = Logger(namespace="miniproxy.earlysyn")

#: Seconds between two log lines about SYNs over the pending bounds.
OVERFLOW_LOG_INTERVAL = 10.0

#: Batches of L{READ_BATCH} SYNs an accept drains from a tap at most.
DRAIN_BATCHES = 4


def _canonical(host: str | None) -> str | None:
    # One spelling per address: an IPv4-mapped IPv6 address is its IPv4.
    # Called several times per connection: addresses as the kernel spells
    # them (inet_ntop) need no parsing.
    if host is None or ":" not in host:
        return host
    if host.startswith("::ffff:") and "." in host and "%" not in host:
        return host[7:]
    return _parsedCanonical(host)


@functools.lru_cache(maxsize=1024)
def _parsedCanonical(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def canonicalEndpoint(a: HostPort) -> HostPort:
    """
    C{a} with its address in one spelling (IPv4-mapped IPv6 as IPv4).
    """
    host = _canonical(a.host) or a.host
    return a if host == a.host else HostPort(host, a.port)


def sameEndpoint(a: HostPort, b: HostPort) -> bool:
    """
    Whether C{a} and C{b} are one address and port, however spelled.
    """
    return a.port == b.port and _canonical(a.host) == _canonical(b.host)


class _Target:
    """
    A listener the tap serves: its context and what SYNs are for it.
    """

    __slots__ = ("context", "address", "ports")

    def __init__(self, context: Any, address: str | None, ports: frozenset[int]) -> None:
        self.context = context
        self.address = None if address in (None, "", "0.0.0.0", "::") else _canonical(address)
        self.ports = ports

    def matches(self, destination: HostPort) -> bool:
        """
        Whether a SYN to C{destination} is for this listener.
        """
        if destination.port not in self.ports:
            return False
        return self.address is None or self.address == _canonical(destination.host)


class EarlySyns:
    """
    The service's flows begun at their SYN, and its SYN taps.

    @ivar pending: Flows waiting for accept, by client address, oldest
        first: C{(flow, deadline)}, the reactor time at which the flow is
        given up if its handshake is not complete.
    @ivar overflows: SYNs past a pending bound (they connect at accept).
    @ivar retransmits: SYNs for a flow already pending.
    @ivar expired: Handshakes that never completed.
    @ivar available: L{False} once the tap could not be opened (no
        C{CAP_NET_RAW}).
    @ivar share: C{(index, workers)} in a worker process: this worker
        begins flows only for the SYNs of the connections the kernel
        steers to it (see L{miniproxy.syntap.workerOf}); L{None} alone.
    """

    def __init__(
        self,
        reactor: Any,
        limits: Limits,
        makeTap: Callable[..., SynTap] = SynTap,
        share: tuple[int, int] | None = None,
    ) -> None:
        self.reactor = reactor
        self.limits = limits
        self.share = share
        self._makeTap = makeTap
        self._targets: list[_Target] = []
        self._taps: dict[int, SynTap] = {}
        self.pending: dict[HostPort, tuple[Flow, float]] = {}
        # The delayed call that expires the oldest pending flows.
        self._expiry: Any = None
        self._perSource: dict[str, int] = {}
        self.overflows = 0
        self.retransmits = 0
        self.expired = 0
        self._overflowsLogged = 0
        self._lastOverflowLog: float | None = None
        self.available = True

    # -- taps ------------------------------------------------------------

    def register(self, context: Any, address: str | None, ports: set[int] | frozenset[int]) -> bool:
        """
        Tap SYNs to C{ports} (on C{address}, or any address if L{None}) for
        the listener of C{context}.

        @return: Whether a tap runs for them; L{False} without
            C{CAP_NET_RAW} (one log line says so, once).
        """
        if not self.available:
            return False
        self._targets.append(_Target(context, address, frozenset(ports)))
        families = {socket.AF_INET, socket.AF_INET6}
        if address is not None and address not in ("0.0.0.0", "::"):
            families = {socket.AF_INET6 if ":" in address else socket.AF_INET}
        allPorts = frozenset().union(*(t.ports for t in self._targets))
        for family in sorted(families):
            tap = self._taps.get(family)
            try:
                if tap is None:
                    extra = {} if self.share is None else {"share": self.share}
                    tap = self._makeTap(
                        self.reactor, family, allPorts, self.synArrived, **extra
                    )
                    tap.start()
                    self._taps[family] = tap
                else:
                    tap.setPorts(allPorts)
            except OSError as e:
                self._targets.pop()
                self.available = False
                self.stop()
                _log.warn(
                    "SYN tap unavailable ({error}); it needs CAP_NET_RAW. "
                    "Early mode starts outgoing legs at accept instead.",
                    error=e.strerror or str(e),
                )
                return False
        return True

    def unregister(self, context: Any) -> None:
        """
        Stop tapping SYNs for the listener of C{context} (it no longer
        listens): the ports only it wanted leave the taps' filters, and
        its flows waiting for accept are aborted.
        """
        self._targets = [t for t in self._targets if t.context is not context]
        if self._targets:
            allPorts = frozenset().union(*(t.ports for t in self._targets))
            for tap in self._taps.values():
                tap.setPorts(allPorts)
        for client, (flow, _) in list(self.pending.items()):
            if flow._context is context:
                self._forget(client)
                flow.abort("listener removed")

    def stop(self) -> None:
        """
        Close the taps and abort the flows still waiting for accept.
        """
        for tap in self._taps.values():
            tap.stop()
        self._taps.clear()
        expiry, self._expiry = self._expiry, None
        if expiry is not None and expiry.active():
            expiry.cancel()
        for client in list(self.pending):
            flow, _ = self.pending.pop(client)
            flow.abort("service stopping")
        self._perSource.clear()

    # -- SYNs --------------------------------------------------------------

    def synArrived(self, segment: TCPSegment) -> None:
        """
        A SYN arrived: begin its flow, unless it is a retransmission, is
        for no listener, or is over a bound.
        """
        target = next(
            (t for t in self._targets if t.matches(segment.destination)), None
        )
        if target is None:
            return
        share = self.share
        if share is not None and workerOf(segment.source.port, share[1]) != share[0]:
            # Another worker accepts it.
            return
        client = canonicalEndpoint(segment.source)
        if client in self.pending:
            self.retransmits += 1
            return
        limits = self.limits
        source = client.host
        if (
            len(self.pending) >= limits.maxPendingSyns
            or self._perSource.get(source, 0) >= limits.maxPendingSynsPerSource
        ):
            self._overflow()
            return
        context = target.context
        if context.table.admit(source, count=False) is not None:
            # Over the flow limits: accept refuses it, with its log line.
            return
        flow = Flow(context, client, segment.destination)
        refusal = context.prepareFlowAtSyn(flow, segment)
        self.pending[client] = (flow, self.reactor.seconds() + limits.synTimeout)
        if self._expiry is None:
            self._expiry = self.reactor.callLater(limits.synTimeout, self._expire)
        self._perSource[source] = self._perSource.get(source, 0) + 1
        if refusal is not None:
            # Kept pending so the accepted connection is closed at once.
            flow.refuse(refusal)
        else:
            flow.begin(Moment.SYN)

    def _forget(self, client: HostPort) -> tuple[Flow, float] | None:
        entry = self.pending.pop(client, None)
        if entry is None:
            return None
        count = self._perSource[client.host] - 1
        if count:
            self._perSource[client.host] = count
        else:
            del self._perSource[client.host]
        return entry

    def _expire(self) -> None:
        # Give up the pending flows whose deadline passed (the oldest
        # first), then wait for the next one, if any.
        self._expiry = None
        pending = self.pending
        while pending:
            client = next(iter(pending))
            flow, deadline = pending[client]
            now = self.reactor.seconds()
            if deadline > now:
                self._expiry = self.reactor.callLater(deadline - now, self._expire)
                return
            self._forget(client)
            self.expired += 1
            flow.abort(f"handshake not completed within {self.limits.synTimeout:g}s")

    def _overflow(self) -> None:
        self.overflows += 1
        now = self.reactor.seconds()
        last = self._lastOverflowLog
        if last is None or now - last >= OVERFLOW_LOG_INTERVAL:
            _log.warn(
                "{count} SYNs over the pending early-leg bounds ({total} in total, "
                "{perSource} per source) since the last report; they connect at accept",
                count=self.overflows - self._overflowsLogged,
                total=self.limits.maxPendingSyns,
                perSource=self.limits.maxPendingSynsPerSource,
            )
            self._overflowsLogged = self.overflows
            self._lastOverflowLog = now

    # -- accept ------------------------------------------------------------

    def drain(self) -> None:
        """
        Handle the SYNs still queued in the taps now.

        The kernel hands a SYN to the tap before TCP sees it, so when a
        connection is accepted its SYN was read already or is queued: an
        accept that finds no flow begun at its SYN drains the taps first.
        Otherwise, when the listener is read before the tap in one reactor
        wake-up, the flow would begin at accept and the SYN, read next,
        would begin a second one (with an outgoing leg no one ever uses).
        """
        for tap in list(self._taps.values()):
            readQueued = getattr(tap, "readQueued", None)
            if readQueued is None:
                continue
            for _ in range(DRAIN_BATCHES):
                if readQueued() < READ_BATCH:
                    break

    def isPending(self, client: HostPort) -> bool:
        """
        Whether a flow from C{client} was begun at its SYN and waits for
        accept (so it was admitted already).  The taps are drained first
        if it is not (see L{drain}).
        """
        client = canonicalEndpoint(client)
        if client in self.pending:
            return True
        if not self._taps:
            return False
        self.drain()
        return client in self.pending

    def claim(self, client: HostPort, local: HostPort) -> Flow | None:
        """
        The accepted connection from C{client} to C{local} takes its flow.

        @return: The flow begun at the SYN, or L{None} if there is none
            (then the flow begins at accept).
        """
        client = canonicalEndpoint(client)
        entry = self.pending.get(client)
        if entry is None and self._taps:
            self.drain()
            entry = self.pending.get(client)
        if entry is None:
            return None
        flow = entry[0]
        if not sameEndpoint(flow.local, local):
            # Another connection of the same client port: leave it to expire.
            return None
        self._forget(client)
        return flow
