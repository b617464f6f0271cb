"""
Tests for L{miniproxy.legs}: the two legs of a flow as protocols, pausing,
half-closing and closing, and their factories.
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import alsoProvides, implementer
from zope.interface.verify import verifyObject

from miniproxy.address import HostPort, NextHop
from miniproxy.flow import PAUSED_BY_PEER, PAUSED_EARLY, ConnectMode, Flow, Outcome
from miniproxy.flowtable import FlowTable
from miniproxy.legs import AcceptedLeg, AcceptedLegFactory, Leg, OutgoingLeg, OutgoingLegFactory
from miniproxy.limits import Limits
from miniproxy.listener import ListenerContext, ListenerSettings
from miniproxy.testing import FlowHarness, RecordingFunction
from miniproxy.verdict import STOP, Verdict


class RecordingFlow:
    """
    Stands for a flow: records what its leg tells it.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def clientLegEnded(self) -> None:
        self.events.append(("clientLegEnded", None))

    def serverLegEnded(self) -> None:
        self.events.append(("serverLegEnded", None))

    def legLost(self, leg: Leg, reason: Failure) -> None:
        self.events.append(("legLost", reason.type))


class TCPStringTransport(StringTransport):
    """
    A L{StringTransport} with C{loseWriteConnection}, counting calls.
    """

    def __init__(self) -> None:
        super().__init__(lenient=True)
        self.calls: list[str] = []

    def loseWriteConnection(self) -> None:
        self.calls.append("loseWriteConnection")

    def pauseProducing(self) -> None:
        self.calls.append("pauseProducing")
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self.calls.append("resumeProducing")
        super().resumeProducing()

    def abortConnection(self) -> None:
        self.calls.append("abortConnection")
        super().abortConnection()


def legOn(transport: Any, cls: type[Leg] = OutgoingLeg) -> tuple[Leg, RecordingFlow]:
    """
    A leg of class C{cls} bound to a L{RecordingFlow}, on C{transport},
    without running C{connectionMade}.
    """
    from twisted.internet.interfaces import ITCPTransport

    if not ITCPTransport.providedBy(transport) and hasattr(transport, "loseWriteConnection"):
        alsoProvides(transport, ITCPTransport)
    leg = cls()
    flow = RecordingFlow()
    leg.flow = flow  # type: ignore[assignment]
    leg.transport = transport
    return leg, flow


