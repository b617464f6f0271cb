"""
Tests for L{miniproxy.splice}: the zero-copy relay, on real loopback
sockets and kernel TCP.

Every test runs a L{miniproxy.service.ProxyService} in this process (see
L{tests.support}) and checks that its flows really took the splice path
(the bytes each direction spliced), and that they kept the userspace
relay's semantics: exact bytes, half-close, the buffer bound, resets, the
idle timeout, no leaked descriptor, and the fallback to userspace when a
function asks for the bytes or the kernel cannot splice.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import selectors
import socket
import stat
import struct
import termios
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, threads
from twisted.internet.error import ConnectionLost
from twisted.trial import unittest

from miniproxy import splice as spliceModule
from miniproxy.config import buildConfig
from miniproxy.errors import ConfigError
from miniproxy.flow import PAUSED_SPLICE, Outcome
from miniproxy.functions.base import FlowHandler, HandlerFactory
from miniproxy.limits import DEFAULT_SPLICE_AFTER, Limits
from miniproxy.splice import SpliceRelay, _Direction, buffered, spliceable, stats
from miniproxy.verdict import CONTINUE, Chunk, Verdict
from tests.support import (
    TEST_TIMEOUT,
    CertificateAuthority,
    LogCapture,
    Network,
    Peer,
    PeerFactory,
    ResettingFactory,
    listenTLS,
    openFiles,
    resetTransport,
    sha256,
    waitUntil,
    withTimeout,
)

MiB = 1024 * 1024


def pattern(size: int, seed: int = 0) -> bytes:
    """
    C{size} bytes whose every byte depends on its position (modulo a prime),
    so that a lost, repeated or reordered piece shows.
    """
    block = bytes((seed + 7 * i) % 251 for i in range(251 * 64))
    return (block * (size // len(block) + 1))[:size]


def splicingFlow(proxy: Any) -> defer.Deferred:
    """
    @return: A L{defer.Deferred} firing with the proxy's first open flow
        once it relays on the splice path.
    """
    found: list[Any] = []

    def check() -> bool:
        for flow in proxy.openFlows():
            if flow._splice is not None and flow._splice.active:
                found.append(flow)
                return True
        return False

    return waitUntil(check, "a flow on the splice path").addCallback(lambda _: found[0])


def pairedFlow(proxy: Any) -> defer.Deferred:
    """
    @return: A L{defer.Deferred} firing with the proxy's first open flow
        once both its legs are connected.
    """
    found: list[Any] = []

    def check() -> bool:
        for flow in proxy.openFlows():
            if flow._accepted is not None and flow._outgoing is not None:
                found.append(flow)
                return True
        return False

    return waitUntil(check, "a flow with both legs").addCallback(lambda _: found[0])


def pipes() -> int:
    """
    How many pipe descriptors this process has open.
    """
    return sum(1 for what in openFiles().values() if what.startswith("pipe:"))


def ownMethods(transport: Any) -> bool:
    """
    Whether C{transport}'s C{doRead} and C{doWrite} are its class's own
    (no splice direction replaced them).
    """
    return all(
        getattr(getattr(transport, name), "__func__", None) is getattr(type(transport), name)
        for name in ("doRead", "doWrite")
    )


def directionsOf(flow: Any) -> list[Any]:
    """
    The splice directions that exist for C{flow}, found by the garbage
    collector (not through the flow).
    """
    return [o for o in gc.get_objects() if isinstance(o, _Direction) and o.relay.flow is flow]


def fionread(fd: int) -> int:
    """
    What a pipe (either end) holds, as the kernel says (C{FIONREAD}).
    """
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def pipeHolds(direction: Any) -> int:
    """
    What a direction's pipe holds.
    """
    return fionread(direction._pipe[0])


def unsentBound(transport: Any) -> int:
    """
    The C{TCP_NOTSENT_LOWAT} of a transport's socket (0: the kernel's
    default, no bound).
    """
    return transport.socket.getsockopt(socket.IPPROTO_TCP, spliceModule.TCP_NOTSENT_LOWAT)


def isReading(transport: Any) -> bool:
    """
    Whether the reactor reads C{transport}.
    """
    return transport in transport.reactor.getReaders()


class Watcher(FlowHandler):
    """
    A handler that records the bytes its data hooks see, and wants them
    only once told to (L{watch}).
    """

    def __init__(self, flow: Any) -> None:
        self.flow = flow
        self.wantsData = False
        self.fromClient: list[bytes] = []
        self.fromServer: list[bytes] = []
        self.closedWith: Any = None

    def watch(self, wanted: bool = True) -> None:
        """
        Start (or stop) looking at the bytes.
        """
        self.wantsData = wanted
        self.flow.wantsDataChanged()

    def dataFromClient(self, flow: Any, chunk: Chunk) -> Verdict:
        self.fromClient.append(chunk.data)
        return CONTINUE

    def dataFromServer(self, flow: Any, chunk: Chunk) -> Verdict:
        self.fromServer.append(chunk.data)
        return CONTINUE

    def closed(self, flow: Any) -> Verdict:
        self.closedWith = flow.outcome
        return CONTINUE


class Watching:
    """
    A configured function that gives each flow a L{Watcher}.

    @ivar watchers: The watchers made, in order.
    """

    def __init__(self, wantsData: bool = False) -> None:
        """
        @param wantsData: Whether the watchers want the bytes from the
            start.
        """
        self.watchers: list[Watcher] = []
        self.wantsData = wantsData
        self.factory = HandlerFactory("watch", self._make)

    def _make(self, flow: Any) -> Watcher:
        watcher = Watcher(flow)
        watcher.wantsData = self.wantsData
        self.watchers.append(watcher)
        return watcher

    def watcherOf(self, flow: Any) -> Watcher:
        """
        The watcher of C{flow}.
        """
        [watcher] = [w for w in self.watchers if w.flow is flow]
        return watcher


class SpliceTestCase(unittest.TestCase):
    """
    Real-socket tests: a network, a server and a proxy in front of it.
    """

    timeout = TEST_TIMEOUT
    maxBuffer = 64 * 1024
    #: These tests are of the splice path itself: their flows switch to it
    #: as soon as both legs are paired (L{LazyTests} test the threshold).
    spliceAfter = 0

    @defer.inlineCallbacks
    def startProxy(self, net: Network, serverPort: int, **limits: Any) -> Any:
        functions = None
        if "watching" in limits:
            functions = (("watch", limits.pop("watching").factory),)
        allLimits = {"max-buffer": self.maxBuffer, "splice-after": self.spliceAfter}
        allLimits.update(limits)
        proxy = yield net.startProxy(
            f"tcp:host=127.0.0.1:port={serverPort}",
            limits=allLimits,
            functions=functions,
        )
        return proxy

    @defer.inlineCallbacks
    def connected(self, net: Network, proxy: Any, servers: PeerFactory,
                  client: Peer | None = None) -> Any:
        """
        Connect a client through the proxy and wait until its flow splices.

        @return: The client, the server and the flow.
        """
        client = yield net.connect(proxy.port, client)
        server = yield servers.nextPeer()
        flow = yield splicingFlow(proxy)
        return client, server, flow

    @defer.inlineCallbacks
    def bothWaysAtOnce(self, proxy: Any, client: Peer, server: Peer, up: bytes,
                       down: bytes) -> Any:
        """
        The client writes C{up} and a FIN, the server C{down} and a FIN, at
        once; each gets the other's bytes exactly, then its FIN, and the
        flow ends with neither side reset.

        @return: The flow, closed.
        """
        client.transport.write(up)
        client.transport.loseWriteConnection()
        server.transport.write(down)
        server.transport.loseWriteConnection()
        yield withTimeout(
            defer.gatherResults([client.lost, server.lost]), 30, "both ends to close"
        )
        closed = yield proxy.nextClosed()
        self.assertEqual((server.size, server.digest.hexdigest()), (len(up), sha256(up)))
        self.assertEqual((client.size, client.digest.hexdigest()),
                         (len(down), sha256(down)))
        self.assertTrue(client.eofBeforeLost and server.eofBeforeLost)
        self.assertFalse(client.wasReset() or server.wasReset())
        self.assertEqual(closed.outcome, Outcome.OK)
        return closed

    @defer.inlineCallbacks
    def readAllAndClose(self, proxy: Any, reader: Peer, writer: Peer, data: bytes) -> Any:
        """
        A paused C{reader} reads again and C{writer} sends its FIN; once the
        reader has read to the end, it closes.  The reader got C{data},
        exactly.
        """
        reader.transport.resumeProducing()
        writer.transport.loseWriteConnection()
        yield withTimeout(reader.eof, 30, "the reader to read everything")
        reader.transport.loseConnection()
        yield withTimeout(writer.lost, 10, "the writer to close")
        yield proxy.nextClosed()
        self.assertEqual((reader.size, reader.digest.hexdigest()),
                         (len(data), sha256(data)))


class RelayTests(SpliceTestCase):
    """
    Bytes cross the splice path exactly.
    """

    @defer.inlineCallbacks
    def test_bothDirectionsAtOnce(self) -> Any:
        """
        Several MB each way, written at the same time, arrive byte for
        byte and every one of them was spliced; each FIN follows its
        bytes, the flow ends C{ok} with the byte counts and the first-byte
        times, and its pipes are closed.
        """
        net = Network(self)
        serverPort, servers = net.server(keep=False)
        proxy = yield self.startProxy(net, serverPort)
        relaysBefore = stats.relays
        client, server, flow = yield self.connected(
            net, proxy, servers, Peer(keep=False)
        )
        up = os.urandom(6 * MiB + 123)
        down = os.urandom(5 * MiB + 77)
        closed = yield self.bothWaysAtOnce(proxy, client, server, up, down)
        self.assertIs(closed, flow)
        self.assertEqual((flow.bytesFromClient, flow.bytesFromServer), (len(up), len(down)))
        relay = flow._splice
        self.assertEqual((relay.toServer.spliced, relay.toClient.spliced),
                         (len(up), len(down)))
        self.assertEqual(relay.spliced, len(up) + len(down))
        self.assertEqual(stats.relays, relaysBefore + 1)
        self.assertIsNone(relay.toServer._pipe)
        self.assertIsNone(relay.toClient._pipe)
        self.assertFalse(relay.active)
        self.assertLessEqual(flow.times.accepted, flow.times.firstByteFromClient)
        self.assertLessEqual(flow.times.firstByteFromClient, flow.times.clientHalfClosed)
        self.assertLessEqual(flow.times.firstByteFromServer, flow.times.serverHalfClosed)

    @defer.inlineCallbacks
    def test_accessLog(self) -> Any:
        """
        A spliced flow's access-log line has the byte counts of the
        userspace relay, and its functions' C{closed} hooks run.
        """
        logs = LogCapture(self)
        net = Network(self)
        serverPort, servers = net.server(echo=True)
        watching = Watching()
        proxy = yield self.startProxy(net, serverPort, watching=watching)
        client, server, flow = yield self.connected(net, proxy, servers)
        data = pattern(300 * 1024)
        client.transport.write(data)
        client.transport.loseWriteConnection()
        yield withTimeout(client.lost, 10, "the echo to end")
        yield proxy.nextClosed()
        self.assertEqual(client.received, data)
        [line] = logs.matching("miniproxy.access")
        self.assertEqual((line["bytesFromClient"], line["bytesFromServer"]),
                         (len(data), len(data)))
        self.assertEqual(line["outcome"], "ok")
        self.assertEqual(flow._splice.spliced, 2 * len(data))
        self.assertIs(watching.watcherOf(flow).closedWith, Outcome.OK)

    @defer.inlineCallbacks
    def test_off(self) -> Any:
        """
        With C{splice = false} the flow relays in userspace: it has no
        splice relay and its transports keep their own methods.
        """
        net = Network(self)
        serverPort, servers = net.server(echo=True)
        proxy = yield self.startProxy(net, serverPort, splice=False)
        client = yield net.connect(proxy.port)
        server = yield servers.nextPeer()
        data = pattern(200 * 1024)
        client.transport.write(data)
        yield withTimeout(client.waitForBytes(len(data)), 10, "the echo")
        [flow] = proxy.openFlows()
        self.assertIsNone(flow._splice)
        self.assertNotIn("doRead", vars(flow._accepted.transport))
        self.assertEqual(client.received, data)
        self.assertEqual(server.received, data)

    @defer.inlineCallbacks
    def test_dataFunctionNotSpliced(self) -> Any:
        """
        A flow with a handler that wants data from the start relays in
        userspace, through the hook.
        """
        net = Network(self)
        serverPort, servers = net.server()
        watching = Watching(wantsData=True)
        proxy = yield self.startProxy(net, serverPort, watching=watching)
        client = yield net.connect(proxy.port)
        server = yield servers.nextPeer()
        client.transport.write(b"hello")
        yield withTimeout(server.waitForBytes(5), 10, "the bytes")
        [flow] = proxy.openFlows()
        self.assertIsNone(flow._splice)
        self.assertEqual(b"".join(watching.watcherOf(flow).fromClient), b"hello")

    @defer.inlineCallbacks
    def test_tlsNotSpliced(self) -> Any:
        """
        A flow whose outgoing leg is TLS is not spliced (its bytes must be
        encrypted), and still relays.
        """
        ca = CertificateAuthority()
        caFile = ca.writeCertificate(self.mktemp())
        net = Network(self)
        servers = PeerFactory(net)
        serverPort = listenTLS(net, servers, ca.issue("localhost"))
        proxy = yield net.startProxy(
            f"tls:host=localhost:port={serverPort}:trustRoots={caFile}"
        )
        client = yield net.connect(proxy.port)
        client.transport.write(b"over TLS")
        server = yield servers.nextPeer()
        yield withTimeout(server.waitForBytes(8), 10, "the bytes")
        [flow] = proxy.openFlows()
        self.assertIsNone(flow._splice)
        self.assertFalse(spliceable(flow._outgoing.transport))
        self.assertTrue(spliceable(flow._accepted.transport))


class EarlyBytesTests(SpliceTestCase):
    """
    Bytes that arrive before the flow can splice (held until the outgoing
    leg connects, or until the client is accepted) go first, and the rest
    follows on the splice path.
    """

    synTap = True

    @defer.inlineCallbacks
    def test_earlyBytes(self) -> Any:
        """
        The client writes 4 MB as soon as it is connected, the server 4 MB
        as soon as it is: each arrives exactly, and most of it was
        spliced.
        """
        net = Network(self)
        serverPort, servers = net.server(keep=False)
        proxy = yield self.startProxy(net, serverPort)
        up, down = os.urandom(4 * MiB), os.urandom(4 * MiB)
        servers.onConnect = lambda server: server.transport.write(down)
        client = yield net.connect(proxy.port, Peer(keep=False))
        client.transport.write(up)
        server = yield servers.nextPeer()
        yield withTimeout(server.waitForBytes(len(up)), 20, "the client's bytes")
        yield withTimeout(client.waitForBytes(len(down)), 20, "the server's bytes")
        [flow] = proxy.openFlows()
        self.assertEqual((server.size, server.digest.hexdigest()), (len(up), sha256(up)))
        self.assertEqual((client.size, client.digest.hexdigest()),
                         (len(down), sha256(down)))
        self.assertGreater(flow._splice.toServer.spliced, len(up) // 2)
        self.assertGreater(flow._splice.toClient.spliced, len(down) // 2)


class EarlyBytesAtAcceptTests(EarlyBytesTests):
    """
    L{EarlyBytesTests} with no SYN tap.
    """

    synTap = False


class HalfCloseTests(SpliceTestCase):
    """
    A FIN crosses the splice path after every byte before it, on its own:
    the other direction keeps flowing.
    """

    request = pattern(100 * 1024, 1)
    response = pattern(2 * MiB + 5, 2)

    @defer.inlineCallbacks
    def test_clientFirst(self) -> Any:
        """
        The client sends a request and a FIN; once the server sees it, it
        answers through the still open direction and closes.
        """
        net = Network(self)
        serverPort, servers = net.server()
        proxy = yield self.startProxy(net, serverPort)
        client, server, flow = yield self.connected(net, proxy, servers)
        client.transport.write(self.request)
        client.transport.loseWriteConnection()
        yield withTimeout(server.eof, 10, "the server's EOF")
        self.assertEqual(server.received, self.request)
        server.transport.write(self.response)
        server.transport.loseConnection()
        yield withTimeout(
            defer.gatherResults([client.lost, server.lost]), 20, "both ends to close"
        )
        yield proxy.nextClosed()
        self.assertEqual(client.received, self.response)
        self.assertTrue(client.eofBeforeLost and server.eofBeforeLost)
        self.assertFalse(client.wasReset(), client.reason)
        self.assertEqual(flow.outcome, Outcome.OK)
        self.assertLess(flow.times.clientHalfClosed, flow.times.serverHalfClosed)
        self.assertEqual(
            (flow._splice.toServer.spliced, flow._splice.toClient.spliced),
            (len(self.request), len(self.response)),
        )

    @defer.inlineCallbacks
    def test_serverFirst(self) -> Any:
        """
        The mirror case: the server's greeting and FIN reach the client,
        whose data still reaches the server, followed by a FIN.
        """
        net = Network(self)
        serverPort, servers = net.server()
        proxy = yield self.startProxy(net, serverPort)
        client, server, flow = yield self.connected(net, proxy, servers)
        server.transport.write(self.response)
        server.transport.loseWriteConnection()
        yield withTimeout(client.eof, 10, "the client's EOF")
        self.assertEqual(client.received, self.response)
        client.transport.write(self.request)
        client.transport.loseConnection()
        yield withTimeout(
            defer.gatherResults([client.lost, server.lost]), 20, "both ends to close"
        )
        yield proxy.nextClosed()
        self.assertEqual(server.received, self.request)
        self.assertTrue(server.eofBeforeLost)
        self.assertFalse(server.wasReset(), server.reason)
        self.assertEqual(flow.outcome, Outcome.OK)
        self.assertLess(flow.times.serverHalfClosed, flow.times.clientHalfClosed)
        self.assertEqual(
            (flow._splice.toServer.spliced, flow._splice.toClient.spliced),
            (len(self.request), len(self.response)),
        )

    @defer.inlineCallbacks
    def test_finAfterHeldBytes(self) -> Any:
        """
        A FIN that arrives while the pipe holds bytes the server does not
        read yet reaches the server after them, not before.
        """
        net = Network(self)
        serverPort, servers = net.server(pauseOnConnect=True, keep=False)
        proxy = yield self.startProxy(net, serverPort)
        client, server, flow = yield self.connected(net, proxy, servers)
        data = os.urandom(8 * MiB)
        client.transport.write(data)
        client.transport.loseWriteConnection()
        direction = flow._splice.toServer
        yield waitUntil(lambda: direction.held > 0 and not isReading(
            flow._accepted.transport), "the pipe to hold bytes")
        self.assertFalse(server.sawEOF)
        server.transport.resumeProducing()
        yield withTimeout(server.eof, 20, "the server's EOF")
        self.assertEqual((server.size, server.digest.hexdigest()),
                         (len(data), sha256(data)))
        server.transport.loseConnection()
        yield proxy.nextClosed()
        self.assertEqual(flow.outcome, Outcome.OK)
        self.assertEqual(direction.spliced, len(data))


class BackpressureTests(SpliceTestCase):
    """
    A reader that does not read makes the proxy stop reading the other
    side, holding at most C{max-buffer} in the pipe and nothing in
    userspace; once it reads again, every byte arrives.

    Every C{splice} into a pipe is watched: the pipe never holds more than
    the bound.
    """

    def setUp(self) -> None:
        self.mostHeld = 0
        #: The leg whose splices into a pipe while it is paused are counted
        #: in C{whilePaused}.
        self.pausedSource: Any = None
        self.whilePaused = 0
        real = spliceModule.splice

        def watched(source: int, destination: int, count: int, **kwargs: Any) -> int:
            size = real(source, destination, count, **kwargs)
            if stat.S_ISFIFO(os.fstat(destination).st_mode):
                self.mostHeld = max(self.mostHeld, fionread(destination))
                leg = self.pausedSource
                if (
                    leg is not None
                    and size
                    and source == leg.transport.fileno()
                    and not isReading(leg.transport)
                ):
                    self.whilePaused += size
            return size

        self.patch(spliceModule, "splice", watched)

    @defer.inlineCallbacks
    def assertBounded(self, flow: Any, direction: Any, source: Any, sink: Any,
                      sender: Peer) -> Any:
        yield waitUntil(
            lambda: bool(source._paused & PAUSED_SPLICE)
            and not isReading(source.transport)
            and buffered(sender.transport) > 0,
            "the proxy to stop reading the sender",
            timeout=20,
        )
        held = pipeHolds(direction)
        self.assertEqual(held, direction.held)
        self.assertGreater(held, 0)
        self.assertLessEqual(held, self.maxBuffer)
        self.assertGreaterEqual(
            fcntl.fcntl(direction._pipe[1], fcntl.F_GETPIPE_SZ), self.maxBuffer
        )
        self.assertEqual(buffered(source.transport), 0)
        self.assertEqual(buffered(sink.transport), 0)
        self.assertIn(sink.transport, sink.transport.reactor.getWriters())
        self.assertGreater(self.mostHeld, 0)
        self.assertLessEqual(self.mostHeld, self.maxBuffer)
        self.assertEqual(unsentBound(sink.transport), self.maxBuffer)

    @defer.inlineCallbacks
    def test_slowServer(self) -> Any:
        """
        The client writes 16 MB; the server does not read.
        """
        net = Network(self)
        serverPort, servers = net.server(pauseOnConnect=True, keep=False)
        proxy = yield self.startProxy(net, serverPort)
        client, server, flow = yield self.connected(net, proxy, servers)
        data = os.urandom(16 * MiB)
        client.transport.write(data)
        yield self.assertBounded(
            flow, flow._splice.toServer, flow._accepted, flow._outgoing, client
        )
        self.assertLess(flow.bytesFromClient, len(data))
        yield self.readAllAndClose(proxy, server, client, data)
        self.assertEqual(flow.outcome, Outcome.OK)
        self.assertEqual(flow._splice.toServer.spliced, len(data))

    @defer.inlineCallbacks
    def test_writabilitySplicesOn(self) -> Any:
        """
        Once the slow server reads again, its leg's writability drains the
        pipe and splices on from the client's socket while the client's
        leg stays paused (no reactor round and no C{epoll_ctl} to read it
        again first); every byte arrives, in order, within the bound.
        """
        net = Network(self)
        serverPort, servers = net.server(pauseOnConnect=True, keep=False)
        proxy = yield self.startProxy(net, serverPort)
        client, server, flow = yield self.connected(net, proxy, servers)
        data = pattern(16 * MiB, 5)
        client.transport.write(data)
        yield self.assertBounded(
            flow, flow._splice.toServer, flow._accepted, flow._outgoing, client
        )
        self.pausedSource = flow._accepted
        yield self.readAllAndClose(proxy, server, client, data)
        self.assertGreater(self.whilePaused, 0)
        self.assertLessEqual(self.mostHeld, self.maxBuffer)
        self.assertEqual(flow.bytesFromClient, len(data))
        self.assertEqual(flow._splice.toServer.spliced, len(data))

    @defer.inlineCallbacks
    def test_slowClient(self) -> Any:
        """
        The mirror case: the server writes 16 MB; the client does not read.
        """
        net = Network(self)
        serverPort, servers = net.server()
        proxy = yield self.startProxy(net, serverPort)
        client, server, flow = yield self.connected(
            net, proxy, servers, Peer(pauseOnConnect=True, keep=False)
        )
        data = os.urandom(16 * MiB)
        server.transport.write(data)
        yield self.assertBounded(
            flow, flow._splice.toClient, flow._outgoing, flow._accepted, server
        )
        yield self.readAllAndClose(proxy, client, server, data)
        self.assertEqual(flow._splice.toClient.spliced, len(data))


class OddBoundBackpressureTests(BackpressureTests):
    """
    L{BackpressureTests} with a bound that is not a whole number of pages:
    the kernel makes the pipe bigger, the splice lengths still hold it to
    the bound.
    """

    maxBuffer = 100_000


class ResetTests(SpliceTestCase):
    """
    A reset on one leg of a spliced flow resets the other.
    """

    @defer.inlineCallbacks
    def test_serverResets(self) -> Any:
        """
        The server resets after reading 1 MB of a longer stream: the
        client is reset and the flow is C{reset} by the server.
        """
        net = Network(self)
        resetting = ResettingFactory(net, after=MiB)
        proxy = yield self.startProxy(net, net.listen(resetting))
        client = yield net.connect(proxy.port)
        flow = yield splicingFlow(proxy)
        client.transport.write(os.urandom(8 * MiB))
        yield withTimeout(client.lost, 10, "the client's connection to close")
        yield proxy.nextClosed()
        self.assertTrue(client.wasReset(), client.reason)
        self.assertTrue(client.reason.check(ConnectionLost), client.reason)
        self.assertEqual(flow.outcome, Outcome.RESET)
        self.assertTrue(flow.reason.startswith("server:"), flow.reason)
        self.assertGreaterEqual(flow._splice.toServer.spliced, MiB)

    @defer.inlineCallbacks
    def test_clientResets(self) -> Any:
        """
        The client resets while the server is sending: the server is
        reset, and the flow is C{reset} by the client.
        """
        net = Network(self)
        serverPort, servers = net.server()
        proxy = yield self.startProxy(net, serverPort)
        client, server, flow = yield self.connected(net, proxy, servers)
        server.transport.write(os.urandom(4 * MiB))
        yield withTimeout(client.waitForBytes(MiB), 10, "the first MB")
        resetTransport(client.transport)
        yield withTimeout(server.lost, 10, "the server's connection to close")
        yield proxy.nextClosed()
        self.assertTrue(server.wasReset(), server.reason)
        self.assertEqual(flow.outcome, Outcome.RESET)
        self.assertTrue(flow.reason.startswith("client:"), flow.reason)
        self.assertGreaterEqual(flow._splice.toClient.spliced, MiB)
        self.assertIsNone(flow._splice.toClient._pipe)

    @defer.inlineCallbacks
    def test_abortWhileHolding(self) -> Any:
        """
        A function that aborts a spliced flow while its pipe holds bytes
        resets both legs and closes the pipe.
        """
        net = Network(self)
        serverPort, servers = net.server(pauseOnConnect=True, keep=False)
        proxy = yield self.startProxy(net, serverPort)
        client, server, flow = yield self.connected(net, proxy, servers)
        client.transport.write(os.urandom(8 * MiB))
        direction = flow._splice.toServer
        yield waitUntil(lambda: direction.held > 0, "the pipe to hold bytes")
        flow.abort("test")
        yield withTimeout(client.lost, 10, "the client's reset")
        # A transport that is not read notices no reset.
        server.transport.resumeProducing()
        yield withTimeout(server.lost, 10, "the server's reset")
        yield proxy.nextClosed()
        self.assertTrue(client.wasReset() and server.wasReset())
        self.assertEqual(flow.outcome, Outcome.ABORTED)
        self.assertIsNone(direction._pipe)


class IdleTimeoutTests(SpliceTestCase):
    """
    The idle timeout sees the splice path's bytes.
    """

    @defer.inlineCallbacks
    def test_idleTimeout(self) -> Any:
        """
        A spliced flow whose bytes keep flowing outlives the idle timeout;
        once silent for it, both legs are reset and the flow is
        C{idle-timeout}.
        """
        from twisted.internet import reactor, task

        idle = 0.3
        net = Network(self)
        serverPort, servers = net.server(echo=True)
        proxy = yield self.startProxy(net, serverPort, **{"idle-timeout": idle})
        client, server, flow = yield self.connected(net, proxy, servers)
        start = reactor.seconds()
        rounds = 6
        for i in range(1, rounds + 1):
            client.transport.write(b"p")
            yield withTimeout(client.waitForBytes(i), 5, "the echo")
            if i < rounds:
                # The traffic's pattern, not a wait for an event.
                yield task.deferLater(reactor, idle / 3, lambda: None)
        self.assertTrue(client.isConnected)
        self.assertGreater(reactor.seconds() - start, idle)
        self.assertEqual(proxy.closed, [])
        silentSince = reactor.seconds()
        yield withTimeout(
            defer.gatherResults([client.lost, server.lost]), 10, "the idle flow's reset"
        )
        yield proxy.nextClosed()
        self.assertTrue(client.wasReset() and server.wasReset())
        self.assertEqual(flow.outcome, Outcome.IDLE_TIMEOUT)
        self.assertGreaterEqual(flow.times.closed - silentSince, idle * 0.9)
        self.assertEqual(
            (flow._splice.toServer.spliced, flow._splice.toClient.spliced), (rounds, rounds)
        )


class FallbackTests(SpliceTestCase):
    """
    A function that asks for the bytes mid-stream sees every byte read from
    then on; the pipes' bytes are written on first, so the other side gets
    every byte once, in order.
    """

    @defer.inlineCallbacks
    def test_atRest(self) -> Any:
        """
        Asked for when the pipes are empty: the hook sees exactly what
        follows, both ways, and the flow leaves the splice path (its
        transports' methods are their own again).
        """
        net = Network(self)
        serverPort, servers = net.server()
        watching = Watching()
        proxy = yield self.startProxy(net, serverPort, watching=watching)
        client, server, flow = yield self.connected(net, proxy, servers)
        before, after = pattern(MiB, 3), pattern(MiB, 4)
        client.transport.write(before)
        server.transport.write(before)
        yield withTimeout(server.waitForBytes(len(before)), 10, "the first part")
        yield withTimeout(client.waitForBytes(len(before)), 10, "the first part")
        watcher = watching.watcherOf(flow)
        legs = (flow._accepted.transport, flow._outgoing.transport)
        self.assertEqual([unsentBound(t) for t in legs], [self.maxBuffer] * 2)
        suspendedBefore = stats.suspended
        watcher.watch()
        self.assertFalse(flow._splice.active)
        self.assertEqual(stats.suspended, suspendedBefore + 1)
        self.assertEqual([unsentBound(t) for t in legs], [0, 0])
        for transport in (flow._accepted.transport, flow._outgoing.transport):
            self.assertNotIn("doRead", vars(transport))
            self.assertNotIn("doWrite", vars(transport))
        self.assertIsNone(flow._splice.toServer._pipe)
        client.transport.write(after)
        server.transport.write(after)
        yield withTimeout(server.waitForBytes(2 * MiB), 10, "the second part")
        yield withTimeout(client.waitForBytes(2 * MiB), 10, "the second part")
        self.assertEqual(b"".join(watcher.fromClient), after)
        self.assertEqual(b"".join(watcher.fromServer), after)
        self.assertEqual(server.received, before + after)
        self.assertEqual(client.received, before + after)
        self.assertEqual(
            (flow._splice.toServer.spliced, flow._splice.toClient.spliced),
            (MiB, MiB),
        )

    @defer.inlineCallbacks
    def test_inFlight(self) -> Any:
        """
        Asked for while the pipe holds bytes the server has not taken: the
        pipe's bytes go on first, the hook sees every byte read after them
        (the stream's tail), and the server gets the whole stream once.
        """
        net = Network(self)
        serverPort, servers = net.server(pauseOnConnect=True)
        watching = Watching()
        proxy = yield self.startProxy(net, serverPort, watching=watching)
        client, server, flow = yield self.connected(net, proxy, servers)
        data = pattern(8 * MiB, 5)
        client.transport.write(data)
        client.transport.loseWriteConnection()
        direction = flow._splice.toServer
        yield waitUntil(lambda: direction.held > 0 and not isReading(
            flow._accepted.transport), "the pipe to hold bytes")
        taken = flow.bytesFromClient
        held = direction.held
        watcher = watching.watcherOf(flow)
        watcher.watch()
        self.assertEqual(direction.flushed, held)
        self.assertEqual(buffered(flow._outgoing.transport), held)
        server.transport.resumeProducing()
        yield withTimeout(server.eof, 20, "the server's EOF")
        seen = b"".join(watcher.fromClient)
        self.assertEqual(len(server.received), len(data))
        self.assertEqual(server.received, data)
        self.assertEqual(seen, data[taken:])
        self.assertEqual(direction.spliced + direction.flushed + len(seen), len(data))
        self.assertEqual(flow.bytesFromClient, len(data))

    @defer.inlineCallbacks
    def test_backToSplice(self) -> Any:
        """
        Once the function no longer wants the bytes, the flow splices
        again.
        """
        net = Network(self)
        serverPort, servers = net.server()
        watching = Watching()
        proxy = yield self.startProxy(net, serverPort, watching=watching)
        client, server, flow = yield self.connected(net, proxy, servers)
        watcher = watching.watcherOf(flow)
        parts = [pattern(256 * 1024, seed) for seed in range(3)]
        client.transport.write(parts[0])
        yield withTimeout(server.waitForBytes(len(parts[0])), 10, "part 1")
        watcher.watch()
        client.transport.write(parts[1])
        yield withTimeout(server.waitForBytes(2 * len(parts[0])), 10, "part 2")
        watcher.watch(False)
        self.assertTrue(flow._splice.active)
        client.transport.write(parts[2])
        yield withTimeout(server.waitForBytes(3 * len(parts[0])), 10, "part 3")
        self.assertEqual(server.received, b"".join(parts))
        self.assertEqual(b"".join(watcher.fromClient), parts[1])
        self.assertEqual(flow._splice.toServer.spliced, 2 * len(parts[0]))

    @defer.inlineCallbacks
    def test_spliceAfterBuffered(self) -> Any:
        """
        A flow that goes (back) to the splice path while its outgoing
        transport still holds bytes the server has not taken splices
        nothing ahead of them: it reads the client again once they are
        written, and what it reads then goes after them, spliced.
        """
        net = Network(self)
        serverPort, servers = net.server(pauseOnConnect=True)
        watching = Watching(wantsData=True)
        proxy = yield self.startProxy(net, serverPort, watching=watching)
        client = yield net.connect(proxy.port)
        server = yield servers.nextPeer()
        [flow] = proxy.openFlows()
        yield waitUntil(lambda: flow._outgoing is not None and flow._accepted is not None,
                        "both legs")
        # Never paused by its transport: the proxy reads whatever comes
        # while that transport holds bytes.
        flow._outgoing.transport.bufferSize = 1 << 30
        # Write until the outgoing transport holds bytes: the kernel's
        # buffers towards the paused server may take a few MiB first.
        first, second = b"", pattern(MiB, 10)
        for seed in range(9, 9 + 16):
            part = pattern(4 * MiB, seed)
            first += part
            client.transport.write(part)
            yield waitUntil(lambda: flow.bytesFromClient == len(first), "the first part")
            if buffered(flow._outgoing.transport):
                break
        held = buffered(flow._outgoing.transport)
        self.assertGreater(held, 0)
        watching.watcherOf(flow).watch(False)
        self.assertTrue(flow._splice.active)
        client.transport.write(second)
        accepted = flow._accepted
        yield waitUntil(lambda: bool(accepted._paused & PAUSED_SPLICE)
                        and not isReading(accepted.transport),
                        "the proxy to wait for the server's bytes to be written")
        self.assertEqual(flow.bytesFromClient, len(first))
        self.assertEqual(flow._splice.toServer.spliced, 0)
        server.transport.resumeProducing()
        yield withTimeout(server.waitForBytes(len(first) + len(second)), 20, "every byte")
        self.assertEqual(server.received, first + second)
        self.assertEqual(flow._splice.toServer.spliced, len(second))

    @defer.inlineCallbacks
    def test_functionWritesWhileHolding(self) -> Any:
        """
        Bytes a function writes to the server while the pipe holds bytes
        go after the pipe's.
        """
        net = Network(self)
        serverPort, servers = net.server(pauseOnConnect=True)
        watching = Watching()
        proxy = yield self.startProxy(net, serverPort, watching=watching)
        client, server, flow = yield self.connected(net, proxy, servers)
        data = pattern(8 * MiB, 6)
        client.transport.write(data)
        direction = flow._splice.toServer
        yield waitUntil(lambda: direction.held > 0 and not isReading(
            flow._accepted.transport), "the pipe to hold bytes")
        taken = flow.bytesFromClient
        flow.writeToServer(b"<injected>")
        self.assertEqual(direction.held, 0)
        server.transport.resumeProducing()
        total = len(data) + len(b"<injected>")
        yield withTimeout(server.waitForBytes(total), 20, "every byte")
        self.assertEqual(server.received, data[:taken] + b"<injected>" + data[taken:])


class UnsupportedTests(SpliceTestCase):
    """
    If the kernel refuses to splice, the process relays in userspace, with
    one log line.
    """

    def setUp(self) -> None:
        def refuse(*args: Any, **kwargs: Any) -> int:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

        self.patch(spliceModule, "splice", refuse)

        def restore() -> None:
            stats.available = True
            stats.unsupported = None

        self.addCleanup(restore)

    @defer.inlineCallbacks
    def test_fallBack(self) -> Any:
        """
        The first flow finds out at its first read: it goes on in
        userspace with no byte lost; the next flow does not try; one line
        is logged.
        """
        logs = LogCapture(self)
        net = Network(self)
        serverPort, servers = net.server(echo=True)
        proxy = yield self.startProxy(net, serverPort)
        client, server, flow = yield self.connected(net, proxy, servers)
        data = pattern(MiB, 7)
        client.transport.write(data)
        yield withTimeout(client.waitForBytes(len(data)), 10, "the echo")
        self.assertEqual(client.received, data)
        self.assertFalse(stats.available)
        self.assertIn("Invalid argument", stats.unsupported)
        self.assertFalse(flow._splice.active)
        self.assertEqual(flow._splice.spliced, 0)

        second = yield net.connect(proxy.port)
        second.transport.write(data)
        yield withTimeout(second.waitForBytes(len(data)), 10, "the second echo")
        self.assertEqual(second.received, data)
        [flow2] = [f for f in proxy.openFlows() if f is not flow]
        self.assertIsNone(flow2._splice)
        self.assertEqual(len(logs.matching("miniproxy.splice")), 1)


class NoPipeTests(SpliceTestCase):
    """
    A flow that cannot have a pipe (out of descriptors) relays in
    userspace.
    """

    @defer.inlineCallbacks
    def test_noPipe(self) -> Any:
        """
        C{pipe2} fails with C{EMFILE} at the first byte: the flow leaves the
        splice path and relays every byte in userspace; splicing stays on
        for the process.
        """
        net = Network(self)
        serverPort, servers = net.server(echo=True)
        proxy = yield self.startProxy(net, serverPort)
        client, server, flow = yield self.connected(net, proxy, servers)

        def noPipe(flags: int) -> tuple[int, int]:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        self.patch(os, "pipe2", noPipe)
        data = pattern(MiB, 11)
        client.transport.write(data)
        yield withTimeout(client.waitForBytes(len(data)), 10, "the echo")
        self.assertEqual(client.received, data)
        self.assertEqual(server.received, data)
        self.assertFalse(flow._splice.active)
        self.assertEqual(flow._splice.spliced, 0)
        self.assertTrue(stats.available)


class FileDescriptorTests(SpliceTestCase):
    """
    Spliced flows leave no descriptor behind, however they end.
    """

    @defer.inlineCallbacks
    def test_noLeak(self) -> Any:
        """
        After 120 flows that end cleanly, are reset by the client, are
        aborted while their pipe holds bytes, or fall back to userspace
        mid-stream, the process has the descriptors it had before.
        """
        net = Network(self)
        serverPort, servers = net.server(echo=True, keep=False)
        watching = Watching()
        proxy = yield self.startProxy(net, serverPort, watching=watching)
        relays = stats.relays
        payload = pattern(200 * 1024, 8)

        @defer.inlineCallbacks
        def oneFlow(kind: str) -> Any:
            client = yield net.connect(proxy.port, Peer(keep=False))
            server = yield servers.nextPeer()
            [flow] = [f for f in proxy.openFlows() if f._accepted is not None
                      and f._accepted.transport.getPeer().port
                      == client.transport.getHost().port]
            yield waitUntil(lambda: flow._splice is not None and flow._splice.active,
                            "the flow to splice")
            client.transport.write(payload)
            if kind == "clean":
                client.transport.loseWriteConnection()
            elif kind == "reset":
                yield client.waitForBytes(1)
                resetTransport(client.transport)
            elif kind == "abort":
                yield client.waitForBytes(1)
                flow.abort("test")
            elif kind == "fallback":
                yield client.waitForBytes(1)
                watching.watcherOf(flow).watch()
                client.transport.loseWriteConnection()
            yield client.ended
            client.transport.loseConnection()
            yield client.lost
            yield server.lost
            if kind in ("clean", "fallback"):
                self.assertEqual(client.size, len(payload))

        kinds = ["clean", "reset", "abort", "fallback"]
        yield defer.gatherResults([oneFlow(kind) for kind in kinds])
        yield waitUntil(lambda: not proxy.openFlows(), "the warm-up flows to close")
        before = openFiles()
        total, batch = 120, 20
        for start in range(0, total, batch):
            yield withTimeout(
                defer.gatherResults(
                    [oneFlow(kinds[i % len(kinds)]) for i in range(start, start + batch)]
                ),
                20,
                "a batch of flows",
            )
        yield waitUntil(lambda: not proxy.openFlows(), "every flow to close")
        after = openFiles()
        self.assertEqual(stats.relays, relays + len(kinds) + total)
        leaked = {fd: what for fd, what in after.items() if before.get(fd) != what}
        self.assertEqual(leaked, {}, f"{len(after) - len(before)} descriptors leaked")


class LazyTests(SpliceTestCase):
    """
    A direction relays in userspace until it has carried C{splice-after}
    bytes, and only then switches to the splice path: idle and short flows
    never make a relay, a direction or a pipe, and a long one switches
    without losing or reordering a byte.
    """

    spliceAfter = DEFAULT_SPLICE_AFTER

    def setUp(self) -> None:
        self.pipesOpened = 0
        real = _Direction._openPipe

        def counted(direction: _Direction) -> tuple[int, int]:
            self.pipesOpened += 1
            return real(direction)

        self.patch(_Direction, "_openPipe", counted)

    @defer.inlineCallbacks
    def exchange(self, up: int, down: int) -> Any:
        """
        A client sends C{up} bytes, the server answers C{down} bytes; the
        flow is still open when this fires.

        @return: The proxy, the client, the server, the flow and the
            pipes the process had before.
        """
        net = Network(self)
        serverPort, servers = net.server()
        proxy = yield self.startProxy(net, serverPort)
        client = yield net.connect(proxy.port)
        server = yield servers.nextPeer()
        flow = yield pairedFlow(proxy)
        before = pipes()
        request, response = pattern(up, 1), pattern(down, 2)
        client.transport.write(request)
        yield withTimeout(server.waitForBytes(up), 10, "the request")
        server.transport.write(response)
        yield withTimeout(client.waitForBytes(down), 10, "the response")
        self.assertEqual((server.received, client.received), (request, response))
        return proxy, client, server, flow, before

    def assertNoSplice(self, flow: Any, before: int) -> None:
        """
        C{flow} has no splice relay, no direction and no pipe, and its
        transports have their own methods.
        """
        self.assertIsNone(flow._splice)
        self.assertEqual(directionsOf(flow), [])
        self.assertEqual(self.pipesOpened, 0)
        self.assertEqual(pipes(), before)
        self.assertTrue(ownMethods(flow._accepted.transport))
        self.assertTrue(ownMethods(flow._outgoing.transport))

    @defer.inlineCallbacks
    def test_shortAndIdleFlows(self) -> Any:
        """
        A flow with no byte, an idle flow (a byte each way), a short flow
        (a 100 B request, a 1 KiB reply), and one a byte short of the
        threshold each way open no pipe and make no splice object, while
        open and once closed.
        """
        for up, down in ((0, 0), (1, 1), (100, 1024),
                         (self.spliceAfter - 1, self.spliceAfter - 1)):
            relays = stats.relays
            proxy, client, server, flow, before = yield self.exchange(up, down)
            self.assertNoSplice(flow, before)
            client.transport.loseConnection()
            yield withTimeout(server.eof, 10, "the server's EOF")
            server.transport.loseConnection()
            yield withTimeout(
                defer.gatherResults([client.lost, server.lost]), 10, "both ends to close"
            )
            closed = yield proxy.nextClosed()
            self.assertIs(closed, flow)
            self.assertEqual(flow.outcome, Outcome.OK)
            self.assertEqual((flow.bytesFromClient, flow.bytesFromServer), (up, down))
            self.assertIsNone(flow._splice)
            self.assertEqual(stats.relays, relays)

    @defer.inlineCallbacks
    def test_oneDirection(self) -> Any:
        """
        A short request and a long response: only the response's direction
        switches to the splice path, after C{splice-after} bytes; the
        request's direction never has one, and its source keeps its own
        C{doRead}.
        """
        down = 2 * MiB + 3
        proxy, client, server, flow, before = yield self.exchange(100, down)
        relay = flow._splice
        self.assertIsNone(relay.toServer)
        self.assertEqual(directionsOf(flow), [relay.toClient])
        self.assertGreater(relay.toClient.spliced, 0)
        self.assertLessEqual(relay.toClient.spliced, down - self.spliceAfter)
        self.assertEqual(
            getattr(flow._accepted.transport.doRead, "__func__", None),
            type(flow._accepted.transport).doRead,
        )
        self.assertTrue(relay.active)

    @defer.inlineCallbacks
    def test_largeTransfer(self) -> Any:
        """
        Several MB each way, written at once: both directions switch, most
        of their bytes are spliced, every byte arrives once and in order,
        each FIN after its bytes, and the pipes are closed at the end.
        """
        net = Network(self)
        serverPort, servers = net.server(keep=False)
        proxy = yield self.startProxy(net, serverPort)
        relays = stats.relays
        client = yield net.connect(proxy.port, Peer(keep=False))
        server = yield servers.nextPeer()
        flow = yield pairedFlow(proxy)
        before = pipes()
        up, down = pattern(4 * MiB + 11, 3), pattern(6 * MiB + 5, 4)
        closed = yield self.bothWaysAtOnce(proxy, client, server, up, down)
        self.assertIs(closed, flow)
        relay = flow._splice
        for direction, stream in ((relay.toServer, up), (relay.toClient, down)):
            self.assertGreater(direction.spliced, len(stream) // 2)
            self.assertLessEqual(direction.spliced, len(stream) - self.spliceAfter)
            self.assertIsNone(direction._pipe)
        self.assertEqual(stats.relays, relays + 1)
        self.assertEqual(self.pipesOpened, 2)
        self.assertEqual(pipes(), before)

    @defer.inlineCallbacks
    def test_slowReaderAcrossTheSwitch(self) -> Any:
        """
        The server writes 16 MB to a client that does not read: the switch
        happens with bytes in the client leg's transport; the direction
        splices nothing until they are written, and what the proxy holds
        (in that transport and in the pipe) stays within C{max-buffer}.
        Once the client reads, every byte arrives.
        """
        net = Network(self)
        serverPort, servers = net.server()
        proxy = yield self.startProxy(net, serverPort)
        client = yield net.connect(proxy.port, Peer(pauseOnConnect=True, keep=False))
        server = yield servers.nextPeer()
        flow = yield pairedFlow(proxy)
        data = os.urandom(16 * MiB)
        server.transport.write(data)
        source, sink = flow._outgoing, flow._accepted
        yield waitUntil(
            lambda: flow._splice is not None
            and flow._splice.toClient is not None
            and not isReading(source.transport)
            and buffered(server.transport) > 0,
            "the proxy to stop reading the server",
            timeout=20,
        )
        direction = flow._splice.toClient
        held = buffered(sink.transport) + (pipeHolds(direction) if direction._pipe else 0)
        self.assertGreater(held, 0)
        self.assertLessEqual(held, self.maxBuffer)
        yield self.readAllAndClose(proxy, client, server, data)
        self.assertGreater(direction.spliced, 0)

    @defer.inlineCallbacks
    def test_dataFunction(self) -> Any:
        """
        A flow whose function wants the bytes never splices, however many
        it carries; once the function no longer wants them, its directions
        past the threshold switch.
        """
        net = Network(self)
        serverPort, servers = net.server(echo=True)
        watching = Watching(wantsData=True)
        proxy = yield self.startProxy(net, serverPort, watching=watching)
        client = yield net.connect(proxy.port)
        yield servers.nextPeer()
        flow = yield pairedFlow(proxy)
        first, second = pattern(MiB, 5), pattern(MiB, 6)
        client.transport.write(first)
        yield withTimeout(client.waitForBytes(len(first)), 10, "the first echo")
        self.assertIsNone(flow._splice)
        watcher = watching.watcherOf(flow)
        self.assertEqual(b"".join(watcher.fromClient), first)
        watcher.watch(False)
        self.assertTrue(flow._splice.active)
        self.assertIsNotNone(flow._splice.toServer)
        self.assertIsNotNone(flow._splice.toClient)
        client.transport.write(second)
        yield withTimeout(client.waitForBytes(2 * MiB), 10, "the second echo")
        self.assertEqual(client.received, first + second)
        self.assertEqual(b"".join(watcher.fromClient), first)


class PumpTests(SpliceTestCase):
    """
    One event splices chunks in and out until the source has nothing more
    (not just until a short chunk), but at most C{ROUNDS} of them, then
    lets the reactor serve the others; the bytes are counted once per
    event.  The kernel is replaced by a fake that says how much it moved.
    """

    @defer.inlineCallbacks
    def pumping(self, chunks: list[int | None]) -> Any:
        """
        A spliced flow's client-to-server direction (its pipe made), and a
        way to run its C{_pump} once with a fake C{splice}: splices into
        the pipe return C{chunks} in turn (L{None}: C{EAGAIN}), splices out
        of it move what it holds.

        @return: The direction, a function that runs its C{_pump} with the
            fake and returns the outcome, and the list of the calls the fake
            got (the length asked for, and whether it was into the pipe).
        """
        net = Network(self)
        serverPort, servers = net.server()
        proxy = yield self.startProxy(net, serverPort)
        client, server, flow = yield self.connected(net, proxy, servers)
        client.transport.write(b"x")
        yield withTimeout(server.waitForBytes(1), 10, "a first byte")
        direction = flow._splice.toServer
        calls: list[tuple[int, bool]] = []
        left = list(chunks)

        def fake(source: int, destination: int, count: int, **kwargs: Any) -> int:
            into = destination == direction._pipe[1]
            calls.append((count, into))
            if not into:
                return count
            size = left.pop(0)
            if size is None:
                raise BlockingIOError(errno.EAGAIN, "would block")
            return size

        def pump() -> object:
            real = spliceModule.splice
            spliceModule.splice = fake
            try:
                return direction._pump()
            finally:
                spliceModule.splice = real

        return direction, pump, calls

    @defer.inlineCallbacks
    def test_untilEmpty(self) -> Any:
        """
        Short chunks do not end the event: splicing goes on until the
        source says C{EAGAIN}, and the flow counts every byte once.
        """
        direction, pump, calls = yield self.pumping([100, 7, 3000, None])
        flow = direction.relay.flow
        counted, spliced = flow.bytesFromClient, direction.spliced
        self.assertIs(pump(), spliceModule._EMPTY)
        self.assertEqual(
            calls,
            [(self.maxBuffer, True), (100, False), (self.maxBuffer, True), (7, False),
             (self.maxBuffer, True), (3000, False), (self.maxBuffer, True)],
        )
        self.assertEqual(flow.bytesFromClient - counted, 3107)
        self.assertEqual(direction.spliced - spliced, 3107)
        self.assertEqual(direction.held, 0)

    @defer.inlineCallbacks
    def test_fairness(self) -> Any:
        """
        A source that always has more gets C{ROUNDS} chunks per event.
        """
        rounds = spliceModule.ROUNDS
        direction, pump, calls = yield self.pumping([self.maxBuffer] * (rounds + 1))
        self.assertIs(pump(), spliceModule._BUDGET)
        self.assertEqual(
            calls, [(self.maxBuffer, True), (self.maxBuffer, False)] * rounds
        )

    @defer.inlineCallbacks
    def test_endOfFile(self) -> Any:
        """
        The source's end of file ends the event, after what came before it
        went out.
        """
        direction, pump, calls = yield self.pumping([50, 0])
        self.assertIs(pump(), spliceModule._END)
        self.assertEqual(
            calls, [(self.maxBuffer, True), (50, False), (self.maxBuffer, True)]
        )


class SettingTests(unittest.TestCase):
    """
    The C{[limits] splice} and C{splice-after} settings.
    """

    def test_default(self) -> None:
        """
        Splicing is on by default, and C{splice = false} turns it off.
        """
        self.assertTrue(buildConfig({}).limits.splice)
        self.assertFalse(buildConfig({"limits": {"splice": False}}).limits.splice)
        self.assertFalse(buildConfig({}, limits={"splice": "false"}).limits.splice)

    def test_bad(self) -> None:
        """
        A value that is not a boolean is refused, naming the key.
        """
        e = self.assertRaises(ConfigError, buildConfig, {"limits": {"splice": 1}})
        self.assertEqual(str(e), "limits.splice: must be true or false, not 1")

    def test_spliceAfter(self) -> None:
        """
        C{splice-after} is 64 KiB by default, a whole number of bytes, 0
        or more.
        """
        self.assertEqual(Limits().spliceAfter, 64 * 1024)
        self.assertEqual(buildConfig({}).limits.spliceAfter, DEFAULT_SPLICE_AFTER)
        self.assertEqual(
            buildConfig({"limits": {"splice-after": 0}}).limits.spliceAfter, 0
        )
        self.assertEqual(
            buildConfig({}, limits={"splice-after": "1048576"}).limits.spliceAfter,
            MiB,
        )
        e = self.assertRaises(
            ConfigError, buildConfig, {"limits": {"splice-after": -1}}
        )
        self.assertEqual(str(e), "limits.splice-after: must not be negative, not -1")


class MemoryTransportTests(unittest.TestCase):
    """
    Flows on the in-memory transports of L{miniproxy.testing}.
    """

    def test_wantsDataChanged(self) -> None:
        """
        On the in-memory transports (no splice path), a handler that starts
        wanting data mid-flow sees the bytes from then on, and none once
        it stops.
        """
        from miniproxy.testing import FlowHarness

        watching = Watching()
        harness = FlowHarness([watching.factory])
        driver = harness.accept()
        driver.connectOutgoing()
        driver.clientSends(b"before ")
        watcher = watching.watcherOf(driver.flow)
        watcher.watch()
        driver.clientSends(b"during ")
        driver.serverSends(b"answer")
        watcher.watch(False)
        driver.clientSends(b"after")
        self.assertEqual(driver.sentToServer(), b"before during after")
        self.assertEqual(driver.sentToClient(), b"answer")
        self.assertEqual((watcher.fromClient, watcher.fromServer),
                         ([b"during "], [b"answer"]))

    def test_notForMemoryTransports(self) -> None:
        """
        The in-memory transports of L{miniproxy.testing} are never
        spliced.
        """
        from miniproxy.testing import FlowHarness

        harness = FlowHarness()
        driver = harness.accept()
        driver.connectOutgoing()
        driver.clientSends(b"x")
        self.assertEqual(driver.sentToServer(), b"x")
        self.assertFalse(SpliceRelay.possible(driver.flow._accepted, driver.flow._outgoing))
        self.assertIsNone(driver.flow._splice)


# -- the property test ---------------------------------------------------------

#: One side's stream: chunk sizes up to past the largest pipe.
chunkSizes = st.lists(st.integers(1, 150_000), max_size=6)

#: The buffer bounds and thresholds of the scenarios' proxies.
MAX_BUFFERS = (4096, 16384, 65536)
SPLICE_AFTERS = (0, 5000, 100_000)


@st.composite
def scenarios(draw: Any) -> dict[str, Any]:
    """
    A scenario: each side's chunks and FIN, merged in a drawn order, the
    buffer bound, and maybe the moment a function asks for the bytes.
    """
    up = draw(chunkSizes)
    down = draw(chunkSizes)
    upSteps = [("up", n) for n in up] + [("upFin", 0)]
    downSteps = [("down", n) for n in down] + [("downFin", 0)]
    steps = []
    while upSteps or downSteps:
        if upSteps and (not downSteps or draw(st.booleans())):
            steps.append(upSteps.pop(0))
        else:
            steps.append(downSteps.pop(0))
    watchAt = draw(st.one_of(st.none(), st.integers(0, len(steps))))
    if watchAt is not None:
        steps.insert(watchAt, ("watch", 0))
    return {
        "steps": steps,
        "maxBuffer": draw(st.sampled_from(MAX_BUFFERS)),
        "spliceAfter": draw(st.sampled_from(SPLICE_AFTERS)),
        "seed": draw(st.integers(0, 250)),
    }


class _Side:
    """
    One end of a scenario's connection, driven by blocking calls in a
    worker thread: what it sent, what it read, whether it saw the EOF.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.sent = bytearray()
        self.received = bytearray()
        self.eof = False

    def close(self) -> None:
        self.sock.close()


def _pump(sides: list[_Side], sender: _Side | None, data: bytes, deadline: float) -> None:
    """
    Send C{data} on C{sender} while reading whatever the sides have, until
    it is all sent; with no sender, read until every side saw its EOF.
    """
    import time

    view = memoryview(data)
    while view if sender is not None else not all(side.eof for side in sides):
        if time.monotonic() > deadline:
            raise AssertionError("the scenario timed out")
        with selectors.DefaultSelector() as selector:
            for side in sides:
                events = 0 if side.eof else selectors.EVENT_READ
                if side is sender:
                    events |= selectors.EVENT_WRITE
                if events:
                    selector.register(side.sock, events, side)
            ready = selector.select(timeout=1.0)
        for key, mask in ready:
            side = key.data
            if mask & selectors.EVENT_READ:
                chunk = side.sock.recv(1 << 20)
                if chunk:
                    side.received += chunk
                else:
                    side.eof = True
            if mask & selectors.EVENT_WRITE and view:
                try:
                    n = side.sock.send(view)
                except BlockingIOError:
                    n = 0
                side.sent += view[:n]
                view = view[n:]


class PropertyTests(unittest.TestCase):
    """
    Whatever the chunking, the interleaving of the two directions, the
    moment of each FIN, the buffer bound, the C{splice-after} threshold and
    the moment a function asks for the bytes, every byte arrives once and
    in order, and the hook sees exactly the bytes read after that moment.
    With no threshold, every byte read before it was spliced; with one, a
    direction that carried fewer bytes never had a splice direction, and
    one that carried more spliced none of its first C{splice-after}.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_scenarios(self) -> Any:
        from twisted.internet import reactor

        net = Network(self)
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(10)
        serverPort = listener.getsockname()[1]
        proxies = {}
        watchings = {}
        for maxBuffer in MAX_BUFFERS:
            for after in SPLICE_AFTERS:
                key = (maxBuffer, after)
                watchings[key] = Watching()
                proxies[key] = yield net.startProxy(
                    f"tcp:host=127.0.0.1:port={serverPort}",
                    limits={"max-buffer": maxBuffer, "splice-after": after},
                    functions=(("watch", watchings[key].factory),),
                )
        examples = []

        @settings(max_examples=30, deadline=None, database=None)
        @given(scenarios())
        def run(scenario: dict[str, Any]) -> None:
            examples.append(scenario)
            key = (scenario["maxBuffer"], scenario["spliceAfter"])
            self.runScenario(reactor, listener, proxies[key], watchings[key], scenario)

        yield threads.deferToThread(run)
        self.assertEqual(len(examples), 30)

    def runScenario(self, reactor: Any, listener: socket.socket, proxy: Any,
                    watching: Watching, scenario: dict[str, Any]) -> None:
        """
        Run one scenario, in a worker thread: blocking sockets here, the
        proxy on the reactor.
        """
        import time

        from twisted.internet.threads import blockingCallFromThread

        deadline = time.monotonic() + 20
        clientSock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        client = _Side(clientSock)
        try:
            serverSock, _ = listener.accept()
        except BaseException:
            client.close()
            raise
        server = _Side(serverSock)
        try:
            after = scenario["spliceAfter"]
            flow = blockingCallFromThread(
                reactor, splicingFlow if after == 0 else pairedFlow, proxy
            )
            watcher = watching.watcherOf(flow)
            taken = None
            seed = scenario["seed"]
            upStream = pattern(sum(n for kind, n in scenario["steps"] if kind == "up"), seed)
            downStream = pattern(
                sum(n for kind, n in scenario["steps"] if kind == "down"), seed + 1
            )
            offsets = {"up": 0, "down": 0}
            for kind, size in scenario["steps"]:
                if kind == "up" or kind == "down":
                    stream = upStream if kind == "up" else downStream
                    sender = client if kind == "up" else server
                    start = offsets[kind]
                    offsets[kind] += size
                    _pump([client, server], sender, stream[start : start + size], deadline)
                elif kind == "upFin":
                    client.sock.shutdown(socket.SHUT_WR)
                elif kind == "downFin":
                    server.sock.shutdown(socket.SHUT_WR)
                else:
                    taken = blockingCallFromThread(reactor, self.watch, flow, watcher)
            _pump([client, server], None, b"", deadline)
            client.close()
            server.close()
            blockingCallFromThread(
                reactor, waitUntil, lambda: flow.outcome is not None, "the flow to close"
            )
        finally:
            client.close()
            server.close()
        self.assertEqual(bytes(server.received), upStream)
        self.assertEqual(bytes(client.received), downStream)
        self.assertEqual(flow.outcome, Outcome.OK)
        self.assertEqual((flow.bytesFromClient, flow.bytesFromServer),
                         (len(upStream), len(downStream)))
        relay = flow._splice
        for name, stream, seen, index in (
            ("toServer", upStream, watcher.fromClient, 0),
            ("toClient", downStream, watcher.fromServer, 1),
        ):
            direction = getattr(relay, name, None)
            seenBytes = b"".join(seen)
            if taken is None:
                self.assertEqual(seenBytes, b"")
            else:
                self.assertEqual(seenBytes, stream[taken[index]:])
            if after == 0:
                # Spliced from the first byte until the function asked.
                self.assertEqual(direction.spliced + direction.flushed,
                                 len(stream) if taken is None else taken[index])
            elif len(stream) < after:
                self.assertIsNone(direction)
            elif taken is None:
                self.assertIsNotNone(direction)
            if direction is not None and after:
                self.assertLessEqual(direction.spliced + direction.flushed,
                                     len(stream) - after)

    @staticmethod
    def watch(flow: Any, watcher: Watcher) -> tuple[int, int]:
        """
        Ask for the flow's bytes (on the reactor thread).

        @return: How many bytes the flow had read each way before.
        """
        taken = (flow.bytesFromClient, flow.bytesFromServer)
        watcher.watch()
        return taken
