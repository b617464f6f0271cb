# -*- test-case-name: tests.test_legs -*-
"""
The two legs of a flow, as Twisted protocols, and their factories.

The accepted leg faces the client (or the previous proxy); the outgoing leg
faces the server (or the next proxy).  Each leg is the push producer that
its peer's transport pauses when it has too much to write, and each is
half-closeable: a FIN read on one leg becomes a FIN written on the other.

The legs and the outgoing leg's factory have C{__slots__}, and so do not
inherit Twisted's L{Protocol} and L{Factory} (which have none, so a
subclass would still have a C{__dict__} per instance): there are two legs
per flow, and a flow held open costs what its objects hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import tcp as _tcp
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from miniproxy.address import HostPort
from miniproxy.flow import PAUSED_BY_PEER, Flow, Moment, buffered, resetTransport
from miniproxy.tcpclient import HANDSHAKE_POLL, handshakePending, usesFastOpen

if TYPE_CHECKING:
    from miniproxy.listener import ListenerContext

_log = Logger(namespace="miniproxy.legs")

#: The attributes Twisted sets on a TCP transport once it has written
#: (class attributes until then).  Those it sets when it pauses a producer
#: or closes are left out: each name makes every instance's values larger,
#: and those only cost a busy or closing transport its dict.
_LATER_ATTRIBUTES = ("dataBuffer", "offset")

#: The attributes a TCP transport of a flow gets, in the order it gets
#: them: Twisted's own, then the legs' (C{bufferSize}, the producer), then
#: the splice path's (C{doRead}, C{doWrite}), then Twisted's later ones.
_SERVER_ATTRIBUTES = (
    "reactor", "_tempDataBuffer", "_tempDataLen", "socket", "fileno", "protocol",
    "server", "client", "sessionno", "hostname", "logstr", "repstr", "connected",
    "bufferSize", "producer", "streamingProducer", "doRead", "doWrite",
) + _LATER_ATTRIBUTES
_CLIENT_ATTRIBUTES = (
    "connector", "addr", "_requiresResolution", "reactor", "_tempDataBuffer",
    "_tempDataLen", "socket", "fileno", "doWrite", "doRead", "protocol",
    "realAddress", "connected", "logstr", "bufferSize", "producer",
    "streamingProducer",
) + _LATER_ATTRIBUTES


def primeSharedKeys(cls: type, names: tuple[str, ...]) -> None:
    """
    Teach CPython the instance attributes of C{cls} before its instances
    need them.

    CPython (3.11 and later) keeps the attribute names of a class's
    instances in keys the instances share, and their values in a small
    array each.  An instance given a name the shared keys did not have
    when it was made may have to make a whole dict of its own instead:
    Twisted's transports get C{producer} and C{streamingProducer} (when a
    leg registers as its peer's producer) and C{bufferSize} well after they
    are made, which costs each transport some 500 bytes, or not, depending
    on which connection happened to set them first.  A throwaway instance
    given every name once puts them all in the shared keys.  Elsewhere it
    costs nothing.
    """
    try:
        instance = cls.__new__(cls)
        for name in names:
            object.__setattr__(instance, name, None)
    except Exception:
        pass


def primeTransports() -> None:
    """
    L{primeSharedKeys} for the transports of the legs: Twisted's TCP
    server connections and miniproxy's outgoing ones.
    """
    from twisted.internet import tcp

    from miniproxy.tcpclient import _TunedClient, _TunedClient6

    primeSharedKeys(tcp.Server, _SERVER_ATTRIBUTES)
    primeSharedKeys(tcp.Client, _CLIENT_ATTRIBUTES)
    primeSharedKeys(_TunedClient, _CLIENT_ATTRIBUTES)
    primeSharedKeys(_TunedClient6, _CLIENT_ATTRIBUTES)


primeTransports()


def halfCloseNow(transport: Any) -> bool:
    """
    Half-close a Twisted TCP transport at once, if it holds nothing to
    write: what its C{loseWriteConnection} would do on the reactor's next
    C{doWrite}, done now.

    Twisted's C{loseWriteConnection} only registers for writability, and
    its C{doWrite} sends the FIN on the next event once the buffer is
    empty: one more trip through the reactor (and two C{epoll_ctl} calls)
    for every FIN, which a short flow makes two of.  When the transport
    holds no bytes, no producer and no replaced C{doWrite} (a splice
    direction whose pipe holds bytes, an abort, a connect in progress),
    that C{doWrite} would do nothing but what this does, in the same
    order: mark the write side closed, then C{_closeWriteConnection}
    (C{shutdown(SHUT_WR)}, an error of which Twisted ignores, then the
    protocol's C{writeConnectionLost}, once).  A protocol whose other side
    is closed too then closes in its C{writeConnectionLost}, which
    Twisted's C{loseConnection} does at once for a write-closed transport.

    @param transport: A L{twisted.internet.tcp.Connection}.
    @return: Whether it was half-closed; if not, the caller leaves the
        FIN to C{loseWriteConnection}.
    """
    if (
        not transport.connected
        or transport.disconnecting
        or transport._writeDisconnecting
        or transport.producer is not None
        or buffered(transport)
        # Asked without vars(), which would give the transport a __dict__.
        or getattr(transport.doWrite, "__func__", None) is not type(transport).doWrite
    ):
        return False
    transport._writeDisconnecting = True
    transport._writeDisconnected = True
    transport._closeWriteConnection()
    return True


@implementer(IProtocol, ILoggingContext, IHalfCloseableProtocol, IPushProducer)
class Leg:
    """
    What both legs share: the flow they belong to, pausing, and closing
    once both directions have ended.

    @ivar flow: The flow.
    @ivar transport: The leg's transport, once connected.
    @ivar connected: Whether C{makeConnection} was called (as
        L{twisted.internet.protocol.BaseProtocol}'s).
    @ivar factory: The factory that made the accepted leg (its listener's);
        L{None} for an outgoing leg.
    @ivar readClosed: The peer sent a FIN (or the leg is closed).
    @ivar writeClosed: This leg's write side is shut down.
    @ivar disconnected: The connection is closed.
    """

    __slots__ = (
        "flow",
        "transport",
        "_sendsAtOnce",
        "connected",
        "factory",
        "_paused",
        "_peer",
        "readClosed",
        "writeClosed",
        "disconnected",
        "aborting",
    )

    flow: Flow

    def __init__(self) -> None:
        self.transport: Any = None
        self._sendsAtOnce = False
        self.connected = 0
        self.factory: Any = None
        self._paused = 0
        self._peer: Leg | None = None
        self.readClosed = False
        self.writeClosed = False
        self.disconnected = False
        self.aborting = False

    # IProtocol
    def makeConnection(self, transport: Any) -> None:
        """
        The transport is connected: remember it, then L{connectionMade}.
        """
        self.connected = 1
        self.transport = transport
        self._sendsAtOnce = isinstance(transport, _tcp.Connection)
        self.connectionMade()

    def write(self, data: bytes) -> None:
        """
        Write C{data} to the peer: at once, with C{send}, when the transport
        is a plain TCP connection with nothing queued, and through the
        transport for what the kernel does not take (or for any other
        transport).

        Twisted's transports only queue what they are given, and write it
        when the reactor next finds the socket writable: one more trip
        through the reactor for every relayed chunk, which is latency added
        at every proxy of a chain (and two more C{epoll_ctl} calls).  The
        bytes keep their order: they go at once only when the transport
        holds none.  An error is left for the transport to find, as it
        would have, when it writes the rest.
        """
        transport = self.transport
        if (
            self._sendsAtOnce
            and not buffered(transport)
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._writeDisconnecting
        ):
            try:
                sent = transport.socket.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            if sent:
                data = data[sent:]
        transport.write(data)

    def connectionMade(self) -> None:
        """
        See L{IProtocol.connectionMade}.
        """

    def dataReceived(self, data: bytes) -> None:
        """
        See L{IProtocol.dataReceived}.
        """

    def logPrefix(self) -> str:
        """
        See L{ILoggingContext.logPrefix}.
        """
        return self.__class__.__name__

    def registerPeer(self, peer: Leg) -> None:
        """
        Make C{peer} the streaming producer of this leg's transport, so that
        the transport pauses reading from C{peer} while it has too much to
        write.
        """
        if self._peer is None and not self.disconnected:
            self.transport.registerProducer(peer, True)  # type: ignore[union-attr]
            self._peer = peer

    def _unregisterPeer(self) -> None:
        # Once this leg's write side is ending, its peer produces nothing
        # more for it.  Twisted's FileDescriptor does not send a FIN (nor
        # close) when its buffer drains while a *paused* streaming producer
        # is registered: it resumes the producer instead and waits for more
        # writes, which never come once the peer has read a FIN.  Unregister
        # first, and let the peer read again if the transport paused it.
        peer, self._peer = self._peer, None
        if peer is None:
            return
        transport: Any = self.transport
        if not self.disconnected:
            transport.unregisterProducer()
        if peer._paused & PAUSED_BY_PEER:
            peer.resumeProducing()

    def setBufferBound(self, readSize: int) -> None:
        """
        Bound what this leg reads at once and what its transport buffers
        before pausing its producer (see L{miniproxy.limits.Limits}).
        """
        transport: Any = self.transport
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = readSize

    # IPushProducer: the peer's transport pauses reading from this leg.
    def pauseProducing(self) -> None:
        """
        The other leg cannot take more bytes now: stop reading this one.
        """
        self.pauseReading(PAUSED_BY_PEER)

    def resumeProducing(self) -> None:
        """
        The other leg drained its buffer: read this one again.
        """
        self.resumeReading(PAUSED_BY_PEER)

    def stopProducing(self) -> None:
        """
        Ignored: the flow, not the peer's transport, decides when a leg
        closes.
        """

    def pauseReading(self, why: int) -> None:
        """
        Stop reading, for reason C{why} (a bit).  Reading resumes once every
        reason is gone.
        """
        if not self._paused and not self.disconnected:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._paused |= why

    def resumeReading(self, why: int) -> None:
        """
        Remove reason C{why} for not reading.
        """
        if not self._paused & why:
            return
        self._paused &= ~why
        # Never read again once the peer's FIN was read: Twisted would read
        # the end of file again and call readConnectionLost once more.
        if not (self._paused or self.disconnected or self.aborting or self.readClosed):
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def shutdownWrite(self) -> None:
        """
        Send a FIN once what is buffered is written: at once (see
        L{halfCloseNow}) when the TCP transport holds nothing.  On a
        transport with no half-close (TLS), the close waits until the other
        direction ends too.
        """
        if self.writeClosed or self.disconnected:
            return
        self._unregisterPeer()
        transport = self.transport
        if self._sendsAtOnce and halfCloseNow(transport):
            return
        if ITCPTransport.providedBy(transport) and not ISSLTransport.providedBy(
            transport
        ):
            transport.loseWriteConnection()  # type: ignore[union-attr]
        else:
            self.writeClosed = True
            self._closeIfDone()

    def loseConnection(self) -> None:
        """
        Close the connection cleanly once what is buffered is written.
        """
        if self.disconnected:
            return
        self._unregisterPeer()
        transport = self.transport
        if (
            self._sendsAtOnce
            and transport._writeDisconnected
            and transport.connected
            and not transport.disconnecting
        ):
            # What Twisted's loseConnection does with a write-closed TCP
            # transport (it closes at once, as doWrite would not), with
            # Twisted's shared clean-close failure instead of a new one
            # (whose class names a check would look up again) and without
            # the calls that connectionLost makes again (stopReading,
            # stopWriting).
            transport.connectionLost(connectionDone)
            return
        transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        """
        Reset the connection (RST), discarding what is buffered.
        """
        if self.disconnected or self.aborting:
            return
        self.aborting = True
        resetTransport(self.transport)

    # IHalfCloseableProtocol
    def readConnectionLost(self) -> None:
        """
        The peer sent a FIN.
        """
        if self.readClosed:
            return
        self.readClosed = True
        self._ended()
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        """
        This leg's write side is shut down.
        """
        self.writeClosed = True
        self._closeIfDone()

    def _closeIfDone(self) -> None:
        if self.readClosed and self.writeClosed and not self.disconnected:
            self.loseConnection()

    def _ended(self) -> None:
        raise NotImplementedError()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        The connection is closed; tell the flow.
        """
        self.disconnected = True
        self._peer = None
        self.flow.legLost(self, reason)


class AcceptedLeg(Leg):
    """
    The leg facing the client or the previous proxy.
    """

    __slots__ = ()

    factory: AcceptedLegFactory

    def connectionMade(self) -> None:
        """
        The kernel handed over the connection: find or make the flow.
        """
        context = self.factory.context
        transport: Any = self.transport
        client = HostPort.fromAddress(transport.getPeer())
        local = HostPort.fromAddress(transport.getHost())
        early = context.early
        flow = early.claim(client, local) if early is not None else None
        if flow is None:
            flow = Flow(context, client, local)
            self.flow = flow
            refusal = context.prepareFlow(flow, transport)
            if refusal is not None:
                # Refused before it began (an untrusted peer on a listener
                # that reads PROXY headers): the leg is closed at once.
                flow.refuse(refusal)
            else:
                flow.begin(Moment.ACCEPT)
        else:
            # Begun at its SYN: its outgoing leg may be connected already.
            self.flow = flow
        flow.acceptedLegMade(self)

    def dataReceived(self, data: bytes) -> None:
        """
        Bytes from the client.
        """
        self.flow.dataFromClientLeg(data)

    def _ended(self) -> None:
        self.flow.clientLegEnded()


class OutgoingLeg(Leg):
    """
    The leg facing the server or the next proxy.

    @ivar fastOpen: Whether it connected with TCP Fast Open.
    @ivar preamble: The bytes written before any other: the header that
        tells the next proxy the flow's destination (see
        L{miniproxy.carriers}), or none.
    """

    __slots__ = ("fastOpen", "preamble")

    def __init__(self) -> None:
        super().__init__()
        self.fastOpen = False
        self.preamble = b""

    def connectionMade(self) -> None:
        """
        Connected (with TCP Fast Open: about to send its SYN): write the
        preamble, then join the flow.
        """
        self.fastOpen = usesFastOpen(self.transport)
        if self.fastOpen:
            # Its SYN leaves with its first write, which Twisted's
            # transport knows how to make.
            self._sendsAtOnce = False
        if self.preamble:
            self.transport.write(self.preamble)  # type: ignore[union-attr]
        self.flow.outgoingLegMade(self)

    def _whenHandshakeDone(self, action: Any) -> bool:
        # A Fast Open leg is "connected" before its handshake: closing it
        # in SYN_SENT would drop it, so the close waits for the handshake.
        if not self.fastOpen or self.disconnected or not handshakePending(self.transport):
            return False
        self.flow.reactor.callLater(HANDSHAKE_POLL, action)
        return True

    def shutdownWrite(self) -> None:
        """
        See L{Leg.shutdownWrite}; a Fast Open leg waits for its handshake.
        """
        if not self._whenHandshakeDone(self.shutdownWrite):
            super().shutdownWrite()

    def loseConnection(self) -> None:
        """
        See L{Leg.loseConnection}; a Fast Open leg waits for its handshake.
        """
        if not self._whenHandshakeDone(self.loseConnection):
            super().loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """
        Bytes from the server.
        """
        self.flow.dataFromServerLeg(data)

    def _ended(self) -> None:
        self.flow.serverLegEnded()


class AcceptedLegFactory(Factory):
    """
    Makes the accepted legs of one listener, refusing flows over the
    limits.

    @ivar context: What the listener's flows share.
    """

    protocol = AcceptedLeg
    noisy = False

    def __init__(self, context: ListenerContext) -> None:
        self.context = context

    def buildProtocol(self, addr: Any) -> AcceptedLeg | None:
        """
        Admit a new connection, or refuse it (it is closed at once) when a
        limit is reached.
        """
        host = getattr(addr, "host", "?")
        early = self.context.early
        if early is not None and early.isPending(
            HostPort(host, getattr(addr, "port", 0))
        ):
            # Admitted at its SYN already.
            refusal = None
        else:
            refusal = self.context.table.admit(host)
        if refusal is not None:
            self.context.refusedAtAccept(host, refusal)
            return None
        leg = AcceptedLeg()
        leg.factory = self
        return leg


@implementer(IProtocolFactory)
class OutgoingLegFactory:
    """
    Makes the outgoing leg of one flow.
    """

    __slots__ = ("flow", "preamble")

    noisy = False

    def __init__(self, flow: Flow, preamble: bytes = b"") -> None:
        """
        @param flow: The flow.
        @param preamble: The bytes the leg writes first, before any of the
            flow's (a PROXY v2 header for the next proxy), or none.
        """
        self.flow = flow
        self.preamble = preamble

    def buildProtocol(self, addr: Any) -> OutgoingLeg:
        """
        Make the leg, bound to the flow.  The leg does not keep its
        factory (its C{factory} stays L{None}): nothing needs it once the
        leg is made, and the factory is freed once the leg connects.
        """
        leg = OutgoingLeg()
        leg.flow = self.flow
        leg.preamble = self.preamble
        return leg

    def doStart(self) -> None:
        """
        See L{IProtocolFactory.doStart}.
        """

    def doStop(self) -> None:
        """
        See L{IProtocolFactory.doStop}.
        """