class LegTests(unittest.TestCase):
    """
    Tests for L{Leg}.
    """

    def test_interfaces(self) -> None:
        """
        A leg is a half-closeable protocol and a push producer.
        """
        leg, _ = legOn(TCPStringTransport())
        self.assertTrue(verifyObject(IHalfCloseableProtocol, leg))
        self.assertTrue(verifyObject(IPushProducer, leg))

    def test_pauseReasons(self) -> None:
        """
        Reading pauses at the first reason and resumes when the last reason
        is gone; removing an absent reason does nothing.
        """
        transport = TCPStringTransport()
        leg, _ = legOn(transport)
        leg.pauseReading(PAUSED_EARLY)
        leg.pauseProducing()
        self.assertEqual(transport.calls, ["pauseProducing"])
        leg.resumeReading(PAUSED_EARLY)
        self.assertEqual(transport.producerState, "paused")
        leg.resumeReading(PAUSED_EARLY)
        leg.resumeProducing()
        self.assertEqual(transport.calls, ["pauseProducing", "resumeProducing"])
        self.assertEqual(transport.producerState, "producing")

    def test_noReadAfterFin(self) -> None:
        """
        Once the peer's FIN was read, resuming does not read again: Twisted
        would read the end of file again.
        """
        transport = TCPStringTransport()
        leg, flow = legOn(transport)
        leg.pauseProducing()
        leg.readConnectionLost()
        leg.resumeProducing()
        self.assertEqual(transport.calls, ["pauseProducing"])
        self.assertEqual(flow.events, [("serverLegEnded", None)])

    def test_finOnce(self) -> None:
        """
        A second C{readConnectionLost} is ignored.
        """
        leg, flow = legOn(TCPStringTransport(), AcceptedLeg)
        leg.readConnectionLost()
        leg.readConnectionLost()
        self.assertEqual(flow.events, [("clientLegEnded", None)])
        self.assertTrue(leg.readClosed)

    def test_shutdownWriteTCP(self) -> None:
        """
        On TCP the write side is shut down with C{loseWriteConnection};
        the leg closes once the peer's FIN came too.
        """
        transport = TCPStringTransport()
        leg, _ = legOn(transport)
        leg.shutdownWrite()
        self.assertEqual(transport.calls, ["loseWriteConnection"])
        self.assertFalse(leg.writeClosed)
        leg.writeConnectionLost()
        self.assertTrue(leg.writeClosed)
        self.assertFalse(transport.disconnecting)
        leg.readConnectionLost()
        self.assertTrue(transport.disconnecting)
        leg.shutdownWrite()
        self.assertEqual(transport.calls, ["loseWriteConnection"])

    def test_shutdownWriteTLS(self) -> None:
        """
        A TLS transport has no half-close: the write side counts as closed
        at once and the connection closes when the other direction ends.
        """
        transport = TCPStringTransport()
        alsoProvides(transport, ISSLTransport)
        leg, _ = legOn(transport)
        leg.shutdownWrite()
        self.assertNotIn("loseWriteConnection", transport.calls)
        self.assertTrue(leg.writeClosed)
        self.assertFalse(transport.disconnecting)
        leg.readConnectionLost()
        self.assertTrue(transport.disconnecting)

    def test_shutdownWriteUnregistersPeer(self) -> None:
        """
        Shutting the write side down unregisters the peer producer (a
        paused streaming producer keeps Twisted from ever sending the FIN)
        and lets the peer read again.
        """
        transport = TCPStringTransport()
        peerTransport = TCPStringTransport()
        leg, _ = legOn(transport)
        peer, _ = legOn(peerTransport, AcceptedLeg)
        leg.registerPeer(peer)
        self.assertIs(transport.producer, peer)
        self.assertTrue(transport.streaming)
        peer.pauseProducing()
        leg.shutdownWrite()
        self.assertIsNone(transport.producer)
        self.assertEqual(peerTransport.producerState, "producing")

    def test_loseConnectionUnregistersPeer(self) -> None:
        """
        Closing unregisters the peer producer too, then closes once.
        """
        transport = TCPStringTransport()
        leg, _ = legOn(transport)
        peer, _ = legOn(TCPStringTransport(), AcceptedLeg)
        leg.registerPeer(peer)
        leg.registerPeer(peer)
        leg.loseConnection()
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)

    def test_abortOnce(self) -> None:
        """
        L{Leg.abort} aborts the transport once, with C{SO_LINGER} 0 so that
        the kernel sends a RST.
        """
        options = []

        class Handle:
            def setsockopt(self, *args: Any) -> None:
                options.append(args)

        transport = TCPStringTransport()
        transport.getHandle = Handle  # type: ignore[attr-defined]
        leg, _ = legOn(transport)
        leg.abort()
        leg.abort()
        self.assertEqual(transport.calls, ["abortConnection"])
        self.assertEqual(
            options, [(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))]
        )
        leg.resumeReading(PAUSED_BY_PEER)
        self.assertEqual(transport.calls, ["abortConnection"])

    def test_abortClosedSocket(self) -> None:
        """
        A socket that cannot take the option is aborted all the same.
        """

        class Handle:
            def setsockopt(self, *args: Any) -> None:
                raise OSError(9, "Bad file descriptor")

        transport = TCPStringTransport()
        transport.getHandle = Handle  # type: ignore[attr-defined]
        leg, _ = legOn(transport)
        leg.abort()
        self.assertEqual(transport.calls, ["abortConnection"])

    def test_bufferBound(self) -> None:
        """
        L{Leg.setBufferBound} sets the transport's C{bufferSize} (what it
        reads at once and buffers before pausing its producer), when it has
        one.
        """
        transport = TCPStringTransport()
        transport.bufferSize = 65536  # type: ignore[attr-defined]
        leg, _ = legOn(transport)
        leg.setBufferBound(2048)
        self.assertEqual(transport.bufferSize, 2048)  # type: ignore[attr-defined]
        bare, _ = legOn(StringTransport())
        bare.setBufferBound(2048)
        self.assertFalse(hasattr(bare.transport, "bufferSize"))

    def test_connectionLost(self) -> None:
        """
        A lost connection is reported to the flow, with L{ConnectionDone}
        when no reason is given; a disconnected leg no longer pauses its
        transport.
        """
        transport = TCPStringTransport()
        leg, flow = legOn(transport)
        leg.connectionLost()
        self.assertTrue(leg.disconnected)
        self.assertEqual(flow.events, [("legLost", error.ConnectionDone)])
        leg.pauseReading(PAUSED_EARLY)
        leg.shutdownWrite()
        leg.loseConnection()
        self.assertEqual(transport.calls, [])

    def test_stopProducing(self) -> None:
        """
        The peer transport's C{stopProducing} does not close the leg: the
        flow decides that.
        """
        transport = TCPStringTransport()
        leg, flow = legOn(transport)
        leg.stopProducing()
        self.assertFalse(transport.disconnecting)
        self.assertEqual(flow.events, [])


