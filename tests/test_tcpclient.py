"""
Tests for L{miniproxy.tcpclient}.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from miniproxy.syntap import SynTap
from miniproxy.tcpclient import (
    SO_MARK,
    TunedTCPClientEndpoint,
    enableFastOpenListener,
    fastOpenConnect,
    mark,
    usesFastOpen,
)
from tests.test_syntap import Recorder

FASTOPEN_SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"
TFO_OPTION = 34


class Sender(Protocol):
    """
    Writes its message as soon as it is connected, then closes.
    """

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.made: defer.Deferred[Sender] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.message)
        self.made.callback(self)

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class Collector(Protocol):
    def __init__(self, done: list[defer.Deferred[bytes]]) -> None:
        self.done = done
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.data.endswith(b"."):
            # The whole message: the server closes (a client closing at
            # once could do so before its Fast Open handshake is done).
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        self.done.pop(0).callback(self.data)


def timeouts(reactor: Any) -> list[Any]:
    """
    The pending connect timeouts among C{reactor}'s delayed calls.
    """
    return [
        call
        for call in reactor.getDelayedCalls()
        if getattr(call.func, "__name__", None) == "failIfNotConnected"
    ]


class TunedEndpointTests(unittest.TestCase):
    """
    The endpoint connects like Twisted's, with the options set first.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.received: list[defer.Deferred[bytes]] = []
        factory = Factory()
        factory.protocol = lambda: Collector(self.received)  # type: ignore[assignment]
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.number = self.port.getHost().port

    @defer.inlineCallbacks
    def send(self, message: bytes, options: tuple = ()):  # type: ignore[no-untyped-def]
        arrived: defer.Deferred[bytes] = defer.Deferred()
        self.received.append(arrived)
        sender = Sender(message)
        endpoint = TunedTCPClientEndpoint(self.reactor, "127.0.0.1", self.number, options, timeout=5)
        protocol = yield endpoint.connect(Factory.forProtocol(lambda: sender))
        self.assertIs(protocol, sender)
        data = yield arrived
        yield sender.lost
        return data

    @defer.inlineCallbacks
    def test_plain(self):  # type: ignore[no-untyped-def]
        data = yield self.send(b"hello.")
        self.assertEqual(data, b"hello.")

    @defer.inlineCallbacks
    def test_mark(self):  # type: ignore[no-untyped-def]
        if os.geteuid() != 0:
            raise unittest.SkipTest("SO_MARK needs CAP_NET_ADMIN (run as root)")
        data = yield self.send(b"marked.", (mark(0x4D50),))
        self.assertEqual(data, b"marked.")
        self.assertEqual(mark(7), (socket.SOL_SOCKET, SO_MARK, 7))

    @defer.inlineCallbacks
    def test_refused(self):  # type: ignore[no-untyped-def]
        from twisted.internet.error import ConnectionRefusedError

        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        probe.close()
        endpoint = TunedTCPClientEndpoint(self.reactor, "127.0.0.1", free)
        with self.assertRaises(ConnectionRefusedError):
            yield endpoint.connect(Factory.forProtocol(lambda: Sender(b"x")))

    def test_synLeavesAtOnce(self) -> None:
        """
        The SYN leaves from C{connect} itself, not in the next reactor
        iteration (an early leg's SYN follows the client's at once), while
        the protocol is still only connected in a later iteration.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        sender = Sender(b"x")
        endpoint = TunedTCPClientEndpoint(
            self.reactor, "127.0.0.1", listener.getsockname()[1], timeout=5
        )
        d = endpoint.connect(Factory.forProtocol(lambda: sender))
        # Loopback completes the handshake within connect(): the
        # connection is queued for accept before the reactor runs again.
        accepted, _ = listener.accept()
        self.addCleanup(accepted.close)
        self.assertFalse(sender.made.called)
        self.assertFalse(d.called)
        return d.addCallback(self.assertIs, sender)

    @defer.inlineCallbacks
    def test_connectedWithoutWaiting(self):  # type: ignore[no-untyped-def]
        """
        On loopback the handshake is over by the next iteration: the leg is
        connected then, with no Deferred of Twisted's in between and no
        wait to be writable; once connected, its transport is registered
        for reading only.
        """
        from twisted.internet import tcp

        resolved = []
        self.patch(tcp.Client, "resolveAddress", lambda client: resolved.append(client))
        arrived: defer.Deferred[bytes] = defer.Deferred()
        self.received.append(arrived)
        # Writes nothing when connected (a write would wait to be writable).
        sender = Sender(b"")
        endpoint = TunedTCPClientEndpoint(self.reactor, "127.0.0.1", self.number, timeout=5)
        d = endpoint.connect(Factory.forProtocol(lambda: sender))
        # No timeout is set for a handshake that may be over by the next
        # iteration.
        self.assertEqual(timeouts(self.reactor), [])
        protocol = yield d
        self.assertEqual(timeouts(self.reactor), [])
        self.assertIs(protocol, sender)
        self.assertEqual(resolved, [])
        transport = sender.transport
        self.assertEqual(transport.realAddress, ("127.0.0.1", self.number))
        self.assertIn(transport, self.reactor.getReaders())
        self.assertNotIn(transport, self.reactor.getWriters())
        transport.write(b"x.")
        data = yield arrived
        self.assertEqual(data, b"x.")

    @defer.inlineCallbacks
    def test_waitsForHandshake(self):  # type: ignore[no-untyped-def]
        """
        A handshake not over by the next iteration (a SYN the server
        dropped) is waited for by the reactor: the transport waits to be
        readable or writable, and once connected stops waiting to be
        writable, still reading.
        """
        from tests.support import waitUntil

        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        # A full accept queue: the next SYN is dropped, and sent again a
        # second later.
        listener.listen(0)
        queued = socket.create_connection(listener.getsockname())
        self.addCleanup(queued.close)
        sender = Sender(b"")
        made: list[Any] = []
        sender.made.addCallback(made.append)
        transports = []
        endpoint = TunedTCPClientEndpoint(
            self.reactor, "127.0.0.1", listener.getsockname()[1], timeout=10,
            onSocket=transports.append,
        )
        started = self.reactor.seconds()
        d = endpoint.connect(Factory.forProtocol(lambda: sender))
        self.addCleanup(lambda: d.called or d.cancel())
        writers = self.reactor.getWriters
        yield waitUntil(
            lambda: any(getattr(w, "socket", None) is transports[0] for w in writers()),
            "the transport waiting for its handshake",
        )
        self.assertEqual(made, [])
        # The timeout counts from the connect.
        [timeout] = timeouts(self.reactor)
        self.assertLess(abs(timeout.getTime() - (started + 10)), 0.5)
        [transport] = [w for w in writers() if getattr(w, "socket", None) is transports[0]]
        self.assertIn(transport, self.reactor.getReaders())
        listener.accept()[0].close()
        protocol = yield d
        self.assertIs(protocol, sender)
        self.assertEqual(timeouts(self.reactor), [])
        self.assertIs(sender.transport, transport)
        self.assertIn(transport, self.reactor.getReaders())
        self.assertNotIn(transport, writers())
        sender.transport.abortConnection()
        yield sender.lost

    @defer.inlineCallbacks
    def test_ipv6(self):  # type: ignore[no-untyped-def]
        """
        An IPv6 next hop connects too, with its address as Twisted has it.
        """
        from twisted.internet import reactor

        received: list[defer.Deferred[bytes]] = [defer.Deferred()]
        factory = Factory()
        factory.protocol = lambda: Collector(received)  # type: ignore[assignment]
        try:
            port = reactor.listenTCP(0, factory, interface="::1")
        except Exception as e:
            raise unittest.SkipTest(f"no IPv6 loopback: {e}")
        self.addCleanup(port.stopListening)
        sender = Sender(b"six.")
        endpoint = TunedTCPClientEndpoint(reactor, "::1", port.getHost().port, timeout=5)
        yield endpoint.connect(Factory.forProtocol(lambda: sender))
        self.assertEqual(sender.transport.getPeer().host, "::1")
        data = yield received[0]
        self.assertEqual(data, b"six.")

    @defer.inlineCallbacks
    def test_addressParsedOnce(self):  # type: ignore[no-untyped-def]
        """
        The endpoint works out its address once: connecting asks Twisted's
        address checks nothing.
        """
        from twisted.internet import abstract

        asked = []
        for name in ("isIPAddress", "isIPv6Address"):
            self.patch(abstract, name, lambda *a, **k: asked.append(a))
        sender = Sender(b"once.")
        endpoint = TunedTCPClientEndpoint(self.reactor, "127.0.0.1", self.number, timeout=5)
        arrived: defer.Deferred[bytes] = defer.Deferred()
        self.received.append(arrived)
        yield endpoint.connect(Factory.forProtocol(lambda: sender))
        data = yield arrived
        self.assertEqual((data, asked), (b"once.", []))
        self.assertEqual(sender.transport.getPeer().port, self.number)

    @defer.inlineCallbacks
    def test_bindAddress(self):  # type: ignore[no-untyped-def]
        """
        With a bind address, the socket is bound before it connects.
        """
        sender = Sender(b"bound.")
        endpoint = TunedTCPClientEndpoint(
            self.reactor, "127.0.0.1", self.number, timeout=5, bindAddress=("127.0.0.2", 0)
        )
        arrived: defer.Deferred[bytes] = defer.Deferred()
        self.received.append(arrived)
        yield endpoint.connect(Factory.forProtocol(lambda: sender))
        self.assertEqual(sender.transport.getHost().host, "127.0.0.2")
        data = yield arrived
        self.assertEqual(data, b"bound.")

    @defer.inlineCallbacks
    def test_name(self):  # type: ignore[no-untyped-def]
        """
        A name is resolved by Twisted's own client, as before.
        """
        sender = Sender(b"named.")
        endpoint = TunedTCPClientEndpoint(self.reactor, "localhost", self.number, timeout=5)
        self.assertIsNone(endpoint._target)
        arrived: defer.Deferred[bytes] = defer.Deferred()
        self.received.append(arrived)
        try:
            yield endpoint.connect(Factory.forProtocol(lambda: sender))
        except OSError as e:
            raise unittest.SkipTest(f"localhost does not reach 127.0.0.1 here: {e}")
        data = yield arrived
        self.assertEqual(data, b"named.")

    def test_targets(self) -> None:
        """
        An IPv4 literal connects as itself; an IPv6 one with Twisted's
        4-tuple, and reports its scope; a name is left to Twisted.
        """
        from miniproxy.tcpclient import _targetFor, _TunedClient, _TunedClient6

        four = _targetFor("127.0.0.1", 80)
        assert four is not None
        self.assertEqual(
            (four.clientClass, four.addr, four.realAddress),
            (_TunedClient, ("127.0.0.1", 80), ("127.0.0.1", 80)),
        )
        six = _targetFor("::1", 80)
        assert six is not None
        self.assertEqual(
            (six.clientClass, six.addr, six.realAddress),
            (_TunedClient6, ("::1", 80, 0, 0), ("::1", 80, 0, 0)),
        )
        for name in ("localhost", "1.2.3", "example.com"):
            self.assertIsNone(_targetFor(name, 80), name)

    def test_fastOpenFromOptions(self) -> None:
        """
        Whether a transport of the endpoint uses Fast Open is read from the
        options its socket was made with, without asking the socket.
        """

        class Connector:
            _socketOptions = (fastOpenConnect(),)

        class Transport:
            connector = Connector()

            def getHandle(self) -> Any:
                raise AssertionError("the socket was asked")

        self.assertTrue(usesFastOpen(Transport()))
        Connector._socketOptions = ()
        self.assertFalse(usesFastOpen(Transport()))

    @defer.inlineCallbacks
    def test_immediateFailure(self):  # type: ignore[no-untyped-def]
        """
        A connect that fails at once (no route) fails the attempt in a
        later iteration, with the error, and closes its socket.
        """
        from twisted.internet.error import ConnectError

        sockets = []
        endpoint = TunedTCPClientEndpoint(
            self.reactor, "255.255.255.255", 80, onSocket=sockets.append
        )
        d = endpoint.connect(Factory.forProtocol(lambda: Sender(b"x")))
        self.assertFalse(d.called)
        with self.assertRaises(ConnectError) as caught:
            yield d
        self.assertIn("unreachable", str(caught.exception).lower())
        self.assertEqual(sockets[0].fileno(), -1)

    @defer.inlineCallbacks
    def test_refusedFastOpen(self):  # type: ignore[no-untyped-def]
        """
        With Fast Open the kernel reports the connection made before its
        SYN is even sent: a refusal shows as the connection lost.
        """
        from twisted.internet.error import ConnectionLost, ConnectionRefusedError

        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        probe.close()
        reasons = []

        class Watcher(Sender):
            def connectionLost(self, reason: object = None) -> None:
                reasons.append(reason)
                super().connectionLost(reason)

        watcher = Watcher(b"x")
        endpoint = TunedTCPClientEndpoint(self.reactor, "127.0.0.1", free, (fastOpenConnect(),))
        yield endpoint.connect(Factory.forProtocol(lambda: watcher))
        yield watcher.lost
        self.assertTrue(reasons[0].check(ConnectionRefusedError, ConnectionLost), reasons)

    @defer.inlineCallbacks
    def test_fastOpen(self):  # type: ignore[no-untyped-def]
        """
        With TCP Fast Open on both ends, once the client holds a cookie its
        first bytes ride in the SYN.
        """
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root: the SYN tap and the tcp_fastopen sysctl")
        with open(FASTOPEN_SYSCTL) as f:
            before = f.read().strip()
        self.addCleanup(_writeSysctl, before)
        _writeSysctl("3")
        self.assertTrue(enableFastOpenListener(self.port))
        recorder = Recorder()
        tap = SynTap(self.reactor, socket.AF_INET, [self.number], recorder)
        tap.start()
        self.addCleanup(tap.stop)
        first = yield self.send(b"first.", (fastOpenConnect(),))
        self.assertEqual(first, b"first.")
        second = yield self.send(b"second.", (fastOpenConnect(),))
        self.assertEqual(second, b"second.")
        syns = recorder.segments
        self.assertEqual(len(syns), 2)
        # The first SYN asks for a cookie, or already has one cached (by an
        # earlier run): either way it has the Fast Open option.
        self.assertIn(TFO_OPTION, [kind for kind, _ in syns[0].options])
        self.assertIn(syns[0].payload, (b"", b"first."))
        self.assertEqual(syns[1].payload, b"second.")

    def test_fastOpenListenerWithoutSocket(self) -> None:
        self.assertFalse(enableFastOpenListener(object()))


def _writeSysctl(value: str) -> None:
    with open(FASTOPEN_SYSCTL, "w") as f:
        f.write(value)
