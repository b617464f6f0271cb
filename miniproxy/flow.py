# -*- test-case-name: tests.test_flow -*-
"""
The flow: one proxied connection, a pair of legs, and everything the proxy
functions see of it.

The L{Flow} drives the relay between its two legs: it runs the hooks of its
functions, holds early bytes until the outgoing leg is connected, moves
bytes in both directions with backpressure, turns a FIN on one leg into a
FIN on the other, and an abort on one leg into a reset on the other.
"""

from __future__ import annotations

import heapq
import socket
import struct
from enum import Enum
from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from miniproxy.address import DestinationSource, HostPort, NextHop
from miniproxy.chain import HandlerChain, HookFailed
from miniproxy.interfaces import IFlow
from miniproxy.verdict import CONTINUE

if TYPE_CHECKING:
    from miniproxy.legs import Leg
    from miniproxy.listener import ListenerContext

_log = Logger(namespace="miniproxy.flow")


class ConnectMode(Enum):
    """
    When a listener starts a flow's outgoing leg.

    @cvar EARLY: At the early-SYN hook: at the client's SYN when a SYN tap
        runs, otherwise at accept (the earliest moment the proxy sees).
    @cvar ACCEPT: When the kernel hands over the accepted connection.
    @cvar FIRST_DATA: When the first byte is to be sent upstream, which is
        what a function that must read the request (a cache, a sniffer)
        needs.
    """

    EARLY = "early"
    ACCEPT = "accept"
    FIRST_DATA = "first-data"


class Moment(Enum):
    """
    The moment that started an outgoing leg.
    """

    SYN = "syn"
    ACCEPT = "accept"
    FIRST_DATA = "first-data"


class Outcome(Enum):
    """
    How a flow ended.

    @cvar OK: Both directions finished with a FIN.
    @cvar REFUSED: A limit or a function refused the flow.
    @cvar CONNECT_FAILED: The outgoing leg could not connect.
    @cvar CONNECT_TIMEOUT: The outgoing leg did not connect in time.
    @cvar RESET: One leg was reset or failed; the other was reset too.
    @cvar IDLE_TIMEOUT: No byte passed for the idle timeout.
    @cvar ABORTED: A function aborted the flow, or a function failed.
    """

    OK = "ok"
    REFUSED = "refused"
    CONNECT_FAILED = "connect-failed"
    CONNECT_TIMEOUT = "connect-timeout"
    RESET = "reset"
    IDLE_TIMEOUT = "idle-timeout"
    ABORTED = "aborted"


class FlowTimes:
    """
    The timestamps of a flow, in seconds of the reactor's clock; L{None}
    until the moment happens.
    """

    __slots__ = (
        "synSeen",
        "accepted",
        "outgoingStarted",
        "outgoingConnected",
        "firstByteFromClient",
        "firstByteFromServer",
        "clientHalfClosed",
        "serverHalfClosed",
        "closed",
    )

    synSeen: float | None
    accepted: float | None
    outgoingStarted: float | None
    outgoingConnected: float | None
    firstByteFromClient: float | None
    firstByteFromServer: float | None
    clientHalfClosed: float | None
    serverHalfClosed: float | None
    closed: float | None

    def __init__(self) -> None:
        # Chained assignments: a loop of setattr over __slots__ is several
        # times slower, and every flow makes one of these.
        self.synSeen = self.accepted = self.outgoingStarted = None
        self.outgoingConnected = self.firstByteFromClient = None
        self.firstByteFromServer = self.clientHalfClosed = None
        self.serverHalfClosed = self.closed = None

    def asDict(self) -> dict[str, float | None]:
        """
        The timestamps by name.
        """
        return {name: getattr(self, name) for name in self.__slots__}


# Outcomes after which a leg that is still to come is reset, not closed.
_RESET_OUTCOMES = frozenset(
    {Outcome.RESET, Outcome.ABORTED, Outcome.IDLE_TIMEOUT}
)

# Why a leg's reading is paused: a bit each.
PAUSED_BY_PEER = 1  # the other leg's transport buffer is full
PAUSED_EARLY = 2  # the bytes held before the outgoing leg connects are full
PAUSED_SPLICE = 4  # the splice path's pipe holds bytes the other leg has not taken