class FactoryTests(unittest.TestCase):
    """
    Tests for L{AcceptedLegFactory} and L{OutgoingLegFactory}.
    """

    def test_acceptedLegMakesFlow(self) -> None:
        """
        An accepted leg makes its flow from the transport's addresses.
        """
        harness = FlowHarness(limits=Limits(idleTimeout=0))
        driver = harness.accept(
            client=HostPort("2001:db8::1", 5555), local=HostPort("2001:db8::2", 80)
        )
        assert driver.flow is not None
        self.assertIsInstance(driver.acceptedLeg, AcceptedLeg)
        self.assertEqual(driver.flow.client, HostPort("2001:db8::1", 5555))
        self.assertEqual(driver.flow.local, HostPort("2001:db8::2", 80))
        self.assertIs(driver.acceptedLeg.factory, harness.factory)  # type: ignore[union-attr]

    def test_admission(self) -> None:
        """
        L{AcceptedLegFactory.buildProtocol} returns L{None} over a limit,
        and logs the refusal.
        """
        from twisted.internet.address import IPv4Address

        table = FlowTable(maxFlows=0, maxFlowsPerSource=10)
        context = ListenerContext(
            None,
            ListenerSettings("tcp:0", ConnectMode.EARLY, NextHop(HostPort("192.0.2.9", 1))),
            Limits(),
            (),
            table,
            dialer=object(),  # type: ignore[arg-type]
        )
        with capturedLogs() as events:
            leg = AcceptedLegFactory(context).buildProtocol(
                IPv4Address("TCP", "192.0.2.1", 1)
            )
        self.assertIsNone(leg)
        self.assertEqual(table.refused, 1)
        [event] = [e for e in events if e.get("outcome") == "refused"]
        self.assertEqual(event["client"], "192.0.2.1")
        self.assertEqual(event["listener"], "tcp:0")

    def test_outgoingLegBound(self) -> None:
        """
        L{OutgoingLegFactory} makes legs bound to its flow, with its
        preamble; the leg does not keep the factory (a flow held open
        does not hold it).
        """
        import gc

        flow = object()
        factory = OutgoingLegFactory(flow, preamble=b"PROXY")  # type: ignore[arg-type]
        leg = factory.buildProtocol(None)
        self.assertIsInstance(leg, OutgoingLeg)
        self.assertIs(leg.flow, flow)
        self.assertEqual(leg.preamble, b"PROXY")
        self.assertIsNone(leg.factory)
        self.assertFalse(any(o is factory for o in gc.get_referents(leg)))


@implementer(IHalfCloseableProtocol)
class CountingServer(Protocol):
    """
    Counts the bytes it receives until the FIN, then closes.
    """

    def __init__(self, done: defer.Deferred) -> None:
        self.received = 0
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]
        self.done.callback(self.received)

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class HalfClosingClient(Protocol):
    """
    Sends a FIN at once and waits for the end of the connection.
    """

    def __init__(self, lost: defer.Deferred) -> None:
        self.lost = lost

    def connectionMade(self) -> None:
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


