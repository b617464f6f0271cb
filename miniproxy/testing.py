# -*- test-case-name: tests.test_testing -*-
"""
Testing proxy functions without sockets.

A L{FlowHarness} runs the real relay (L{miniproxy.flow.Flow} and the legs
of L{miniproxy.legs}) on in-memory transports, with a fake dialer and a
fake clock, so that a plugin author can drive one or many flows step by
step and look at what the proxy sent to each side::

    from twisted.trial import unittest

    from miniproxy.flow import Outcome
    from miniproxy.testing import FlowHarness

    from myproxyfunctions import shout  # an IProxyFunction plugin


    class ShoutTests(unittest.TestCase):
        def test_shouts(self) -> None:
            harness = FlowHarness([(shout, {"direction": "up"})])
            driver = harness.accept()
            driver.connectOutgoing()
            driver.clientSends(b"hello")
            self.assertEqual(driver.sentToServer(), b"HELLO")
            driver.clientHalfCloses()
            driver.serverHalfCloses()
            self.assertEqual(harness.closedFlows, [driver.flow])
            self.assertIs(driver.flow.outcome, Outcome.OK)

A flow may also begin at its SYN, as with a SYN tap: L{FlowHarness.syn},
then L{FlowDriver.handshakeCompletes}.

Everything happens when the test asks for it: the harness never uses the
global reactor, and time only passes with L{FlowHarness.advance}.  What a
real reactor would do "later" (deliver a FIN once written, report a closed
connection, read again after a pause) the harness does at the end of every
step, in order; L{FlowHarness.flush} does it explicitly, after a test fired
a L{Deferred} a function waits on.

L{RecordingFunction} is a proxy function that records every hook call, in
order, and answers what the test tells it to.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IProtocolFactory,
    ITCPTransport,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from miniproxy.address import HostPort, NextHop
from miniproxy.flow import ConnectMode, Flow, Moment
from miniproxy.flowtable import FlowTable
from miniproxy.interfaces import IFlowHandler, IFlowHandlerFactory, IProxyFunction
from miniproxy.legs import AcceptedLeg, AcceptedLegFactory, Leg, OutgoingLeg
from miniproxy.limits import Limits
from miniproxy.listener import ListenerContext, ListenerSettings
from miniproxy.verdict import CONTINUE, Verdict

__all__ = [
    "ConnectAttempt",
    "FakeDialer",
    "FlowDriver",
    "FlowHarness",
    "HookCall",
    "MemoryLegTransport",
    "RecordingFunction",
    "RecordingHandler",
    "configured",
]

# What a peer may queue on a leg besides bytes.
_FIN = object()
_CLOSE = object()


def _address(hostPort: HostPort) -> IPv4Address | IPv6Address:
    if ":" in hostPort.host:
        return IPv6Address("TCP", hostPort.host, hostPort.port)
    return IPv4Address("TCP", hostPort.host, hostPort.port)


def configured(
    plugin: IProxyFunction, settings: Mapping[str, Any] | None = None, reactor: Any = None
) -> tuple[str, IFlowHandlerFactory]:
    """
    Configure a proxy function plugin as the service would.

    @param plugin: The L{IProxyFunction} plugin.
    @param settings: Its settings, as its table in the config file would
        hold them; none by default.
    @param reactor: The reactor to configure it with.  Give the one the
        L{FlowHarness} runs on (a function that schedules calls must use
        the harness's clock).
    @raise miniproxy.errors.ConfigError: If a setting is bad.
    @raise TypeError: If C{configure} did not return an
        L{IFlowHandlerFactory}.
    @return: The C{(name, factory)} pair a L{FlowHarness} (or a
        L{ListenerContext}) takes.
    """
    factory = plugin.configure(dict(settings or {}), reactor)
    if not IFlowHandlerFactory.providedBy(factory):
        raise TypeError(
            f"{plugin!r} configured to {factory!r}, which does not provide "
            f"IFlowHandlerFactory"
        )
    return (plugin.name, factory)


def _normalizeFunction(item: Any, reactor: Any) -> tuple[str, IFlowHandlerFactory]:
    if isinstance(item, tuple) and len(item) == 2:
        first, second = item
        if isinstance(first, str):
            if not IFlowHandlerFactory.providedBy(second):
                raise TypeError(f"{second!r} does not provide IFlowHandlerFactory")
            return (first, second)
        if IProxyFunction.providedBy(first):
            return configured(first, second, reactor)
    elif IFlowHandlerFactory.providedBy(item):
        return (item.name, item)
    elif IProxyFunction.providedBy(item):
        return configured(item, None, reactor)
    raise TypeError(
        f"{item!r} is not an IFlowHandlerFactory, an IProxyFunction, or a "
        f"(name, factory) or (plugin, settings) pair"
    )


@implementer(ITCPTransport)
class MemoryLegTransport(StringTransport):
    """
    The in-memory transport of one leg: a L{StringTransport} that also
    half-closes, reports closes and resets to its protocol (at the
    harness's next step, as a reactor would), and holds what the peer sends
    while the proxy has paused reading, as a socket's receive buffer does.

    @ivar protocol: The leg.
    @ivar writeShutDown: The proxy shut this leg's write side down (sent a
        FIN).
    @ivar aborted: The proxy reset the connection.
    @ivar lost: The leg was told its connection is closed.
    @ivar lostReason: Why (a L{Failure}), once C{lost}.
    @ivar droppedWrites: Bytes the proxy wrote after the write side was shut
        down or the connection closed; a real transport drops them too.
    @ivar bufferSize: What L{Leg.setBufferBound} sets.
    """

    def __init__(
        self,
        harness: FlowHarness,
        protocol: Leg,
        hostAddress: IPv4Address | IPv6Address,
        peerAddress: IPv4Address | IPv6Address,
    ) -> None:
        """
        @param harness: The harness whose steps deliver this transport's
            events.
        @param protocol: The leg.
        @param hostAddress: What C{getHost} returns.
        @param peerAddress: What C{getPeer} returns.
        """
        # Lenient: a real transport ignores resumeProducing after a close.
        super().__init__(hostAddress, peerAddress, lenient=True)
        self._harness = harness
        self.protocol = protocol
        self.writeShutDown = False
        self.aborted = False
        self.lost = False
        self.lostReason: Failure | None = None
        self.droppedWrites: list[bytes] = []
        self.bufferSize = 65536
        self._inbound: list[object] = []
        self._peerEnded = False
        self._noDelay = False
        self._keepAlive = False

    # -- ITransport -----------------------------------------------------

    def write(self, data: bytes) -> None:
        """
        Record bytes the proxy sends, unless the write side is closed.
        """
        if not isinstance(data, bytes):
            raise TypeError(f"write() takes bytes, not {type(data).__name__}")
        if self.writeShutDown or self.aborted or self.lost:
            self.droppedWrites.append(data)
            return
        super().write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        """
        Record a sequence of writes.
        """
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        """
        Close cleanly: the leg's C{connectionLost} gets L{ConnectionDone}
        at the harness's next step.
        """
        if self.disconnecting or self.lost:
            return
        self.disconnecting = True
        self._harness._later(self._lose, error.ConnectionDone("closed by the proxy"))

    def abortConnection(self) -> None:
        """
        Reset: the leg's C{connectionLost} gets L{ConnectionAborted} at the
        harness's next step; what the peer sent and the leg did not read yet
        is discarded.
        """
        if self.aborted or self.lost:
            return
        self.aborted = True
        self.disconnecting = True
        self.disconnected = True
        self._inbound = []
        self._harness._later(self._lose, error.ConnectionAborted())

    # -- ITCPTransport --------------------------------------------------

    def loseWriteConnection(self) -> None:
        """
        Send a FIN: the leg's C{writeConnectionLost} is called at the
        harness's next step.
        """
        if self.writeShutDown or self.lost:
            return
        self.writeShutDown = True
        self._harness._later(self._writeLost)

    def getTcpNoDelay(self) -> bool:
        """
        See L{ITCPTransport.getTcpNoDelay}.
        """
        return self._noDelay

    def setTcpNoDelay(self, enabled: bool) -> None:
        """
        See L{ITCPTransport.setTcpNoDelay}.
        """
        self._noDelay = bool(enabled)

    def getTcpKeepAlive(self) -> bool:
        """
        See L{ITCPTransport.getTcpKeepAlive}.
        """
        return self._keepAlive

    def setTcpKeepAlive(self, enabled: bool) -> None:
        """
        See L{ITCPTransport.setTcpKeepAlive}.
        """
        self._keepAlive = bool(enabled)

    # -- IPushProducer: the proxy pausing and resuming reading ----------

    def resumeProducing(self) -> None:
        """
        Read again: what the peer sent meanwhile is delivered at the
        harness's next step.
        """
        super().resumeProducing()
        self._harness._later(self._deliver)

    @property
    def readingPaused(self) -> bool:
        """
        Whether the proxy has paused reading this leg.
        """
        return self.producerState == "paused"

    # -- the peer -------------------------------------------------------

    def peerSends(self, item: object) -> None:
        """
        Queue bytes (or the end of the stream) from the peer, to be
        delivered in order whenever the leg reads.

        @raise RuntimeError: If the peer already ended its direction.
        """
        if self._peerEnded:
            raise RuntimeError(f"the peer of {self.protocol!r} already ended its stream")
        if item is _FIN or item is _CLOSE:
            self._peerEnded = True
        if self.lost or self.disconnecting:
            # The proxy stopped reading this connection: nothing arrives.
            return
        self._inbound.append(item)
        self._harness._later(self._deliver)

    def peerResets(self) -> None:
        """
        The peer resets the connection: the leg's C{connectionLost} gets
        L{ConnectionLost} at the harness's next step.
        """
        self._peerEnded = True
        self._inbound = []
        self._harness._later(self._lose, error.ConnectionLost("reset by the peer"))

    @property
    def pendingFromPeer(self) -> int:
        """
        How many bytes the peer sent that the leg did not read yet.
        """
        return sum(len(item) for item in self._inbound if isinstance(item, bytes))

    def _deliver(self) -> None:
        # One read per step, as a reactor does; the next one is scheduled.
        if not self._inbound or self.readingPaused or self.lost or self.disconnecting:
            return
        item = self._inbound.pop(0)
        if item is _FIN:
            halfCloseable = IHalfCloseableProtocol(self.protocol, None)
            if halfCloseable is not None:
                halfCloseable.readConnectionLost()
            else:
                self._lose(error.ConnectionDone("closed by the peer"))
        elif item is _CLOSE:
            self._lose(error.ConnectionDone("closed by the peer"))
        else:
            self.protocol.dataReceived(item)  # type: ignore[arg-type]
        if self._inbound:
            self._harness._later(self._deliver)

    def _writeLost(self) -> None:
        if self.lost:
            return
        halfCloseable = IHalfCloseableProtocol(self.protocol, None)
        if halfCloseable is not None:
            halfCloseable.writeConnectionLost()

    def _lose(self, reason: Exception) -> None:
        if self.lost:
            return
        self.lost = True
        self.connected = False
        self.disconnecting = True
        self.disconnected = True
        self._inbound = []
        self.lostReason = Failure(reason)
        self.protocol.connectionLost(self.lostReason)


class ConnectAttempt:
    """
    One outgoing leg the flow asked the L{FakeDialer} for.

    @ivar nextHop: What the flow dialed.
    @ivar factory: The flow's outgoing leg factory.
    @ivar deferred: What the dialer returned to the flow.
    @ivar cancelled: Whether the flow cancelled the attempt.
    @ivar protocol: The connected leg, once connected.
    """

    def __init__(self, nextHop: NextHop, factory: IProtocolFactory) -> None:
        """
        @param nextHop: What the flow dialed.
        @param factory: The factory of the leg to connect.
        """
        self.nextHop = nextHop
        self.factory = factory
        self.cancelled = False
        self.protocol: OutgoingLeg | None = None
        self._timeoutCall: Any = None
        self.deferred: Deferred = Deferred(self._cancel)

    def _cancel(self, d: Deferred) -> None:
        self.cancelled = True
        self._stopTimer()

    def _stopTimer(self) -> None:
        call, self._timeoutCall = self._timeoutCall, None
        if call is not None and call.active():
            call.cancel()

    @property
    def pending(self) -> bool:
        """
        Whether the attempt has neither connected, failed nor been cancelled.
        """
        return not self.deferred.called

    def fail(self, reason: Failure | BaseException) -> None:
        """
        Fail the attempt.
        """
        self._stopTimer()
        self.deferred.errback(reason if isinstance(reason, Failure) else Failure(reason))


class FakeDialer:
    """
    A dialer that records connection attempts; the test connects or fails
    each one with L{FlowDriver.connectOutgoing} or
    L{FlowDriver.failOutgoing}.  Like the real dialer, an attempt fails
    with L{twisted.internet.error.TimeoutError} once C{timeout} seconds of
    the harness's clock passed.

    @ivar attempts: Every attempt, in order.
    """

    def __init__(
        self,
        reactor: Any,
        timeout: float,
        onAttempt: Callable[[ConnectAttempt], None] | None = None,
    ) -> None:
        """
        @param reactor: The clock the timeouts run on.
        @param timeout: Seconds before an attempt fails; 0 for never.
        @param onAttempt: Called with each new attempt, if given.
        """
        self.reactor = reactor
        self.timeout = timeout
        self.attempts: list[ConnectAttempt] = []
        self._onAttempt = onAttempt

    def connect(self, nextHop: NextHop, factory: IProtocolFactory) -> Deferred:
        """
        Record an attempt.

        @return: A cancellable L{Deferred}, as the real dialer's.
        """
        attempt = ConnectAttempt(nextHop, factory)
        self.attempts.append(attempt)
        if self.timeout:
            attempt._timeoutCall = self.reactor.callLater(
                self.timeout,
                attempt.fail,
                error.TimeoutError(string=f"connecting to {nextHop}"),
            )
        if self._onAttempt is not None:
            self._onAttempt(attempt)
        return attempt.deferred


class FlowHarness:
    """
    One listener of the real relay, on in-memory transports.

    @ivar reactor: The fake reactor (a L{MemoryReactorClock} unless given).
    @ivar limits: The listener's bounds.
    @ivar functions: The configured functions, as C{(name, factory)} pairs.
    @ivar table: The flow table, shared by every flow of the harness.
    @ivar dialer: The L{FakeDialer}.
    @ivar context: The real L{ListenerContext}.
    @ivar factory: The real L{AcceptedLegFactory}.
    @ivar closedFlows: Every flow that closed, in order (the listener's
        C{onFlowClosed} callback, called right after the access-log line).
    @ivar drivers: Every L{FlowDriver} L{accept} made, in order.
    """

    def __init__(
        self,
        functions: Sequence[Any] = (),
        *,
        mode: ConnectMode = ConnectMode.EARLY,
        to: NextHop | str | None = NextHop(HostPort("198.51.100.1", 80)),
        transparent: bool = False,
        limits: Limits = Limits(),
        reactor: Any = None,
        client: HostPort = HostPort("192.0.2.1", 40000),
        local: HostPort = HostPort("203.0.113.1", 8080),
        table: FlowTable | None = None,
        autoConnect: bool = False,
    ) -> None:
        """
        @param functions: The functions, in order.  Each is an
            L{IFlowHandlerFactory} provider (such as L{RecordingFunction}), a
            C{(name, factory)} pair (as L{configured} returns), an
            L{IProxyFunction} plugin (configured with no settings), or a
            C{(plugin, settings)} pair.  Plugins are configured with
            C{reactor}.
        @param mode: The listener's connect mode.
        @param to: The static next hop (a L{NextHop} or a client endpoint
            string), or L{None} for none.  Give L{None} together with
            C{transparent=True} for a transparent listener.
        @param transparent: Whether flows are intercepted: a flow's
            destination is then the local address it was accepted on.
        @param limits: The bounds.
        @param reactor: The reactor; a new L{MemoryReactorClock} by default.
        @param client: The default client address of L{accept}.
        @param local: The default local address of L{accept} (the original
            destination, for a transparent listener).
        @param table: The flow table; a new one from C{limits} by default.
        @param autoConnect: Whether every outgoing leg connects as soon as
            the flow dials it (at the harness's next step), instead of
            waiting for L{FlowDriver.connectOutgoing}.
        """
        self.reactor = reactor if reactor is not None else MemoryReactorClock()
        self.limits = limits
        self.client = client
        self.local = local
        self.autoConnect = autoConnect
        if isinstance(to, str):
            to = NextHop.fromString(to)
        self.functions = tuple(_normalizeFunction(f, self.reactor) for f in functions)
        self.table = (
            table
            if table is not None
            else FlowTable(limits.maxFlows, limits.maxFlowsPerSource)
        )
        self.dialer = FakeDialer(self.reactor, limits.connectTimeout, self._attempted)
        self.closedFlows: list[Flow] = []
        self.drivers: list[FlowDriver] = []
        self._events: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._flushing = False
        self.context = ListenerContext(
            self.reactor,
            ListenerSettings(
                endpoint="memory:harness",
                mode=mode,
                to=to,
                transparent=transparent,
                functionNames=tuple(name for name, _ in self.functions),
            ),
            limits,
            self.functions,
            self.table,
            dialer=self.dialer,  # type: ignore[arg-type]
            onFlowClosed=self.closedFlows.append,
        )
        self.factory = AcceptedLegFactory(self.context)

    # -- time and pending events ---------------------------------------

    def _later(self, f: Callable[..., Any], *args: Any) -> None:
        self._events.append((f, args))

    def flush(self) -> None:
        """
        Do what a reactor would do next, until nothing is left: deliver
        FINs the proxy sent, closes and resets, and what the peers sent
        once the proxy reads again.  Every step of a L{FlowDriver} ends
        with this; call it after firing a L{Deferred} a function waits on.
        """
        if self._flushing:
            return
        self._flushing = True
        try:
            for _ in range(1_000_000):
                if not self._events:
                    return
                f, args = self._events.pop(0)
                f(*args)
            raise RuntimeError("the harness's events never settle")
        finally:
            self._flushing = False

    def advance(self, seconds: float) -> None:
        """
        Let time pass on the harness's clock (idle and connect timeouts,
        calls functions scheduled), then L{flush}.
        """
        self.reactor.advance(seconds)
        self.flush()

    def _attempted(self, attempt: ConnectAttempt) -> None:
        if self.autoConnect:
            self._later(self._connectIfPending, attempt)

    def _connectIfPending(self, attempt: ConnectAttempt) -> None:
        if attempt.pending:
            self._connect(attempt, None)

    def _connect(self, attempt: ConnectAttempt, local: HostPort | None) -> OutgoingLeg:
        protocol = attempt.factory.buildProtocol(_address(attempt.nextHop.address))
        host = local if local is not None else HostPort("198.51.100.254", 50000 + len(self.dialer.attempts))
        transport = MemoryLegTransport(
            self, protocol, _address(host), _address(attempt.nextHop.address)
        )
        attempt.protocol = protocol
        attempt._stopTimer()
        # As an endpoint does: the protocol is connected, then the Deferred
        # fires with it.
        protocol.makeConnection(transport)
        attempt.deferred.callback(protocol)
        return protocol  # type: ignore[return-value]

    # -- flows ----------------------------------------------------------

    def accept(
        self, client: HostPort | None = None, local: HostPort | None = None
    ) -> FlowDriver:
        """
        A client connects: the listener admits it (or refuses it over a
        limit), makes the accepted leg and its flow, and runs the early-SYN
        and accepted hooks.

        @param client: The client's address; C{self.client} by default.
        @param local: The address it connected to; C{self.local} by
            default.
        @return: The driver of the new flow.  Its C{refusedAtAccept} tells
            whether the listener refused it; it then has no flow.
        """
        client = client if client is not None else self.client
        local = local if local is not None else self.local
        driver = FlowDriver(self, client, local)
        self.drivers.append(driver)
        leg = self.factory.buildProtocol(_address(client))
        if leg is None:
            driver.refusedAtAccept = True
            return driver
        transport = MemoryLegTransport(self, leg, _address(local), _address(client))
        driver.acceptedLeg = leg
        driver.clientTransport = transport
        leg.makeConnection(transport)
        self.flush()
        return driver

    def syn(self, client: HostPort | None = None, local: HostPort | None = None) -> FlowDriver:
        """
        A SYN tap sees a client's SYN: the flow begins at L{Moment.SYN}
        (its early-SYN hooks run and, in C{early} mode, its outgoing leg
        starts) before the client's handshake is complete.  Complete it
        with L{FlowDriver.handshakeCompletes}.

        This drives the flow itself, as the service's SYN handling does
        once it matched the SYN to this listener; the matching (and the
        pending-SYN bounds) are not part of the harness.

        @param client: The client's address; C{self.client} by default.
        @param local: The address the SYN is for; C{self.local} by default.
        @return: The driver of the new flow.  Its C{refusedAtAccept} tells
            whether the flow table refused it; it then has no flow.
        """
        client = client if client is not None else self.client
        local = local if local is not None else self.local
        driver = FlowDriver(self, client, local)
        self.drivers.append(driver)
        if self.table.admit(client.host) is not None:
            driver.refusedAtAccept = True
            return driver
        flow = Flow(self.context, client, local)
        driver._synFlow = flow
        flow.begin(Moment.SYN)
        self.flush()
        return driver


class FlowDriver:
    """
    The client and the server of one flow of a L{FlowHarness}, under the
    test's control, and what the proxy did to each.

    Every method that acts ends with L{FlowHarness.flush}.

    @ivar harness: The harness.
    @ivar client: The client's address.
    @ivar local: The address it connected to.
    @ivar refusedAtAccept: Whether the listener refused the connection
        before it became a flow.
    @ivar acceptedLeg: The real L{AcceptedLeg}, unless refused.
    @ivar clientTransport: Its L{MemoryLegTransport}, unless refused.
    """

    def __init__(self, harness: FlowHarness, client: HostPort, local: HostPort) -> None:
        """
        @param harness: The harness.
        @param client: The client's address.
        @param local: The address it connected to.
        """
        self.harness = harness
        self.client = client
        self.local = local
        self.refusedAtAccept = False
        self.acceptedLeg: AcceptedLeg | None = None
        self.clientTransport: MemoryLegTransport | None = None
        self._synFlow: Flow | None = None

    def __repr__(self) -> str:
        return f"<FlowDriver {self.flow!r}>"

    @property
    def flow(self) -> Flow | None:
        """
        The real L{Flow}, or L{None} if the listener refused the connection.
        """
        if self.acceptedLeg is not None:
            return self.acceptedLeg.flow
        return self._synFlow

    def handshakeCompletes(self) -> AcceptedLeg:
        """
        The kernel hands over the connection of a flow begun at
        L{FlowHarness.syn}: the accepted leg joins that flow (which may
        already be connected upstream, or over) and its accepted hooks
        run.

        @raise RuntimeError: If the flow was not begun at a SYN, or already
            has its accepted leg.
        @return: The accepted leg.
        """
        flow = self._synFlow
        if flow is None or self.acceptedLeg is not None:
            raise RuntimeError("no flow begun at a SYN is waiting for its accept")
        leg = AcceptedLeg()
        leg.factory = self.harness.factory
        leg.flow = flow
        transport = MemoryLegTransport(
            self.harness, leg, _address(self.local), _address(self.client)
        )
        self.acceptedLeg = leg
        self.clientTransport = transport
        # What makeConnection does, without connectionMade (which would
        # look the flow up): the listener already knows it.
        leg.connected = 1
        leg.transport = transport
        flow.acceptedLegMade(leg)
        self.harness.flush()
        return leg

    # -- the outgoing leg -----------------------------------------------

    @property
    def attempts(self) -> list[ConnectAttempt]:
        """
        This flow's connection attempts, in order.
        """
        flow = self.flow
        return [
            a
            for a in self.harness.dialer.attempts
            if getattr(a.factory, "flow", None) is flow
        ]

    @property
    def attempt(self) -> ConnectAttempt | None:
        """
        This flow's latest connection attempt, or L{None} if it dialed
        nothing.
        """
        attempts = self.attempts
        return attempts[-1] if attempts else None

    @property
    def dialed(self) -> NextHop | None:
        """
        What the flow dialed, or L{None} if it has not started its outgoing
        leg.
        """
        attempt = self.attempt
        return attempt.nextHop if attempt is not None else None

    @property
    def connecting(self) -> bool:
        """
        Whether the flow's outgoing leg is being connected.
        """
        attempt = self.attempt
        return attempt is not None and attempt.pending

    @property
    def outgoingLeg(self) -> OutgoingLeg | None:
        """
        The real L{OutgoingLeg}, once connected.
        """
        attempt = self.attempt
        return attempt.protocol if attempt is not None else None

    @property
    def serverTransport(self) -> MemoryLegTransport | None:
        """
        The outgoing leg's L{MemoryLegTransport}, once connected.
        """
        leg = self.outgoingLeg
        return leg.transport if leg is not None else None  # type: ignore[return-value]

    def _pendingAttempt(self) -> ConnectAttempt:
        attempt = self.attempt
        if attempt is None or not attempt.pending:
            raise RuntimeError(f"{self.flow!r} is not connecting an outgoing leg")
        return attempt

    def connectOutgoing(self, local: HostPort | None = None) -> OutgoingLeg:
        """
        The server accepts the outgoing leg: the flow's
        C{outgoingConnected} hooks run and held bytes are written.

        @param local: The outgoing leg's local address; an arbitrary one by
            default.
        @raise RuntimeError: If the flow is not connecting.
        @return: The outgoing leg.
        """
        leg = self.harness._connect(self._pendingAttempt(), local)
        self.harness.flush()
        return leg

    def failOutgoing(self, reason: Failure | BaseException | None = None) -> None:
        """
        The outgoing leg fails to connect.

        @param reason: Why; L{ConnectionRefusedError} by default.  Give
            L{twisted.internet.error.TimeoutError} for a timeout, or let
            the harness's clock run past C{limits.connectTimeout}.
        @raise RuntimeError: If the flow is not connecting.
        """
        if reason is None:
            reason = error.ConnectionRefusedError()
        self._pendingAttempt().fail(reason)
        self.harness.flush()

    # -- what the peers do ----------------------------------------------

    def _client(self) -> MemoryLegTransport:
        if self.clientTransport is None:
            raise RuntimeError("no accepted leg: refused, or still at its SYN")
        return self.clientTransport

    def _server(self) -> MemoryLegTransport:
        transport = self.serverTransport
        if transport is None:
            raise RuntimeError(f"{self.flow!r} has no connected outgoing leg")
        return transport

    def _act(self, transport: MemoryLegTransport, item: object) -> None:
        transport.peerSends(item)
        self.harness.flush()

    def clientSends(self, data: bytes) -> None:
        """
        The client sends bytes.  They reach the flow at once, or when the
        proxy reads again if it paused the accepted leg.
        """
        self._act(self._client(), bytes(data))

    def serverSends(self, data: bytes) -> None:
        """
        The server sends bytes, as L{clientSends}.
        """
        self._act(self._server(), bytes(data))

    def clientHalfCloses(self) -> None:
        """
        The client sends a FIN, after the bytes it sent.
        """
        self._act(self._client(), _FIN)

    def serverHalfCloses(self) -> None:
        """
        The server sends a FIN, after the bytes it sent.
        """
        self._act(self._server(), _FIN)

    def clientCloses(self) -> None:
        """
        The client's connection ends cleanly without a half-close first, as
        a TLS connection does: the leg's C{connectionLost} gets
        L{ConnectionDone} after the bytes sent before.
        """
        self._act(self._client(), _CLOSE)

    def serverCloses(self) -> None:
        """
        The server's connection ends cleanly without a half-close first, as
        L{clientCloses}.
        """
        self._act(self._server(), _CLOSE)

    def clientResets(self) -> None:
        """
        The client resets the connection (RST).
        """
        self._client().peerResets()
        self.harness.flush()

    def serverResets(self) -> None:
        """
        The server resets the connection (RST).
        """
        self._server().peerResets()
        self.harness.flush()

    def _setBlocked(self, transport: MemoryLegTransport, blocked: bool) -> None:
        # What a TCP transport does when its send buffer fills up or
        # drains: pause or resume the producer the proxy registered on it.
        producer = transport.producer
        if producer is not None:
            if blocked:
                producer.pauseProducing()
            else:
                producer.resumeProducing()
        self.harness.flush()

    def clientStopsReading(self) -> None:
        """
        The client stops reading: the accepted leg's transport pauses the
        producer the proxy registered on it (the outgoing leg).
        """
        self._setBlocked(self._client(), True)

    def clientResumesReading(self) -> None:
        """
        The client reads again: the accepted leg's transport resumes its
        producer.
        """
        self._setBlocked(self._client(), False)

    def serverStopsReading(self) -> None:
        """
        The server stops reading: the outgoing leg's transport pauses the
        producer the proxy registered on it (the accepted leg).
        """
        self._setBlocked(self._server(), True)

    def serverResumesReading(self) -> None:
        """
        The server reads again.
        """
        self._setBlocked(self._server(), False)

    # -- what the proxy did ---------------------------------------------

    def sentToClient(self) -> bytes:
        """
        Every byte the proxy wrote to the client so far.
        """
        return self.clientTransport.value() if self.clientTransport is not None else b""

    def sentToServer(self) -> bytes:
        """
        Every byte the proxy wrote to the server so far.
        """
        transport = self.serverTransport
        return transport.value() if transport is not None else b""

    @property
    def finSentToClient(self) -> bool:
        """
        Whether the proxy shut the accepted leg's write side down (a FIN).
        """
        return self.clientTransport is not None and self.clientTransport.writeShutDown

    @property
    def finSentToServer(self) -> bool:
        """
        Whether the proxy shut the outgoing leg's write side down (a FIN).
        """
        transport = self.serverTransport
        return transport is not None and transport.writeShutDown

    @property
    def clientLegClosed(self) -> bool:
        """
        Whether the proxy closed the accepted leg cleanly
        (C{loseConnection}), not by a reset.
        """
        t = self.clientTransport
        return t is not None and t.disconnecting and not t.aborted

    @property
    def serverLegClosed(self) -> bool:
        """
        Whether the proxy closed the outgoing leg cleanly.
        """
        t = self.serverTransport
        return t is not None and t.disconnecting and not t.aborted

    @property
    def clientLegReset(self) -> bool:
        """
        Whether the proxy reset the accepted leg (C{abortConnection}).
        """
        return self.clientTransport is not None and self.clientTransport.aborted

    @property
    def serverLegReset(self) -> bool:
        """
        Whether the proxy reset the outgoing leg.
        """
        transport = self.serverTransport
        return transport is not None and transport.aborted

    @property
    def clientLegPaused(self) -> bool:
        """
        Whether the proxy paused reading from the client.
        """
        return self.clientTransport is not None and self.clientTransport.readingPaused

    @property
    def serverLegPaused(self) -> bool:
        """
        Whether the proxy paused reading from the server.
        """
        transport = self.serverTransport
        return transport is not None and transport.readingPaused

    @property
    def closed(self) -> bool:
        """
        Whether the flow is closed (its C{closed} hooks ran and its
        access-log line was written).
        """
        return self.flow is not None and self.flow in self.harness.closedFlows


class HookCall(NamedTuple):
    """
    One hook call a L{RecordingHandler} saw.

    @ivar function: The recording function's name.
    @ivar hook: The hook's name, as in L{IFlowHandler}.
    @ivar detail: The chunk's bytes for a data hook (as the handler got
        them), the reason for C{outgoingFailed}, L{None} otherwise.
    """

    function: str
    hook: str
    detail: bytes | str | None = None


#: An answer for a hook: a verdict (or any object, to test what the relay
#: does with a bad one), or a callable taking the hook's arguments that
#: returns one and may act on the flow (or raise).
Answer = Any


@implementer(IFlowHandler)
class RecordingHandler:
    """
    A handler that records its hook calls and answers as told.

    @ivar flow: The flow it handles.
    """

    def __init__(self, function: RecordingFunction, flow: Flow) -> None:
        """
        @param function: The function whose C{calls} and C{verdicts} the
            handler uses.
        @param flow: The flow.
        """
        self._function = function
        self.flow = flow
        self.wantsData = function.wantsData

    def _hook(self, hook: str, flow: Flow, *args: Any) -> Any:
        detail: bytes | str | None = None
        if args:
            first = args[0]
            detail = first.data if hook.startswith("data") else first
        self._function.calls.append(HookCall(self._function.name, hook, detail))
        answer = self._function.verdicts.get(hook, CONTINUE)
        if callable(answer):
            return answer(flow, *args)
        return answer

    def earlySyn(self, flow: Flow) -> Verdict:
        """
        See L{IFlowHandler.earlySyn}.
        """
        return self._hook("earlySyn", flow)

    def accepted(self, flow: Flow) -> Verdict:
        """
        See L{IFlowHandler.accepted}.
        """
        return self._hook("accepted", flow)

    def outgoingConnected(self, flow: Flow) -> Verdict:
        """
        See L{IFlowHandler.outgoingConnected}.
        """
        return self._hook("outgoingConnected", flow)

    def outgoingFailed(self, flow: Flow, reason: str) -> Verdict:
        """
        See L{IFlowHandler.outgoingFailed}.
        """
        return self._hook("outgoingFailed", flow, reason)

    def dataFromClient(self, flow: Flow, chunk: Any) -> Verdict:
        """
        See L{IFlowHandler.dataFromClient}.
        """
        return self._hook("dataFromClient", flow, chunk)

    def dataFromServer(self, flow: Flow, chunk: Any) -> Verdict:
        """
        See L{IFlowHandler.dataFromServer}.
        """
        return self._hook("dataFromServer", flow, chunk)

    def clientHalfClosed(self, flow: Flow) -> Verdict:
        """
        See L{IFlowHandler.clientHalfClosed}.
        """
        return self._hook("clientHalfClosed", flow)

    def serverHalfClosed(self, flow: Flow) -> Verdict:
        """
        See L{IFlowHandler.serverHalfClosed}.
        """
        return self._hook("serverHalfClosed", flow)

    def closed(self, flow: Flow) -> Verdict:
        """
        See L{IFlowHandler.closed}.
        """
        self._hook("closed", flow)
        return CONTINUE


@implementer(IFlowHandlerFactory)
class RecordingFunction:
    """
    A configured proxy function whose handlers record every hook call, in
    order, and answer as the test says.

    Give several of them the same C{calls} list to see the order in which
    the hooks of several functions run.

    @ivar name: The function's name.
    @ivar calls: The L{HookCall}s of every flow, in order.
    @ivar verdicts: What each hook answers, by hook name (C{CONTINUE} when
        absent): a L{Verdict}, any other object (returned as it is), or a
        callable taking the hook's arguments (the flow, then the chunk or
        the reason) and returning the answer; it may act on the flow or
        raise.
    @ivar wantsData: Whether the data hooks are called.
    @ivar handlers: The handler made for each flow, in order.
    """

    def __init__(
        self,
        name: str = "recorder",
        calls: list[HookCall] | None = None,
        verdicts: Mapping[str, Answer] | None = None,
        wantsData: bool = True,
    ) -> None:
        """
        @param name: The function's name.
        @param calls: The list to record calls in; a new one by default.
        @param verdicts: What hooks answer (see C{verdicts} above).
        @param wantsData: Whether the data hooks are called.
        """
        self.name = name
        self.calls: list[HookCall] = calls if calls is not None else []
        self.verdicts: dict[str, Answer] = dict(verdicts or {})
        self.wantsData = wantsData
        self.handlers: list[RecordingHandler] = []

    def handlerForFlow(self, flow: Flow) -> RecordingHandler:
        """
        See L{IFlowHandlerFactory.handlerForFlow}.
        """
        handler = RecordingHandler(self, flow)
        self.handlers.append(handler)
        return handler

    def hooks(self) -> list[str]:
        """
        The names of the hooks called so far, in order.
        """
        return [call.hook for call in self.calls if call.function == self.name]