def describeFailure(reason: Failure) -> str:
    """
    A short human-readable description of a connection failure.
    """
    value = reason.value
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, error.TimeoutError):
        return "connect timed out"
    if isinstance(value, error.DNSLookupError):
        return f"DNS lookup failed: {value}"
    # ConnectionAborted is a ConnectionLost: test it first.
    if isinstance(value, error.ConnectionAborted):
        return "connection aborted"
    if isinstance(value, error.ConnectionLost):
        return "connection reset"
    text = str(value).strip() or type(value).__name__
    return text


#: The handlers of a flow whose listener runs no function (shared: a chain
#: with no handler never changes).
_NO_HANDLERS = HandlerChain(())


class _IdleEntry:
    """
    A flow's place in L{IdleTimers}: when it is to be checked.
    """

    __slots__ = ("deadline", "flow")

    def __init__(self, deadline: float, flow: Flow) -> None:
        self.deadline = deadline
        self.flow = flow

    def __lt__(self, other: _IdleEntry) -> bool:
        return self.deadline < other.deadline


class IdleTimers:
    """
    The idle timeouts of the flows of one table, with one delayed call for
    all of them instead of one per flow (a delayed call, its bound methods
    and argument containers are some 400 bytes a flow, and a push and a pop
    on the reactor's heap).

    Each flow has one entry in a heap, due when it would time out if no
    byte passed since it was checked: its last activity plus its idle
    timeout.  When an entry is due, the flow is reset if it was idle that
    long, or its entry is pushed again for its new deadline: the timeout is
    exact, as with a delayed call per flow.  An entry whose flow finished
    or was rescheduled is dropped when it comes up, and the heap is rebuilt
    without them when they are over half of it.

    @ivar watched: How many flows are watched.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._heap: list[_IdleEntry] = []
        self._call: Any = None
        self._checking = False
        self._stale = 0
        self.watched = 0

    def watch(self, flow: Flow, deadline: float) -> _IdleEntry:
        """
        Check C{flow} at C{deadline} (reactor seconds).

        @return: Its entry, which the flow keeps while it is watched.
        """
        self.watched += 1
        return self._push(flow, deadline)

    def _push(self, flow: Flow, deadline: float) -> _IdleEntry:
        entry = _IdleEntry(deadline, flow)
        heap = self._heap
        heapq.heappush(heap, entry)
        call = self._call
        if self._checking:
            # _due schedules the next call once it is done.
            pass
        elif call is None:
            # The earliest entry, which may be older than this one.
            self._call = self.reactor.callLater(
                max(heap[0].deadline - self.reactor.seconds(), 0), self._due
            )
        elif deadline < call.getTime():
            call.reset(max(deadline - self.reactor.seconds(), 0))
        return entry

    def forget(self, entry: _IdleEntry) -> None:
        """
        The flow of C{entry} finished: stop watching it.
        """
        entry.flow = None  # type: ignore[assignment]
        self.watched -= 1
        self._stale += 1
        if not self.watched:
            self._heap = []
            self._stale = 0
            call, self._call = self._call, None
            if call is not None and call.active():
                call.cancel()
        elif self._stale > 64 and self._stale * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e.flow is not None]
            heapq.heapify(self._heap)
            self._stale = 0

    def _due(self) -> None:
        self._call = None
        now = self.reactor.seconds()
        self._checking = True
        try:
            self._check(now)
        finally:
            self._checking = False
        if not self.watched:
            self._heap = []
            self._stale = 0
        elif self._heap and self._call is None:
            self._call = self.reactor.callLater(
                max(self._heap[0].deadline - self.reactor.seconds(), 0), self._due
            )

    def _check(self, now: float) -> None:
        # A reset below may end other flows, which may rebuild the heap:
        # always use the current one.
        while self._heap and self._heap[0].deadline <= now:
            entry = heapq.heappop(self._heap)
            flow = entry.flow
            if flow is None:
                self._stale -= 1
                continue
            idle = flow._context.limits.idleTimeout
            last = flow._lastActivity
            if now - last >= idle:
                entry.flow = None  # type: ignore[assignment]
                self.watched -= 1
                flow._idleCall = None
                flow._idleTimedOut(idle)
            else:
                flow._idleCall = self._push(flow, last + idle)


_OutgoingLegFactory: Any = None


def _outgoingLegFactory() -> Any:
    # miniproxy.legs imports this module: the class is looked up once, at
    # the first outgoing leg, rather than imported for each.
    global _OutgoingLegFactory
    if _OutgoingLegFactory is None:
        from miniproxy.legs import OutgoingLegFactory

        _OutgoingLegFactory = OutgoingLegFactory
    return _OutgoingLegFactory


def buffered(transport: Any) -> int:
    """
    The bytes a Twisted TCP transport holds in userspace, not yet written
    to its socket.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def resetTransport(transport: Any) -> None:
    """
    Abort a transport with C{SO_LINGER} 0, so that the kernel sends a RST
    (as the other leg got) instead of a FIN.
    """
    handle = getattr(transport, "getHandle", None)
    if handle is not None:
        try:
            handle().setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        except (OSError, AttributeError):
            pass
    transport.abortConnection()