class RealSocketTests(unittest.TestCase):
    """
    The legs on real loopback sockets.
    """

    timeout = 30

    def proxyTo(
        self,
        serverProtocol: Any,
        functions: Any,
        limits: Limits,
        mode: ConnectMode = ConnectMode.EARLY,
    ) -> tuple[int, defer.Deferred]:
        """
        Listen with C{serverProtocol} and with a proxy to it, on loopback;
        everything is torn down after the test, even if it failed.

        @return: The proxy's port and a L{Deferred} firing with the flow once
            it closed.
        """
        from twisted.internet import reactor, task

        servers: list[Protocol] = []

        def makeServer() -> Protocol:
            server = serverProtocol()
            servers.append(server)
            return server

        serverPort = reactor.listenTCP(
            0, Factory.forProtocol(makeServer), interface="127.0.0.1"
        )
        flowClosed: defer.Deferred = defer.Deferred()
        table = FlowTable(10, 10)
        context = ListenerContext(
            reactor,
            ListenerSettings(
                "tcp:0",
                mode,
                NextHop(HostPort("127.0.0.1", serverPort.getHost().port)),
            ),
            limits,
            functions,
            table,
            onFlowClosed=flowClosed.callback,
        )
        proxyPort = reactor.listenTCP(0, AcceptedLegFactory(context), interface="127.0.0.1")

        def cleanUp() -> defer.Deferred:
            # Only a failed test leaves connections behind: reset them and
            # let their connectionLost run.
            for flow in list(table.flows):
                flow.abort("test over")
            for server in servers:
                if server.transport is not None and server.transport.connected:  # type: ignore[attr-defined]
                    server.transport.abortConnection()  # type: ignore[attr-defined]
            return defer.gatherResults(
                [
                    defer.maybeDeferred(serverPort.stopListening),
                    defer.maybeDeferred(proxyPort.stopListening),
                ]
            ).addCallback(lambda _: task.deferLater(reactor, 0, lambda: None))

        self.addCleanup(cleanUp)
        return proxyPort.getHost().port, flowClosed

    def proxyToCounting(
        self, hook: str, answer: Any, limits: Limits, mode: ConnectMode = ConnectMode.EARLY
    ) -> tuple[int, defer.Deferred, defer.Deferred]:
        """
        L{proxyTo} a L{CountingServer}, through a function whose C{hook}
        answers with C{answer}.

        @return: The proxy's port, the flow's L{Deferred} (see L{proxyTo})
            and one firing with the bytes the server received.
        """
        serverDone: defer.Deferred = defer.Deferred()
        port, flowClosed = self.proxyTo(
            lambda: CountingServer(serverDone),
            [(hook, RecordingFunction(verdicts={hook: answer}))],
            limits,
            mode,
        )
        return port, flowClosed, serverDone

    def connectClient(self, client: Protocol) -> None:
        """
        Reset C{client} after the test if it is still connected.
        """

        def cleanUp() -> None:
            if client.transport is not None and client.transport.connected:  # type: ignore[attr-defined]
                client.transport.abortConnection()  # type: ignore[attr-defined]

        self.addCleanup(cleanUp)

    def test_finAfterReleaseWithPausedProducer(self) -> None:
        """
        A function that takes the client's FIN over, releases a large
        buffer to the server and then half-closes: the write fills the
        outgoing transport's buffer, which pauses the (read-closed) client
        leg.  The FIN still reaches the server after every byte, the hook
        runs once, and the flow closes cleanly.

        Before the fix the drained buffer resumed the client leg, which read
        the end of file again: the hook ran again and again and the FIN was
        never sent.
        """
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        size = 4 * 1024 * 1024
        hookCalls = []

        def release(flow: Flow) -> Verdict:
            hookCalls.append(flow)
            flow.writeToServer(b"r" * size)
            flow.halfCloseToServer()
            return STOP

        port, flowClosed, serverDone = self.proxyToCounting(
            "clientHalfClosed", release, Limits(maxBuffer=4096)
        )
        clientLost: defer.Deferred = defer.Deferred()
        client = HalfClosingClient(clientLost)
        self.connectClient(client)
        connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)

        def check(results: list[Any]) -> None:
            received, flow, _ = results
            self.assertEqual(received, size)
            self.assertEqual(len(hookCalls), 1)
            self.assertIs(flow.outcome, Outcome.OK)
            self.assertEqual(flow.bytesFromClient, 0)

        return defer.gatherResults([serverDone, flowClosed, clientLost]).addCallback(check)

    def test_finAfterHeldBytes(self) -> None:
        """
        A function that half-closes to the server from its
        C{outgoingConnected} hook, while the client's first bytes are still
        held for the leg (mode C{first-data}), gets the FIN after them: the
        FIN at once only leaves a transport that holds nothing, and the
        held bytes are not written yet.
        """
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        def finNow(flow: Flow) -> Verdict:
            flow.halfCloseToServer()
            return STOP

        port, flowClosed, serverDone = self.proxyToCounting(
            "outgoingConnected", finNow, Limits(), ConnectMode.FIRST_DATA
        )

        @implementer(IHalfCloseableProtocol)
        class Client(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"held first")  # type: ignore[union-attr]

            def readConnectionLost(self) -> None:
                self.transport.loseConnection()  # type: ignore[union-attr]

            def writeConnectionLost(self) -> None:
                pass

        client = Client()
        self.connectClient(client)
        connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)

        def check(received: int) -> None:
            self.assertEqual(received, len(b"held first"))

        return serverDone.addCallback(check)

    def test_relay(self) -> None:
        """
        Bytes cross a real flow both ways with half-closes, exactly.
        """
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        up = bytes(range(256)) * 4096
        down = bytes(reversed(range(256))) * 2048
        serverGot: defer.Deferred = defer.Deferred()
        clientGot: defer.Deferred = defer.Deferred()

        @implementer(IHalfCloseableProtocol)
        class Peer(Protocol):
            def __init__(self, send: bytes, got: defer.Deferred) -> None:
                self.send = send
                self.got: list[bytes] = []
                self.done = got

            def connectionMade(self) -> None:
                self.transport.write(self.send)  # type: ignore[union-attr]
                self.transport.loseWriteConnection()  # type: ignore[union-attr]

            def dataReceived(self, data: bytes) -> None:
                self.got.append(data)

            def readConnectionLost(self) -> None:
                self.transport.loseConnection()  # type: ignore[union-attr]

            def writeConnectionLost(self) -> None:
                pass

            def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
                self.done.callback(b"".join(self.got))

        port, flowClosed = self.proxyTo(
            lambda: Peer(down, serverGot), (), Limits(maxBuffer=8192)
        )
        client = Peer(up, clientGot)
        self.connectClient(client)
        connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)

        def check(results: list[Any]) -> None:
            atServer, atClient, flow = results
            self.assertEqual(atServer, up)
            self.assertEqual(atClient, down)
            self.assertIs(flow.outcome, Outcome.OK)
            self.assertEqual((flow.bytesFromClient, flow.bytesFromServer), (len(up), len(down)))

        return defer.gatherResults([serverGot, clientGot, flowClosed]).addCallback(check)


