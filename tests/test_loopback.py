"""
The proxy on real loopback sockets, with kernel TCP: byte-exact relay,
half-close, backpressure, connection failures, limits, file descriptors,
and TLS to the next hop.

Every test runs a L{miniproxy.service.ProxyService} in this process on the
global reactor (trial runs it) between test clients and servers on
127.0.0.1; see L{tests.support}.  As root the listeners run a SYN tap, so
flows begin at the client's SYN; the C{...AtAcceptTests} classes run the
same tests with the tap off, so flows begin at accept.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer
from twisted.protocols import portforward
from twisted.trial import unittest
from zope.interface import implementer

from miniproxy.flow import PAUSED_BY_PEER, Moment, Outcome
from miniproxy.functions.base import FlowHandler
from miniproxy.interfaces import IFlowHandlerFactory
from miniproxy.verdict import CONTINUE
from tests.support import (
    TEST_TIMEOUT,
    CertificateAuthority,
    LogCapture,
    Network,
    Peer,
    PeerFactory,
    ResettingFactory,
    listenTLS,
    openFileCount,
    openFiles,
    waitUntil,
    withTimeout,
)

MiB = 1024 * 1024


def buffered(transport: Any) -> int:
    """
    What a Twisted TCP transport holds in userspace, not yet written to
    its socket.
    """
    if transport is None:
        return 0
    return len(transport.dataBuffer) + transport._tempDataLen


@implementer(IFlowHandlerFactory)
class BufferProbe:
    """
    A proxy function (configured directly, not a plugin) that measures,
    after every write the proxy makes to a leg and every read it makes from
    the accepted leg, what the flow buffers in userspace per direction:
    the outgoing (or accepted) transport's write buffer plus the bytes held
    before the outgoing leg connected.

    @ivar maxToServer: The most seen buffered towards the server.
    @ivar maxToClient: The most seen buffered towards the client.
    @ivar flows: The flows seen.
    """

    name = "probe"

    def __init__(self) -> None:
        self.maxToServer = 0
        self.maxToClient = 0
        self.measurements = 0
        self.flows: list[Any] = []

    def handlerForFlow(self, flow: Any) -> Any:
        self.flows.append(flow)
        return _ProbeHandler(self)

    def measure(self, flow: Any) -> None:
        outgoing = flow._outgoing
        accepted = flow._accepted
        toServer = flow._toServerSize + buffered(
            outgoing.transport if outgoing is not None else None
        )
        toClient = flow._toClientSize + buffered(
            accepted.transport if accepted is not None else None
        )
        self.measurements += 1
        self.maxToServer = max(self.maxToServer, toServer)
        self.maxToClient = max(self.maxToClient, toClient)

    def instrument(self, flow: Any, leg: Any) -> None:
        """
        Measure after each write to C{leg}'s transport and each read from
        it.
        """
        transport = leg.transport
        write = transport.write
        probe = self
        base = type(leg)

        def measuredWrite(data: bytes) -> None:
            write(data)
            self.measure(flow)

        class Measured(base):  # type: ignore[valid-type,misc]
            # Legs have __slots__: measure reads with a subclass.
            __slots__ = ()

            def dataReceived(self, data: bytes) -> None:
                base.dataReceived(self, data)
                probe.measure(flow)

        transport.write = measuredWrite
        leg.__class__ = Measured


class _ProbeHandler(FlowHandler):
    __slots__ = ("probe",)

    def __init__(self, probe: BufferProbe) -> None:
        self.probe = probe

    def accepted(self, flow: Any) -> Any:
        self.probe.instrument(flow, flow._accepted)
        return CONTINUE

    def outgoingConnected(self, flow: Any) -> Any:
        self.probe.instrument(flow, flow._outgoing)
        return CONTINUE


@implementer(IPushProducer)
class Flooder(Peer):
    """
    A peer that writes random bytes as fast as its transport takes them
    (it is the transport's push producer) until told to stop; then it
    half-closes.

    @ivar sent: How many bytes it wrote.
    @ivar sentDigest: The SHA-256 of what it wrote.
    @ivar paused: Whether its transport has paused it now.
    @ivar pauses: How many times its transport paused it.
    """

    chunkSize = 64 * 1024

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(keep=False, **kwargs)
        self.sent = 0
        self.sentDigest = hashlib.sha256()
        self.paused = False
        self.pauses = 0
        self.stopped = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self._pump()

    def _pump(self) -> None:
        while not self.paused and not self.stopped and self.isConnected:
            chunk = os.urandom(self.chunkSize)
            self.sent += len(chunk)
            self.sentDigest.update(chunk)
            self.transport.write(chunk)  # type: ignore[union-attr]

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self._pump()

    def stopProducing(self) -> None:
        self.stopped = True

    def stopFlooding(self) -> None:
        """
        Write no more; send a FIN after what is buffered.
        """
        self.stopped = True
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]


class FlooderFactory(PeerFactory):
    def buildProtocol(self, addr: Any) -> Peer:
        flooder = Flooder(**self.peerArgs)
        flooder.factory = self
        self.peers.append(flooder)
        self.network.track(flooder)
        flooder.whenConnected.addCallback(lambda p: (self.accepted.put(p), p)[1])
        return flooder


class RelayTests(unittest.TestCase):
    """
    Bytes cross the proxy exactly, both ways at once.
    """

    timeout = TEST_TIMEOUT
    synTap = True

    @defer.inlineCallbacks
    def test_bothDirectionsAtOnce(self) -> Any:
        """
        Several MB from the client and several MB from the server, written
        at the same time, arrive byte for byte; each side's FIN arrives
        after its bytes, and the flow ends C{ok} with the byte counts.
        """
        net = Network(self)
        serverPort, servers = net.server()
        proxy = yield net.startProxy(f"tcp:host=127.0.0.1:port={serverPort}")
        up = os.urandom(6 * MiB + 123)
        down = os.urandom(5 * MiB + 77)

        def serve(server: Peer) -> None:
            server.transport.write(down)
            server.transport.loseWriteConnection()

        servers.onConnect = serve
        client = yield net.connect(proxy.port)
        client.transport.write(up)
        client.transport.loseWriteConnection()
        server = yield servers.nextPeer()
        yield withTimeout(
            defer.gatherResults([client.lost, server.lost]), 30, "both ends to close"
        )
        flow = yield proxy.nextClosed()

        self.assertEqual((server.size, server.digest.hexdigest()),
                         (len(up), hashlib.sha256(up).hexdigest()))
        self.assertEqual((client.size, client.digest.hexdigest()),
                         (len(down), hashlib.sha256(down).hexdigest()))
        self.assertTrue(client.eofBeforeLost and server.eofBeforeLost)
        self.assertFalse(client.wasReset() or server.wasReset())
        self.assertEqual(flow.outcome, Outcome.OK)
        self.assertEqual((flow.bytesFromClient, flow.bytesFromServer), (len(up), len(down)))
        tapped = self.synTap and proxy.service.early.available
        self.assertEqual(flow.startedBy, Moment.SYN if tapped else Moment.ACCEPT)


class HalfCloseTests(unittest.TestCase):
    """
    A FIN crosses the proxy on its own: the other direction stays open.

    Each scenario is also run through L{twisted.protocols.portforward},
    which has no half-close, to show that the checks catch a relay that
    gets this wrong.
    """

    timeout = TEST_TIMEOUT
    synTap = True
    request = b"GET / HTTP/1.0\r\n\r\n" * 100
    response = os.urandom(2 * MiB + 5)

    @defer.inlineCallbacks
    def clientClosesFirst(self, net: Network, relayPort: int, servers: PeerFactory) -> Any:
        """
        The client sends a request and a FIN; once the server sees that
        FIN, it answers and closes.
        """
        client = yield net.connect(relayPort)
        server = yield servers.nextPeer()
        client.transport.write(self.request)
        client.transport.loseWriteConnection()
        yield withTimeout(server.eof.addErrback(lambda f: None), 10, "the server's EOF")
        server.transport.write(self.response)
        server.transport.loseConnection()
        yield withTimeout(
            defer.gatherResults([client.lost, server.lost]), 20, "both ends to close"
        )
        return client, server

    def assertClientClosedFirstWorked(self, client: Peer, server: Peer) -> None:
        self.assertEqual(server.received, self.request)
        self.assertTrue(server.eofBeforeLost, "the server saw no FIN")
        self.assertEqual(client.size, len(self.response),
                         "the client did not get the whole answer")
        self.assertEqual(client.received, self.response)
        self.assertTrue(client.eofBeforeLost, "the client saw no FIN")
        self.assertFalse(client.wasReset(), client.reason)

    @defer.inlineCallbacks
    def serverClosesFirst(self, net: Network, relayPort: int, servers: PeerFactory) -> Any:
        """
        The server sends a greeting and a FIN; once the client sees that
        FIN, it sends its data and closes.
        """
        client = yield net.connect(relayPort)
        server = yield servers.nextPeer()
        server.transport.write(self.response)
        server.transport.loseWriteConnection()
        yield withTimeout(client.eof.addErrback(lambda f: None), 10, "the client's EOF")
        client.transport.write(self.request)
        client.transport.loseConnection()
        yield withTimeout(
            defer.gatherResults([client.lost, server.lost]), 20, "both ends to close"
        )
        return client, server

    def assertServerClosedFirstWorked(self, client: Peer, server: Peer) -> None:
        self.assertEqual(client.received, self.response)
        self.assertTrue(client.eofBeforeLost, "the client saw no FIN")
        self.assertEqual(server.received, self.request,
                         "the server did not get the client's data")
        self.assertTrue(server.eofBeforeLost, "the server saw no FIN")
        self.assertFalse(server.wasReset(), server.reason)

    @defer.inlineCallbacks
    def test_clientHalfClosesFirst(self) -> Any:
        """
        The client's FIN reaches the server, whose answer still reaches
        the client in full, followed by a FIN; the flow ends C{ok}, the
        client's half-close before the server's.
        """
        net = Network(self)
        serverPort, servers = net.server()
        proxy = yield net.startProxy(f"tcp:host=127.0.0.1:port={serverPort}")
        client, server = yield self.clientClosesFirst(net, proxy.port, servers)
        self.assertClientClosedFirstWorked(client, server)
        flow = yield proxy.nextClosed()
        self.assertEqual(flow.outcome, Outcome.OK)
        self.assertLess(flow.times.clientHalfClosed, flow.times.serverHalfClosed)

    @defer.inlineCallbacks
    def test_serverHalfClosesFirst(self) -> Any:
        """
        The mirror case: the server's FIN reaches the client, whose data
        still reaches the server in full, followed by a FIN.
        """
        net = Network(self)
        serverPort, servers = net.server()
        proxy = yield net.startProxy(f"tcp:host=127.0.0.1:port={serverPort}")
        client, server = yield self.serverClosesFirst(net, proxy.port, servers)
        self.assertServerClosedFirstWorked(client, server)
        flow = yield proxy.nextClosed()
        self.assertEqual(flow.outcome, Outcome.OK)
        self.assertLess(flow.times.serverHalfClosed, flow.times.clientHalfClosed)

    def portforward(self, net: Network, serverPort: int) -> int:
        factory = portforward.ProxyFactory("127.0.0.1", serverPort)
        factory.noisy = False
        return net.listen(factory)

    @defer.inlineCallbacks
    def test_checksCatchARelayWithoutHalfClose(self) -> Any:
        """
        Through C{portforward}, which closes both directions at the first
        FIN, both scenarios fail their checks.
        """
        net = Network(self)
        serverPort, servers = net.server()
        relayPort = self.portforward(net, serverPort)
        client, server = yield self.clientClosesFirst(net, relayPort, servers)
        self.assertRaises(
            self.failureException, self.assertClientClosedFirstWorked, client, server
        )
        self.assertLess(client.size, len(self.response))
        client, server = yield self.serverClosesFirst(net, relayPort, servers)
        self.assertRaises(
            self.failureException, self.assertServerClosedFirstWorked, client, server
        )
        self.assertNotEqual(server.received, self.request)


class BackpressureTests(unittest.TestCase):
    """
    A peer that does not read does not make the proxy buffer more than
    C{max-buffer} per direction; once it reads again, every byte arrives.
    """

    timeout = TEST_TIMEOUT
    synTap = True
    maxBuffer = 64 * 1024
    # These measure the userspace relay's buffers (the splice path's bound
    # is tested in tests.test_splice).
    limits = {"max-buffer": maxBuffer, "splice": False}

    @defer.inlineCallbacks
    def test_slowServer(self) -> Any:
        """
        The client floods; the server does not read.  The proxy stops
        reading from the client (its accepted leg is paused by the
        outgoing leg's transport) with at most C{max-buffer} bytes buffered
        towards the server; when the server reads, all the bytes arrive.
        """
        net = Network(self)
        serverPort, servers = net.server(pauseOnConnect=True, keep=False)
        probe = BufferProbe()
        proxy = yield net.startProxy(
            f"tcp:host=127.0.0.1:port={serverPort}",
            limits=self.limits,
            functions=(("probe", probe),),
        )
        client = yield net.connect(proxy.port, Flooder())
        server = yield servers.nextPeer()
        [flow] = probe.flows

        def saturated() -> bool:
            accepted = flow._accepted
            return (
                accepted is not None
                and bool(accepted._paused & PAUSED_BY_PEER)
                and client.paused
            )

        yield waitUntil(saturated, "the proxy to stop reading from the flooding client",
                        timeout=30)
        self.assertEqual(server.size, 0)
        self.assertLess(flow.bytesFromClient, client.sent)
        client.stopFlooding()
        server.transport.resumeProducing()
        yield withTimeout(server.eof, 30, "the server to read everything")
        server.transport.loseConnection()
        yield withTimeout(client.lost, 10, "the client to close")
        closed = yield proxy.nextClosed()

        self.assertEqual(server.size, client.sent)
        self.assertEqual(server.digest.hexdigest(), client.sentDigest.hexdigest())
        self.assertEqual(closed.outcome, Outcome.OK)
        self.assertGreater(probe.measurements, 0)
        # The bound held, and was reached: the pause threshold is half of it.
        self.assertLessEqual(probe.maxToServer, self.maxBuffer)
        self.assertGreater(probe.maxToServer, self.maxBuffer // 2)

    @defer.inlineCallbacks
    def test_slowClient(self) -> Any:
        """
        The mirror case: the server floods, the client does not read.
        """
        net = Network(self)
        servers = FlooderFactory(net)
        serverPort = net.listen(servers)
        probe = BufferProbe()
        proxy = yield net.startProxy(
            f"tcp:host=127.0.0.1:port={serverPort}",
            limits=self.limits,
            functions=(("probe", probe),),
        )
        client = yield net.connect(proxy.port, Peer(pauseOnConnect=True, keep=False))
        server = yield servers.nextPeer()
        [flow] = probe.flows

        def saturated() -> bool:
            outgoing = flow._outgoing
            return (
                outgoing is not None
                and bool(outgoing._paused & PAUSED_BY_PEER)
                and server.paused
            )

        yield waitUntil(saturated, "the proxy to stop reading from the flooding server",
                        timeout=30)
        self.assertEqual(client.size, 0)
        server.stopFlooding()
        client.transport.resumeProducing()
        yield withTimeout(client.eof, 30, "the client to read everything")
        client.transport.loseConnection()
        yield withTimeout(server.lost, 10, "the server to close")
        closed = yield proxy.nextClosed()

        self.assertEqual(client.size, server.sent)
        self.assertEqual(client.digest.hexdigest(), server.sentDigest.hexdigest())
        self.assertEqual(closed.outcome, Outcome.OK)
        self.assertLessEqual(probe.maxToClient, self.maxBuffer)
        self.assertGreater(probe.maxToClient, self.maxBuffer // 2)


class FailureTests(unittest.TestCase):
    """
    When the server cannot be reached, or resets, the client is told and
    the flow's outcome and reason say what happened.
    """

    timeout = TEST_TIMEOUT
    synTap = True

    @defer.inlineCallbacks
    def test_refused(self) -> Any:
        """
        Upstream refuses the connection: the client's connection is closed
        (cleanly, after no byte) and the flow is C{connect-failed} because
        the connection was refused.
        """
        net = Network(self)
        proxy = yield net.startProxy(f"tcp:host=127.0.0.1:port={net.refusingPort()}")
        client = yield net.connect(proxy.port)
        yield withTimeout(client.ended, 10, "the client's connection to end")
        flow = yield proxy.nextClosed()
        self.assertEqual(client.size, 0)
        self.assertTrue(client.sawEOF)
        self.assertFalse(client.wasReset(), client.reason)
        self.assertEqual(flow.outcome, Outcome.CONNECT_FAILED)
        self.assertIn("connection refused", flow.reason)

    @defer.inlineCallbacks
    def test_serverResets(self) -> Any:
        """
        The server accepts, reads, then resets: the client's connection is
        reset too, and the flow is C{reset} by the server.
        """
        net = Network(self)
        resetting = ResettingFactory(net, after=5)
        proxy = yield net.startProxy(f"tcp:host=127.0.0.1:port={net.listen(resetting)}")
        client = yield net.connect(proxy.port)
        client.transport.write(b"hello")
        yield withTimeout(client.lost, 10, "the client's connection to close")
        flow = yield proxy.nextClosed()
        self.assertEqual(resetting.count, 1)
        self.assertTrue(client.wasReset(), client.reason)
        self.assertTrue(client.reason.check(error.ConnectionLost), client.reason)
        self.assertEqual(flow.outcome, Outcome.RESET)
        self.assertTrue(flow.reason.startswith("server:"), flow.reason)

    @defer.inlineCallbacks
    def test_clientResets(self) -> Any:
        """
        The client resets: the server's connection is reset too, and the
        flow is C{reset} by the client.
        """
        from tests.support import resetTransport

        net = Network(self)
        serverPort, servers = net.server()
        proxy = yield net.startProxy(f"tcp:host=127.0.0.1:port={serverPort}")
        client = yield net.connect(proxy.port)
        server = yield servers.nextPeer()
        client.transport.write(b"hello")
        yield server.waitForBytes(5)
        resetTransport(client.transport)
        yield withTimeout(server.lost, 10, "the server's connection to close")
        flow = yield proxy.nextClosed()
        self.assertTrue(server.wasReset(), server.reason)
        self.assertEqual(flow.outcome, Outcome.RESET)
        self.assertTrue(flow.reason.startswith("client:"), flow.reason)

    @defer.inlineCallbacks
    def test_connectTimeout(self) -> Any:
        """
        Upstream drops the SYNs: after the connect timeout the client's
        connection is closed cleanly and the flow is C{connect-timeout}.
        """
        net = Network(self)
        proxy = yield net.startProxy(
            f"tcp:host=127.0.0.1:port={net.blackHolePort()}",
            limits={"connect-timeout": 0.3},
        )
        client = yield net.connect(proxy.port)
        client.transport.write(b"hello")
        yield withTimeout(client.ended, 10, "the client's connection to end")
        flow = yield proxy.nextClosed()
        self.assertEqual(client.size, 0)
        self.assertTrue(client.sawEOF)
        self.assertFalse(client.wasReset(), client.reason)
        self.assertEqual(flow.outcome, Outcome.CONNECT_TIMEOUT)
        self.assertEqual(flow.bytesFromClient, 5)
        self.assertIn("timed out", flow.reason)
        waited = flow.times.closed - flow.times.outgoingStarted
        self.assertGreaterEqual(waited, 0.29)


class FileDescriptorTests(unittest.TestCase):
    """
    Flows, whatever their end, leave no file descriptor behind.
    """

    timeout = TEST_TIMEOUT

    @defer.inlineCallbacks
    def test_noLeakAfterManyFlows(self) -> Any:
        """
        After 300 flows that succeed, are refused upstream, are reset by
        the server or the client, or time out connecting, and once every
        one is closed, the process has as many descriptors open as before.
        """
        net = Network(self)
        echoPort, _ = net.server(echo=True)
        resetPort = net.listen(ResettingFactory(net, after=1))
        targets = {
            "echo": echoPort,
            "refused": net.refusingPort(),
            "reset": resetPort,
            "timeout": net.blackHolePort(),
        }
        names = list(targets)
        proxy = yield net.startProxy(
            None,
            listen=None,
            document={
                "listeners": [
                    {
                        "endpoint": "tcp:0:interface=127.0.0.1",
                        "to": f"tcp:host=127.0.0.1:port={targets[name]}",
                    }
                    for name in names
                ]
            },
            limits={"connect-timeout": 0.2},
        )
        portOf = dict(zip(names, proxy.ports))
        kinds = ["echo", "refused", "reset", "abort", "echo", "refused", "reset",
                 "abort", "echo", "timeout"]

        @defer.inlineCallbacks
        def oneFlow(kind: str) -> Any:
            client = yield net.connect(portOf["echo" if kind == "abort" else kind])
            client.transport.write(b"x" * 1000)
            if kind == "echo":
                client.transport.loseWriteConnection()
            elif kind == "abort":
                client.transport.abortConnection()
            yield client.ended
            client.transport.loseConnection()
            yield client.lost
            if kind == "echo":
                self.assertEqual(client.received, b"x" * 1000)
            return client

        # Warm up: one flow of each kind, so that whatever the reactor makes
        # once (and keeps) is made before counting.
        yield defer.gatherResults([oneFlow(kind) for kind in set(kinds)])
        yield proxy.waitForClosed(len(set(kinds)))
        yield waitUntil(lambda: not proxy.openFlows(), "the warm-up flows to close")
        before = openFiles()

        total = 300
        batch = 50
        done = 0
        while done < total:
            yield withTimeout(
                defer.gatherResults(
                    [oneFlow(kinds[i % len(kinds)]) for i in range(done, done + batch)]
                ),
                20,
                "a batch of flows",
            )
            done += batch
        closed = yield proxy.waitForClosed(len(set(kinds)) + total, timeout=20)
        yield waitUntil(lambda: not proxy.openFlows(), "every flow to close")
        # The servers' ends close when the flows' outgoing legs do, maybe a
        # little after the flows: wait for the count (if it never drops, the
        # assertion below names what leaked).
        yield waitUntil(
            lambda: openFileCount() <= len(before), "the servers' connections to close",
            timeout=5,
        ).addErrback(lambda f: None)
        after = openFiles()

        outcomes = {flow.outcome for flow in closed}
        self.assertEqual(
            outcomes,
            {Outcome.OK, Outcome.CONNECT_FAILED, Outcome.RESET, Outcome.CONNECT_TIMEOUT},
        )
        leaked = {fd: what for fd, what in after.items() if before.get(fd) != what}
        self.assertEqual(leaked, {}, f"{len(after) - len(before)} descriptors leaked")


class LimitTests(unittest.TestCase):
    """
    The flow limits and the idle timeout.
    """

    timeout = TEST_TIMEOUT

    @defer.inlineCallbacks
    def holdFlow(self, net: Network, proxy: Any, servers: PeerFactory,
                 bindAddress: str | None = None) -> Any:
        client = yield net.connect(proxy.port, bindAddress=bindAddress)
        client.transport.write(b"ping")
        server = yield servers.nextPeer()
        yield server.waitForBytes(4)
        return client, server

    @defer.inlineCallbacks
    def assertRefusedAtAccept(self, net: Network, proxy: Any, logs: LogCapture,
                              bindAddress: str | None = None) -> Any:
        refusedBefore = proxy.service.table.refused
        linesBefore = len(logs.matching("miniproxy.access", outcome="refused"))
        client = yield net.connect(proxy.port, bindAddress=bindAddress)
        yield withTimeout(client.ended, 10, "the refused client's connection to end")
        self.assertEqual(client.size, 0)
        self.assertTrue(client.sawEOF)
        self.assertFalse(client.wasReset(), client.reason)
        self.assertEqual(proxy.service.table.refused, refusedBefore + 1)
        lines = logs.matching("miniproxy.access", outcome="refused")
        self.assertEqual(len(lines), linesBefore + 1)
        return lines[-1]

    @defer.inlineCallbacks
    def test_maxFlows(self) -> Any:
        """
        With C{max-flows = 2}, a third connection while two flows are open
        is closed at once, without reaching the server, and logged; once a
        flow closes, a new connection is admitted again.
        """
        net = Network(self)
        logs = LogCapture(self)
        serverPort, servers = net.server(echo=True)
        proxy = yield net.startProxy(
            f"tcp:host=127.0.0.1:port={serverPort}", limits={"max-flows": 2}
        )
        first = yield self.holdFlow(net, proxy, servers)
        yield self.holdFlow(net, proxy, servers)
        line = yield self.assertRefusedAtAccept(net, proxy, logs)
        self.assertIn("too many flows", line["reason"])
        self.assertEqual(len(servers.peers), 2)

        client, server = first
        client.transport.loseConnection()
        yield proxy.nextClosed()
        yield self.holdFlow(net, proxy, servers)
        self.assertEqual(len(servers.peers), 3)

    @defer.inlineCallbacks
    def test_maxFlowsPerSource(self) -> Any:
        """
        With C{max-flows-per-source = 1}, a second connection from
        127.0.0.1 is refused while one from 127.0.0.2 is admitted.
        """
        net = Network(self)
        logs = LogCapture(self)
        serverPort, servers = net.server(echo=True)
        proxy = yield net.startProxy(
            f"tcp:host=127.0.0.1:port={serverPort}", limits={"max-flows-per-source": 1}
        )
        yield self.holdFlow(net, proxy, servers, bindAddress="127.0.0.1")
        line = yield self.assertRefusedAtAccept(net, proxy, logs, bindAddress="127.0.0.1")
        self.assertIn("from 127.0.0.1", line["reason"])
        self.assertEqual(line["client"], "127.0.0.1")
        yield self.holdFlow(net, proxy, servers, bindAddress="127.0.0.2")
        self.assertEqual(
            sorted(peer.transport.getPeer().host for peer in servers.peers),
            ["127.0.0.1", "127.0.0.1"],
        )
        self.assertEqual(len(proxy.openFlows()), 2)

    @defer.inlineCallbacks
    def test_idleTimeout(self) -> Any:
        """
        A flow whose bytes keep flowing outlives the idle timeout; once
        silent for it, both legs are reset and the flow is
        C{idle-timeout}.
        """
        from twisted.internet import reactor, task

        idle = 0.6
        net = Network(self)
        serverPort, servers = net.server(echo=True)
        proxy = yield net.startProxy(
            f"tcp:host=127.0.0.1:port={serverPort}", limits={"idle-timeout": idle}
        )
        client = yield net.connect(proxy.port)
        server = yield servers.nextPeer()
        start = reactor.seconds()
        # Traffic every idle/6 seconds for twice the idle timeout (this is
        # the traffic's pattern, not a wait for an event; the margin lets a
        # loaded machine be late).
        rounds = 12
        for i in range(1, rounds + 1):
            client.transport.write(b"p")
            yield withTimeout(client.waitForBytes(i), 5, "the echo")
            if i < rounds:
                yield task.deferLater(reactor, idle / 6, lambda: None)
        self.assertTrue(client.isConnected)
        self.assertGreater(reactor.seconds() - start, idle)
        self.assertEqual(proxy.closed, [])
        silentSince = reactor.seconds()
        yield withTimeout(
            defer.gatherResults([client.lost, server.lost]), 10, "the idle flow's reset"
        )
        flow = yield proxy.nextClosed()
        self.assertTrue(client.wasReset(), client.reason)
        self.assertTrue(server.wasReset(), server.reason)
        self.assertEqual(flow.outcome, Outcome.IDLE_TIMEOUT)
        self.assertGreaterEqual(flow.times.closed - silentSince, idle * 0.9)


class TLSTests(unittest.TestCase):
    """
    Outgoing TLS (C{--to tls:...}): bytes are relayed, and a server whose
    certificate does not verify is a failed connection.
    """

    timeout = TEST_TIMEOUT
    synTap = True

    def setUp(self) -> None:
        self.ca = CertificateAuthority()
        self.caFile = self.ca.writeCertificate(self.mktemp())

    @defer.inlineCallbacks
    def test_relay(self) -> Any:
        """
        The proxy verifies the server's certificate for C{localhost}
        against the CA of C{trustRoots}, then relays bytes both ways; the
        server's close ends the flow C{ok}.
        """
        net = Network(self)
        servers = PeerFactory(net)
        serverPort = listenTLS(net, servers, self.ca.issue("localhost"))
        proxy = yield net.startProxy(
            f"tls:host=localhost:port={serverPort}:trustRoots={self.caFile}"
        )
        request = os.urandom(300 * 1024)
        response = os.urandom(MiB)
        client = yield net.connect(proxy.port)
        client.transport.write(request)
        server = yield servers.nextPeer()
        yield withTimeout(server.waitForBytes(len(request)), 10, "the request")
        server.transport.write(response)
        server.transport.loseConnection()
        yield withTimeout(client.eof, 10, "the client's EOF")
        client.transport.loseConnection()
        yield withTimeout(client.lost, 10, "the client to close")
        flow = yield proxy.nextClosed()
        self.assertEqual(server.received, request)
        self.assertEqual(client.received, response)
        self.assertEqual(flow.outcome, Outcome.OK)
        self.assertIsNotNone(flow.times.outgoingConnected)

    @defer.inlineCallbacks
    def assertRejected(self, serverPEM: bytes, why: str) -> Any:
        net = Network(self)
        servers = PeerFactory(net)
        serverPort = listenTLS(net, servers, serverPEM)
        proxy = yield net.startProxy(
            f"tls:host=localhost:port={serverPort}:trustRoots={self.caFile}"
        )
        client = yield net.connect(proxy.port)
        client.transport.write(b"secret request")
        yield withTimeout(client.ended, 10, "the client's connection to end")
        flow = yield proxy.nextClosed()
        self.assertEqual(client.size, 0)
        self.assertTrue(client.sawEOF)
        self.assertFalse(client.wasReset(), client.reason)
        self.assertEqual(flow.outcome, Outcome.CONNECT_FAILED)
        self.assertIn("TLS handshake with localhost failed", flow.reason)
        self.assertIn(why, flow.reason)
        self.assertIsNone(flow.times.outgoingConnected)
        self.assertEqual(b"".join(p.received for p in servers.peers), b"")

    def test_wrongHostname(self) -> Any:
        """
        A certificate from the trusted CA but for another name is rejected
        (service-identity): the flow is C{connect-failed}, the client's
        connection is closed and its bytes never reach the server.
        """
        return self.assertRejected(
            self.ca.issue("wrong.example"), "does not match the expected name"
        )

    def test_untrustedIssuer(self) -> Any:
        """
        A certificate for the right name from another CA is rejected.
        """
        return self.assertRejected(
            CertificateAuthority("another CA").issue("localhost"), "certificate verify failed"
        )


class RelayAtAcceptTests(RelayTests):
    """
    L{RelayTests} with no SYN tap: flows start at accept.
    """

    synTap = False


class HalfCloseAtAcceptTests(HalfCloseTests):
    """
    L{HalfCloseTests} with no SYN tap.
    """

    synTap = False


class BackpressureAtAcceptTests(BackpressureTests):
    """
    L{BackpressureTests} with no SYN tap.
    """

    synTap = False


class FailureAtAcceptTests(FailureTests):
    """
    L{FailureTests} with no SYN tap.
    """

    synTap = False


class TLSAtAcceptTests(TLSTests):
    """
    L{TLSTests} with no SYN tap.
    """

    synTap = False