@implementer(IFlow)
class Flow:
    """
    One proxied connection.  See L{IFlow} for the public part.
    """

    __slots__ = (
        "client",
        "local",
        "destination",
        "destinationSource",
        "nextHop",
        "chain",
        "mode",
        "startedBy",
        "times",
        "bytesFromClient",
        "bytesFromServer",
        "outcome",
        "reason",
        "allowed",
        "origin",
        "proxyHeader",
        "_context",
        "_chain",
        "_accepted",
        "_outgoing",
        "_connecting",
        "_toServer",
        "_toServerSize",
        "_finToServer",
        "_toClient",
        "_toClientSize",
        "_finToClient",
        "_answering",
        "_idleCall",
        "_lastActivity",
        "_finished",
        "_carrier",
        "_awaitingCarrier",
        "_splice",
    )

    def __init__(
        self,
        context: ListenerContext,
        client: HostPort,
        local: HostPort,
    ) -> None:
        self._context = context
        self.client = client
        self.local = local
        self.mode = context.mode
        self.chain: tuple[NextHop, ...] = ()
        self.startedBy: Moment | None = None
        self.times = FlowTimes()
        self.bytesFromClient = 0
        self.bytesFromServer = 0
        self.outcome: Outcome | None = None
        self.reason: str | None = None
        self.allowed = False
        self.origin: HostPort | None = None
        self.proxyHeader: Any = None
        self._carrier: Any = None
        self._awaitingCarrier = False
        self._chain = _NO_HANDLERS
        self._accepted: Leg | None = None
        self._outgoing: Leg | None = None
        self._connecting: Any = None
        # The bytes held for a leg not connected or accepted yet: a list
        # only once there are some.
        self._toServer: list[bytes] | None = None
        self._toServerSize = 0
        self._finToServer = False
        self._toClient: list[bytes] | None = None
        self._toClientSize = 0
        self._finToClient = False
        self._answering = False
        self._idleCall: Any = None
        self._lastActivity = 0.0
        self._finished = False
        # The splice path (miniproxy.splice.SpliceRelay), once a direction
        # carried splice-after bytes.
        self._splice: Any = None
        if context.staticNextHop is not None:
            self.nextHop: NextHop | None = context.staticNextHop
            self.destination: HostPort | None = context.staticNextHop.address
            self.destinationSource = DestinationSource.STATIC
        elif context.transparent:
            self.nextHop = None
            self.destination = local
            self.destinationSource = DestinationSource.TRANSPARENT
        else:
            self.nextHop = None
            self.destination = None
            self.destinationSource = DestinationSource.NONE

    def __repr__(self) -> str:
        return (
            f"<Flow {self.client} -> {self.local} dest={self.destination} "
            f"via={self.nextHop} outcome={self.outcome}>"
        )

    @property
    def reactor(self) -> IReactorTime:
        """
        The reactor the flow runs on.
        """
        return self._context.reactor

    # -- the life of a flow, driven by the legs --------------------------

    def begin(self, moment: Moment) -> None:
        """
        The proxy has learnt of the flow (at its SYN, or at accept): make
        the handlers and run the early-SYN hooks.  In C{early} mode, start
        the outgoing leg.
        """
        context = self._context
        now = context.reactor.seconds()
        if moment is Moment.SYN:
            self.times.synSeen = now
        else:
            # Known from the accept: a flow ended by an early-SYN hook is
            # logged with its start time.
            self.times.accepted = now
        if context.functions:
            handlers = []
            for name, factory in context.functions:
                handler = factory.handlerForFlow(self)
                if handler is not None:
                    handlers.append((name, handler))
            if handlers:
                self._chain = HandlerChain(handlers)
        table = context.table
        table.add(self)
        idle = context.limits.idleTimeout
        if idle:
            timers = table.idleTimers
            if timers is None:
                timers = table.idleTimers = IdleTimers(context.reactor)
            self._lastActivity = now
            self._idleCall = timers.watch(self, now + idle)
        if self._awaitingCarrier:
            # The destination is still to be read from the client's first
            # bytes: the hooks and the outgoing leg wait for it.
            return
        if not self._runLifecycleHook("earlySyn"):
            return
        if self.mode is ConnectMode.EARLY:
            self._startOutgoing(moment)

    def readCarrier(self, reader: Any, awaiting: bool) -> None:
        """
        Read an explicit carrier at the start of the client's stream (a
        PROXY v2 header): every byte from the client goes through
        C{reader} first, until it is done.  Call it before L{begin}.

        @param reader: A L{miniproxy.carriers.ICarrierReader}.
        @param awaiting: Whether the flow's destination is in those bytes
            (it was not known at the SYN): the flow then begins (its
            early-SYN hooks run, its outgoing leg may start) only once
            C{reader} is done, as if it had just been accepted.
        """
        self._carrier = reader
        self._awaitingCarrier = awaiting

    def _readCarrier(self, data: bytes) -> bytes:
        # The client's bytes while a carrier is read: what follows it.
        reader = self._carrier
        rest = reader.feed(self, data)
        if self.outcome is not None or not reader.done:
            return b""
        self._carrier = None
        if self._awaitingCarrier:
            self._awaitingCarrier = False
            if not self._runLifecycleHook("earlySyn"):
                return b""
            if self.mode is ConnectMode.EARLY:
                self._startOutgoing(Moment.ACCEPT)
            if self._accepted is not None and self.outcome is None:
                self._acceptedGoesOn(self._accepted)
            if self.outcome is not None:
                return b""
        self._maybeSplice()
        return rest or b""

    def acceptedLegMade(self, leg: Leg) -> None:
        """
        The kernel handed over the accepted leg.
        """
        self._accepted = leg
        self.times.accepted = self._context.reactor.seconds()
        leg.setBufferBound(self._context.limits.readSize)
        for tuner in self._context.tuners:
            tuner.tuneAccepted(leg.transport)
        if self.outcome is not None:
            # Refused or failed before the accept: close the leg, or reset
            # it if the flow was reset or aborted.
            if self.outcome in _RESET_OUTCOMES:
                leg.abort()
            else:
                self._closeAccepted()
            return
        if self._awaitingCarrier:
            # The rest waits until the carrier naming the destination is
            # read from this leg.
            return
        self._acceptedGoesOn(leg)

    def _acceptedGoesOn(self, leg: Leg) -> None:
        outgoing = self._outgoing
        if outgoing is not None:
            # The outgoing leg connected first (at the SYN): pair them now.
            leg.registerPeer(outgoing)
            outgoing.registerPeer(leg)
        pending, self._toClient, self._toClientSize = self._toClient, None, 0
        for data in pending or ():
            leg.write(data)
        if outgoing is not None:
            outgoing.resumeReading(PAUSED_EARLY)
        if not self._runLifecycleHook("accepted"):
            return
        if self._finToClient:
            self._shutdownWrite(leg)
        if self.mode is ConnectMode.ACCEPT:
            self._startOutgoing(Moment.ACCEPT)
        self._maybeSplice()

    def outgoingLegMade(self, leg: Leg) -> None:
        """
        The outgoing leg connected.
        """
        self._connecting = None
        if self.outcome is not None:
            # The flow ended while this leg was connecting.
            leg.abort()
            self._maybeFinish()
            return
        self._outgoing = leg
        self.times.outgoingConnected = self._context.reactor.seconds()
        leg.setBufferBound(self._context.limits.readSize)
        for tuner in self._context.tuners:
            tuner.tuneOutgoing(leg.transport)
        accepted = self._accepted
        if accepted is not None:
            accepted.registerPeer(leg)
            leg.registerPeer(accepted)
        if not self._runLifecycleHook("outgoingConnected"):
            return
        pending, self._toServer, self._toServerSize = self._toServer, None, 0
        for data in pending or ():
            leg.write(data)
        if accepted is not None:
            accepted.resumeReading(PAUSED_EARLY)
        if self._finToServer:
            self._shutdownWrite(leg)
        self._maybeSplice()

    def _startOutgoing(self, moment: Moment) -> None:
        if (
            self.startedBy is not None
            or self.outcome is not None
            or self._awaitingCarrier
        ):
            return
        if self.destinationSource is not DestinationSource.STATIC and (
            self.destination is not None or self.nextHop is not None
        ):
            if not self.allowed:
                self.refuse(
                    f"{self.destinationSource.value} destination "
                    f"{self.destination} not allowed by policy"
                )
                return
        nextHop = self.nextHop
        if nextHop is None and self.destination is not None:
            nextHop = self.nextHop = NextHop.direct(self.destination)
        if nextHop is None:
            self.refuse("no destination: configure 'to' or a policy next hop")
            return
        preamble = b""
        if nextHop.carry is not None:
            # The next proxy is told the destination in the leg's first
            # bytes, ready before the dial (so a Fast Open SYN carries it).
            from miniproxy.carriers import preambleFor

            try:
                preamble = preambleFor(self, nextHop)
            except ValueError as e:
                self.refuse(f"{nextHop}: cannot write a {nextHop.carry} header: {e}")
                return
        self.startedBy = moment
        self.times.outgoingStarted = self._context.reactor.seconds()
        d = self._context.dialer.connect(
            nextHop, _outgoingLegFactory()(self, preamble)
        )
        self._connecting = d
        # The result may already be there (a dialer that connects or fails
        # at once): the callbacks then run now, and clear _connecting.
        d.addCallbacks(
            self._connectSucceeded,
            self._connectFailed,
            callbackArgs=(d,),
            errbackArgs=(d,),
        )

    def _connectSucceeded(self, protocol: object, d: Any) -> None:
        if self._connecting is d:
            self._connecting = None
        self._maybeFinish()

    def _connectFailed(self, reason: Failure, d: Any) -> None:
        if self._connecting is not d:
            # Cancelled by the flow itself (refused, aborted, closed): not a
            # connection failure.
            self._maybeFinish()
            return
        self._connecting = None
        if self.outcome is not None:
            self._maybeFinish()
            return
        if reason.check(error.TimeoutError):
            outcome = Outcome.CONNECT_TIMEOUT
            text = "connect timed out"
        else:
            outcome = Outcome.CONNECT_FAILED
            text = describeFailure(reason)
        self._setOutcome(outcome, f"{self.nextHop}: {text}")
        # A handler may answer the client itself (an error page): let
        # writeToClient through while the hooks run, though the outcome is
        # already set.
        self._answering = True
        try:
            self._chain.run("outgoingFailed", self, text)
        except HookFailed as e:
            _log.failure("{message}", Failure(e), message=str(e))
        finally:
            self._answering = False
        self._closeAccepted()
        self._maybeFinish()

    # -- bytes --------------------------------------------------------------

    def dataFromClientLeg(self, data: bytes) -> None:
        """
        Bytes arrived on the accepted leg.
        """
        if self.outcome is not None:
            return
        if self._carrier is not None:
            data = self._readCarrier(data)
            if not data:
                return
        now = self._context.reactor.seconds()
        if not self.bytesFromClient:
            self.times.firstByteFromClient = now
        self.bytesFromClient += len(data)
        self._lastActivity = now
        if self._chain.wantsData:
            try:
                out = self._chain.runData("dataFromClient", self, data)
            except HookFailed as e:
                self._hookFailed(e)
                return
            if out is None:
                return
            data = out
        self.writeToServer(data)
        if self.bytesFromClient >= self._context.limits.spliceAfter:
            # Enough bytes this way for the splice path to pay.
            self._maybeSplice()

    def dataFromServerLeg(self, data: bytes) -> None:
        """
        Bytes arrived on the outgoing leg.
        """
        if self.outcome is not None:
            return
        now = self._context.reactor.seconds()
        if not self.bytesFromServer:
            self.times.firstByteFromServer = now
        self.bytesFromServer += len(data)
        self._lastActivity = now
        if self._chain.wantsData:
            try:
                out = self._chain.runData("dataFromServer", self, data)
            except HookFailed as e:
                self._hookFailed(e)
                return
            if out is None:
                return
            data = out
        self.writeToClient(data)
        if self.bytesFromServer >= self._context.limits.spliceAfter:
            self._maybeSplice()

    def writeToServer(self, data: bytes) -> None:
        """
        See L{IFlow.writeToServer}.
        """
        if not data or self.outcome is not None:
            return
        outgoing = self._outgoing
        if outgoing is not None:
            if outgoing.disconnected:
                # Nowhere to deliver them: tell the client, as the kernel
                # would, with a reset.
                self._setOutcome(
                    Outcome.RESET, "server closed; client bytes undeliverable"
                )
                self._resetAll()
                return
            if self._splice is not None:
                self._splice.beforeWrite(True)
            outgoing.write(data)
            return
        if self._toServer is None:
            self._toServer = []
        self._toServer.append(data)
        self._toServerSize += len(data)
        if (
            self._toServerSize >= self._context.limits.readSize
            and self._accepted is not None
        ):
            self._accepted.pauseReading(PAUSED_EARLY)
        if self.startedBy is None and self.mode is ConnectMode.FIRST_DATA:
            self._startOutgoing(Moment.FIRST_DATA)

    def writeToClient(self, data: bytes) -> None:
        """
        See L{IFlow.writeToClient}.
        """
        if not data or (self.outcome is not None and not self._answering):
            return
        accepted = self._accepted
        if accepted is not None:
            if self._splice is not None:
                self._splice.beforeWrite(False)
            accepted.write(data)
            return
        # Not accepted yet (the outgoing leg connected at the SYN): hold the
        # bytes, within the same bound as those held for the server.
        if self._toClient is None:
            self._toClient = []
        self._toClient.append(data)
        self._toClientSize += len(data)
        if (
            self._toClientSize >= self._context.limits.readSize
            and self._outgoing is not None
        ):
            self._outgoing.pauseReading(PAUSED_EARLY)

    def noteSpliced(self, fromClient: bool, size: int) -> None:
        """
        The splice path read C{size} bytes from a leg (see
        L{miniproxy.splice}): count them as L{dataFromClientLeg} and
        L{dataFromServerLeg} count what they are given.

        @param fromClient: Whether they came from the client.
        """
        now = self._context.reactor.seconds()
        if fromClient:
            if not self.bytesFromClient:
                self.times.firstByteFromClient = now
            self.bytesFromClient += size
        else:
            if not self.bytesFromServer:
                self.times.firstByteFromServer = now
            self.bytesFromServer += size
        self._lastActivity = now

    def wantsDataChanged(self) -> None:
        """
        See L{IFlow.wantsDataChanged}.
        """
        chain = self._chain
        chain.wantsData = any(
            getattr(handler, "wantsData", True) for _, handler in chain.handlers
        )
        if chain.wantsData:
            if self._splice is not None:
                self._splice.suspend()
        else:
            self._maybeSplice()

    def _maybeSplice(self) -> None:
        """
        Switch to the splice path (L{miniproxy.splice}) each direction that
        can: it has carried C{splice-after} bytes, splicing is on, no
        handler wants data, both legs are connected plain TCP sockets, and
        no byte is held for either.
        """
        limits = self._context.limits
        after = limits.spliceAfter
        if (
            (self.bytesFromClient < after and self.bytesFromServer < after)
            or self.outcome is not None
            or self._chain.wantsData
            or not limits.splice
            or self._carrier is not None
            or self._awaitingCarrier
            or self._toServer
            or self._toClient
        ):
            return
        accepted, outgoing = self._accepted, self._outgoing
        if accepted is None or outgoing is None:
            return
        relay = self._splice
        if relay is None:
            from miniproxy.splice import SpliceRelay

            if not SpliceRelay.possible(accepted, outgoing):
                return
            relay = self._splice = SpliceRelay(
                self, accepted, outgoing, limits.maxBuffer, after
            )
        relay.start()

    # -- half-close -----------------------------------------------------

    def clientLegEnded(self) -> None:
        """
        The client sent a FIN.
        """
        self.times.clientHalfClosed = self._context.reactor.seconds()
        if self.outcome is not None:
            return
        if self._carrier is not None:
            self.refuse(f"client closed before its {self._carrier.what} was complete")
            return
        if not self._runHook("clientHalfClosed"):
            return
        self.halfCloseToServer()

    def serverLegEnded(self) -> None:
        """
        The server sent a FIN.
        """
        self.times.serverHalfClosed = self._context.reactor.seconds()
        if self.outcome is not None:
            return
        if not self._runHook("serverHalfClosed"):
            return
        self.halfCloseToClient()

    def halfCloseToServer(self) -> None:
        """
        See L{IFlow.halfCloseToServer}.
        """
        if self._finToServer:
            return
        self._finToServer = True
        if self._outgoing is not None:
            if self._toServer is None:
                self._shutdownWrite(self._outgoing)
            # Otherwise bytes are still held for the leg (an
            # outgoingConnected hook half-closes before they are written):
            # outgoingLegMade sends the FIN after them.
        elif (
            self.startedBy is None
            and self.outcome is None
            and self.mode is ConnectMode.FIRST_DATA
        ):
            # In first-data mode a client that sends nothing but a FIN still
            # reaches the server: it may speak first.  (In the other modes
            # the FIN waits for the outgoing leg their moment starts.)
            self._startOutgoing(Moment.FIRST_DATA)

    def halfCloseToClient(self) -> None:
        """
        See L{IFlow.halfCloseToClient}.
        """
        if self._finToClient:
            return
        self._finToClient = True
        if self._accepted is not None:
            self._shutdownWrite(self._accepted)

    def _shutdownWrite(self, leg: Leg) -> None:
        leg.shutdownWrite()

    # -- ending ---------------------------------------------------------

    def allow(self) -> None:
        """
        See L{IFlow.allow}.
        """
        self.allowed = True

    def refuse(self, reason: str) -> None:
        """
        See L{IFlow.refuse}.
        """
        if self.outcome is not None:
            return
        self._setOutcome(Outcome.REFUSED, reason)
        self._cancelConnecting()
        if self._outgoing is not None:
            self._outgoing.abort()
        self._closeAccepted()
        self._maybeFinish()

    def close(self) -> None:
        """
        See L{IFlow.close}.
        """
        if self._accepted is None:
            # Closed at the SYN, before the accept: nothing is to come from
            # the client, so the flow ends now (cleanly) and its accepted
            # leg is closed when it comes, instead of the flow going on.
            self._setOutcome(Outcome.OK, None)
        self._cancelConnecting()
        for leg in (self._accepted, self._outgoing):
            if leg is not None:
                # Both directions end here: what arrives after this is not
                # a half-close to pass on (see legLost).
                leg.readClosed = True
                leg.loseConnection()
        self._maybeFinish()

    def abort(self, reason: str) -> None:
        """
        See L{IFlow.abort}.
        """
        self._setOutcome(Outcome.ABORTED, reason)
        self._resetAll()

    def _resetAll(self) -> None:
        self._cancelConnecting()
        for leg in (self._accepted, self._outgoing):
            if leg is not None:
                leg.abort()
        self._maybeFinish()

    def _cancelConnecting(self) -> None:
        d, self._connecting = self._connecting, None
        if d is not None:
            d.cancel()

    def _closeAccepted(self) -> None:
        if self._accepted is not None:
            self._accepted.loseConnection()

    def _setOutcome(self, outcome: Outcome, reason: str | None) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.reason = reason

    def _hookFailed(self, e: HookFailed) -> None:
        _log.failure("{message}", Failure(e), message=str(e))
        self.abort(str(e))

    def _runHook(self, hook: str) -> bool:
        """
        Run a hook whose C{STOP} takes the event over (a half-close).

        @return: Whether the proxy goes on with its default action: L{False}
            if a handler said C{STOP}, failed, or ended the flow.
        """
        chain = self._chain
        if not chain.handlers:
            # No function: nothing can stop the event.
            return self.outcome is None
        try:
            verdict = chain.run(hook, self)
        except HookFailed as e:
            self._hookFailed(e)
            return False
        return verdict is CONTINUE and self.outcome is None

    def _runLifecycleHook(self, hook: str) -> bool:
        """
        Run a lifecycle hook (early SYN, accepted, outgoing connected).
        C{STOP} only ends the chain for this event: the proxy's own next
        step (starting the outgoing leg, writing held bytes) has no handler
        to take it over, so it still happens unless the flow ended.

        @return: Whether the flow goes on: L{False} if a handler failed or
            ended the flow.
        """
        chain = self._chain
        if chain.handlers:
            try:
                chain.run(hook, self)
            except HookFailed as e:
                self._hookFailed(e)
                return False
        return self.outcome is None

    def _idleTimedOut(self, idle: float) -> None:
        """
        No byte passed for C{idle} seconds (see L{IdleTimers}).
        """
        if self._finished:
            return
        self._setOutcome(Outcome.IDLE_TIMEOUT, f"no traffic for {idle:g}s")
        self._resetAll()

    def legLost(self, leg: Leg, reason: Failure) -> None:
        """
        A leg's connection is closed.
        """
        if leg is not self._accepted and leg is not self._outgoing:
            return
        if self.outcome is not None:
            # The flow already decided how its legs end (a refusal closes
            # the client leg while it resets the outgoing one): a leg lost
            # now is that decision, not a new reset to pass on.
            self._maybeFinish()
            return
        if not isinstance(reason.value, error.ConnectionDone):
            # A reset or an error on one leg resets the other.
            side = "client" if leg is self._accepted else "server"
            self._setOutcome(Outcome.RESET, f"{side}: {describeFailure(reason)}")
            self._resetAll()
            return
        if not leg.readClosed and self.outcome is None:
            # Closed without a half-close first (TLS has none): the peer's
            # direction ended, so end it on the other leg too.
            leg.readClosed = True
            if leg is self._accepted:
                self.clientLegEnded()
            else:
                self.serverLegEnded()
        self._maybeFinish()

    def _maybeFinish(self) -> None:
        if self._finished:
            return
        for leg in (self._accepted, self._outgoing):
            if leg is not None and not leg.disconnected:
                return
        if self._connecting is not None:
            return
        if self._accepted is None and self.outcome is None:
            # Not accepted yet (SYN seen): the flow lives on.
            return
        self._finished = True
        if self._splice is not None:
            self._splice.close()
        carrier, self._carrier = self._carrier, None
        if carrier is not None:
            carrier.stop()
        self._setOutcome(Outcome.OK, None)
        self.times.closed = self._context.reactor.seconds()
        entry, self._idleCall = self._idleCall, None
        if entry is not None:
            self._context.table.idleTimers.forget(entry)
        self._toServer = None
        self._toClient = None
        self._context.table.remove(self)
        if self._chain.handlers:
            self._chain.runClosed(self)
        self._context.flowClosed(self)
        # Let go of the legs: each leg refers to its flow, and a flow with
        # no cycle left is freed when its last reference goes, not by the
        # garbage collector (which would otherwise find every closed
        # flow's objects, and go through the open ones, far more often).
        self._accepted = self._outgoing = None