class LoopbackLegMixin:
    """
    A leg on a real loopback connection, for the tests of what it does at
    once.
    """

    timeout = 30

    @defer.inlineCallbacks
    def legAndPeer(self, cls: type[Leg] = Leg) -> Any:
        """
        A L{Leg} on the accepted side of a real loopback connection, and the
        other side's non-blocking socket; both closed after the test.
        """
        from twisted.internet import reactor

        made: defer.Deferred = defer.Deferred()

        def build() -> Leg:
            leg = cls()
            leg.flow = RecordingFlow()  # type: ignore[assignment]
            reactor.callLater(0, made.callback, leg)
            return leg

        port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        peer.setblocking(False)
        leg = yield made
        self.addCleanup(lambda: leg.transport.connected and leg.transport.abortConnection())
        return leg, peer


class WriteTests(LoopbackLegMixin, unittest.TestCase):
    """
    L{Leg.write} sends at once on a TCP transport with nothing queued, and
    otherwise leaves the bytes to the transport, in order.
    """

    @defer.inlineCallbacks
    def test_sendsAtOnce(self) -> Any:
        """
        With nothing queued, the bytes are in the peer's socket when
        C{write} returns, before the reactor runs again.
        """
        leg, peer = yield self.legAndPeer()
        leg.write(b"at once")
        self.assertEqual(peer.recv(100), b"at once")
        self.assertEqual(leg.transport._tempDataLen, 0)

    @defer.inlineCallbacks
    def test_queuedFirst(self) -> Any:
        """
        Bytes queued in the transport go first: what follows is queued
        behind them, and the peer reads everything in order.
        """
        from tests.support import waitUntil

        leg, peer = yield self.legAndPeer()
        leg.transport.write(b"queued ")
        leg.write(b"after")
        with self.assertRaises(BlockingIOError):
            peer.recv(100)
        received = []

        def arrived() -> bool:
            try:
                received.append(peer.recv(100))
            except BlockingIOError:
                pass
            return b"".join(received) == b"queued after"

        yield waitUntil(arrived, "the queued bytes, then the others")

    @defer.inlineCallbacks
    def test_kernelFull(self) -> Any:
        """
        What the kernel does not take is queued in the transport and
        follows, byte-exact, when the peer reads.
        """
        from tests.support import waitUntil

        leg, peer = yield self.legAndPeer()
        leg.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 4096
        leg.write(data)
        self.assertGreater(leg.transport._tempDataLen, 0)
        self.assertLess(leg.transport._tempDataLen, len(data))
        received = bytearray()

        def arrived() -> bool:
            try:
                while True:
                    chunk = peer.recv(65536)
                    if not chunk:
                        break
                    received.extend(chunk)
            except BlockingIOError:
                pass
            return len(received) >= len(data)

        yield waitUntil(arrived, "every byte")
        self.assertEqual(bytes(received), data)

    def test_otherTransports(self) -> None:
        """
        Any other transport (in memory, TLS) is written to as it is.
        """
        transport = TCPStringTransport()
        leg = Leg()
        leg.makeConnection(transport)
        leg.write(b"through")
        self.assertEqual(transport.value(), b"through")


def readAll(peer: socket.socket) -> tuple[bytes, bool]:
    """
    What a non-blocking socket has to read now, and whether its end of
    file came.
    """
    chunks = []
    while True:
        try:
            chunk = peer.recv(65536)
        except BlockingIOError:
            return b"".join(chunks), False
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


class CountingLeg(Leg):
    """
    A leg that counts the ends of its write side and keeps what it reads.
    """

    __slots__ = ("writeLost", "received")

    def __init__(self) -> None:
        super().__init__()
        self.writeLost = 0
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def writeConnectionLost(self) -> None:
        self.writeLost += 1
        super().writeConnectionLost()


class FinTests(LoopbackLegMixin, unittest.TestCase):
    """
    L{Leg.shutdownWrite} sends the FIN at once on a TCP transport with
    nothing to write (L{halfCloseNow}), and otherwise leaves it to the
    transport, after its bytes.
    """

    @defer.inlineCallbacks
    def test_finAtOnce(self) -> Any:
        """
        With nothing queued, the peer reads the end of file when
        C{shutdownWrite} returns, before the reactor runs again; the leg
        learns that its write side is closed once, and the transport does
        not wait to be writable.
        """
        from twisted.internet import reactor

        from tests.support import waitUntil

        leg, peer = yield self.legAndPeer(CountingLeg)
        leg.shutdownWrite()
        self.assertEqual(readAll(peer), (b"", True))
        self.assertEqual(leg.writeLost, 1)
        self.assertTrue(leg.transport._writeDisconnected)
        self.assertNotIn(leg.transport, reactor.getWriters())
        # The leg still reads: a half-close, not a close.
        peer.sendall(b"still open")
        yield waitUntil(lambda: leg.received == [b"still open"], "the peer's bytes")
        self.assertEqual(leg.writeLost, 1)
        self.assertFalse(leg.disconnected)

    @defer.inlineCallbacks
    def test_finAfterBytes(self) -> Any:
        """
        Bytes queued in the transport go first: the FIN waits for the
        reactor to write them, and follows them.
        """
        from tests.support import waitUntil

        leg, peer = yield self.legAndPeer()
        leg.transport.write(b"queued")
        leg.shutdownWrite()
        self.assertEqual(readAll(peer), (b"", False))
        self.assertFalse(leg.writeClosed)
        got = bytearray()

        def ended() -> bool:
            data, eof = readAll(peer)
            got.extend(data)
            return eof

        yield waitUntil(ended, "the bytes, then the FIN")
        self.assertEqual(bytes(got), b"queued")
        self.assertTrue(leg.writeClosed)

    @defer.inlineCallbacks
    def test_replacedDoWrite(self) -> Any:
        """
        A transport whose C{doWrite} somebody replaced (a splice direction
        draining its pipe) gets its FIN from that C{doWrite}, not at once.
        """
        from tests.support import waitUntil

        leg, peer = yield self.legAndPeer()
        transport = leg.transport
        calls = []

        def doWrite() -> Any:
            calls.append(True)
            return type(transport).doWrite(transport)

        transport.doWrite = doWrite
        leg.shutdownWrite()
        self.assertEqual(readAll(peer), (b"", False))
        yield waitUntil(lambda: readAll(peer)[1], "the FIN")
        self.assertTrue(calls)
        self.assertTrue(leg.writeClosed)

    @defer.inlineCallbacks
    def test_closesOnce(self) -> Any:
        """
        A leg whose peer already sent its FIN closes within
        C{shutdownWrite}: the flow hears of it once, cleanly, and the
        socket is closed.
        """
        from twisted.internet import task

        leg, peer = yield self.legAndPeer()
        transport = leg.transport
        sock = transport.socket
        leg.readClosed = True
        leg.shutdownWrite()
        self.assertEqual(leg.flow.events, [("legLost", error.ConnectionDone)])
        self.assertTrue(leg.disconnected)
        self.assertFalse(transport.connected)
        self.assertEqual(sock.fileno(), -1)
        self.assertEqual(readAll(peer), (b"", True))
        # Nothing more comes from the reactor.
        from twisted.internet import reactor

        yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(leg.flow.events, [("legLost", error.ConnectionDone)])
        leg.shutdownWrite()
        leg.loseConnection()
        self.assertEqual(leg.flow.events, [("legLost", error.ConnectionDone)])

    @defer.inlineCallbacks
    def test_peerReset(self) -> Any:
        """
        A FIN on a connection the peer reset fails in C{shutdown}
        (C{ENOTCONN}): as Twisted does, the error is ignored and the write
        side counts as closed; the reset is then read, and the flow hears
        of it once.
        """
        from tests.support import waitUntil

        leg, peer = yield self.legAndPeer()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        with self.assertRaises(OSError) as raised:
            leg.transport.socket.shutdown(socket.SHUT_WR)
        self.assertEqual(raised.exception.errno, errno.ENOTCONN)
        leg.shutdownWrite()
        self.assertTrue(leg.writeClosed)
        yield waitUntil(lambda: leg.flow.events, "the reset")
        self.assertEqual(leg.flow.events, [("legLost", error.ConnectionLost)])


class SlotsTests(unittest.TestCase):
    """
    The legs and the outgoing leg's factory hold no C{__dict__}, and still
    are Twisted protocols and a factory.
    """

    def test_noDict(self) -> None:
        """
        Neither leg, nor L{OutgoingLegFactory}, has an instance dict; both
        legs provide L{IProtocol}, the factory L{IProtocolFactory}.
        """
        from twisted.internet.interfaces import IProtocol, IProtocolFactory

        factory = OutgoingLegFactory(object())  # type: ignore[arg-type]
        for leg in (AcceptedLeg(), factory.buildProtocol(None)):
            self.assertFalse(hasattr(leg, "__dict__"))
            self.assertTrue(verifyObject(IProtocol, leg))
            self.assertEqual(leg.logPrefix(), type(leg).__name__)
        self.assertFalse(hasattr(factory, "__dict__"))
        self.assertTrue(verifyObject(IProtocolFactory, factory))

    def test_makeConnection(self) -> None:
        """
        C{makeConnection} sets the transport and C{connected}, then calls
        C{connectionMade}, as L{Protocol}'s does.
        """
        flow = object()
        leg = OutgoingLegFactory(flow).buildProtocol(None)  # type: ignore[arg-type]
        made = []
        leg.flow = type("F", (), {"outgoingLegMade": lambda self, l: made.append(l)})()
        transport = StringTransport()
        leg.makeConnection(transport)
        self.assertIs(leg.transport, transport)
        self.assertEqual(leg.connected, 1)
        self.assertEqual(made, [leg])


class PrimeSharedKeysTests(unittest.TestCase):
    """
    L{primeSharedKeys} spares the instances of a class the dict of their
    own that attributes set late would cost them (CPython 3.11+).
    """

    def test_lateAttributes(self) -> None:
        """
        Instances given two attributes after they were made allocate
        nothing for them once the class is primed with their names.
        """
        import sys
        import tracemalloc

        from miniproxy.legs import primeSharedKeys

        if sys.implementation.name != "cpython" or sys.version_info < (3, 11):
            raise unittest.SkipTest("shared keys with inline values are CPython 3.11's")

        def late(prime: bool) -> int:
            cls = type("Transport", (), {})

            def init(self: Any) -> None:
                for i in range(13):
                    setattr(self, f"a{i}", i)

            cls.__init__ = init  # type: ignore[misc]
            if prime:
                primeSharedKeys(cls, tuple(f"a{i}" for i in range(13)) + ("producer", "streaming"))
            instances = [cls() for _ in range(100)]
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                for instance in instances:
                    instance.producer = 1
                    instance.streaming = True
                return (tracemalloc.get_traced_memory()[0] - before) // len(instances)
            finally:
                tracemalloc.stop()

        self.assertGreater(late(prime=False), 200)
        self.assertLess(late(prime=True), 50)
