"""
Tests for L{miniproxy.connect}: the endpoints a L{NextHop} turns into, and
how an outgoing TLS connection waits for a verified handshake.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, DNSMismatch
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest

from miniproxy.address import HostPort, NextHop
from miniproxy.connect import (
    Dialer,
    TLSHandshakeError,
    _loadTrustRoot,
    describeTLSFailure,
    tlsOptionsFor,
)
from tests.support import (
    TEST_TIMEOUT,
    CertificateAuthority,
    Network,
    Peer,
    PeerFactory,
    listenTLS,
    withTimeout,
)


class Recorder(Protocol):
    """
    A client protocol that records what it sees, and whether the TLS
    handshake was done when it was connected.
    """

    def __init__(self) -> None:
        self.made = False
        self.peerCertificateAtConnect: Any = None
        self.data = b""
        self.reason: Failure | None = None
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.made = True
        getCertificate = getattr(self.transport, "getPeerCertificate", lambda: None)
        self.peerCertificateAtConnect = getCertificate()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.lost.callback(None)


class RecorderFactory(Factory):
    noisy = False

    def __init__(self) -> None:
        self.protocols: list[Recorder] = []

    def buildProtocol(self, addr: Any) -> Recorder:
        protocol = Recorder()
        protocol.factory = self
        self.protocols.append(protocol)
        return protocol


class EndpointTests(unittest.TestCase):
    """
    L{Dialer.endpointFor} and L{Dialer.tcpEndpointFor} pick the endpoint
    for a next hop's kind of address.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.dialer = Dialer(self.reactor, 7.5)

    def test_ipv4Literal(self) -> None:
        """
        An IPv4 literal is connected with plain TCP over IPv4, with the
        dialer's timeout and the next hop's bind address.
        """
        hop = NextHop(HostPort("192.0.2.7", 8080), bindAddress="192.0.2.1")
        endpoint = self.dialer.endpointFor(hop)
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)
        endpoint.connect(Factory.forProtocol(Protocol))
        [(host, port, _, timeout, bind)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout, bind), ("192.0.2.7", 8080, 7.5, ("192.0.2.1", 0)))

    def test_ipv6Literal(self) -> None:
        """
        An IPv6 literal, bracketed or not, is connected over IPv6.
        """
        for host in ("2001:db8::5", "[2001:db8::5]"):
            endpoint = self.dialer.tcpEndpointFor(NextHop(HostPort(host, 443)))
            self.assertIsInstance(endpoint, TCP6ClientEndpoint)
            endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(
            [(c[0], c[1], c[3]) for c in self.reactor.tcpClients],
            [("2001:db8::5", 443, 7.5)] * 2,
        )

    def test_parsedIPv6(self) -> None:
        """
        A next hop parsed from C{--to} with a bracketed IPv6 literal gets
        an IPv6 endpoint.
        """
        hop = NextHop.fromString("tcp:host=[::1]:port=9000")
        self.assertIsInstance(self.dialer.tcpEndpointFor(hop), TCP6ClientEndpoint)

    def test_name(self) -> None:
        """
        A name is connected with happy eyeballs (L{HostnameEndpoint}).
        """
        endpoint = self.dialer.tcpEndpointFor(NextHop(HostPort("example.com", 80)))
        self.assertIsInstance(endpoint, HostnameEndpoint)
        self.assertEqual(endpoint._timeout, 7.5)

    def test_tls(self) -> None:
        """
        A TLS next hop's endpoint wraps the TCP endpoint in TLS: connecting
        it connects TCP to the next hop's address.
        """
        hop = NextHop(HostPort("192.0.2.9", 443), tls=True)
        endpoint = self.dialer.endpointFor(hop)
        self.assertNotIsInstance(endpoint, TCP4ClientEndpoint)
        endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.9", 443))

    def test_connectPlain(self) -> None:
        """
        L{Dialer.connect} to a plain next hop starts a TCP connection with
        the dialer's timeout; cancelling it stops connecting.
        """
        d = self.dialer.connect(NextHop(HostPort("192.0.2.7", 80)), RecorderFactory())
        [(host, port, _, timeout, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("192.0.2.7", 80, 7.5))
        d.cancel()
        self.failureResultOf(d, error.ConnectingCancelledError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)


class TLSOptionsTests(unittest.TestCase):
    """
    The TLS options of a next hop: which name is verified, which CAs are
    trusted, and their reuse.
    """

    def setUp(self) -> None:
        self.ca = CertificateAuthority()
        self.caFile = self.ca.writeCertificate(self.mktemp())

    def test_hostnameDefaultsToHost(self) -> None:
        """
        The name verified is C{hostname=} if given, else the host.
        """
        hop = NextHop(HostPort("localhost", 443), tls=True, caCertificates=self.caFile)
        self.assertEqual(tlsOptionsFor(hop)._hostnameASCII, "localhost")
        other = NextHop(
            HostPort("127.0.0.1", 443), tls=True, tlsHostname="proxy.example",
            caCertificates=self.caFile,
        )
        self.assertEqual(tlsOptionsFor(other)._hostnameASCII, "proxy.example")

    def test_reused(self) -> None:
        """
        L{Dialer.tlsOptionsFor} makes the options once per name and CA file.
        """
        dialer = Dialer(MemoryReactorClock(), 1)
        hop = NextHop(HostPort("localhost", 443), tls=True, caCertificates=self.caFile)
        samePort = NextHop(HostPort("localhost", 8443), tls=True, caCertificates=self.caFile)
        other = NextHop(HostPort("other.example", 443), tls=True, caCertificates=self.caFile)
        self.assertIs(dialer.tlsOptionsFor(hop), dialer.tlsOptionsFor(samePort))
        self.assertIsNot(dialer.tlsOptionsFor(hop), dialer.tlsOptionsFor(other))

    def test_noCertificateInFile(self) -> None:
        """
        A CA file without a certificate fails the connection attempt with
        L{ValueError}, and one that cannot be read with L{OSError}; nothing
        is connected.
        """
        empty = self.mktemp()
        with open(empty, "w") as f:
            f.write("not a certificate\n")
        reactor = MemoryReactorClock()
        dialer = Dialer(reactor, 1)
        for path, kind in ((empty, ValueError), (self.mktemp(), OSError)):
            hop = NextHop(HostPort("localhost", 443), tls=True, caCertificates=path)
            failure = self.failureResultOf(dialer.connect(hop, RecorderFactory()))
            self.assertTrue(failure.check(kind), failure)
        self.assertEqual(reactor.tcpClients, [])

    @settings(max_examples=30)
    @given(
        count=st.integers(min_value=1, max_value=3),
        junk=st.lists(
            st.text(alphabet="abc xyz#\n\t", max_size=20), min_size=4, max_size=4
        ),
    )
    def test_bundle(self, count: int, junk: list[str]) -> None:
        """
        Every certificate of a PEM bundle is trusted, whatever text lies
        between them.
        """
        pems = [c.certificatePEM for c in _bundleCAs()[:count]]
        text = junk[0].encode()
        for i, pem in enumerate(pems):
            text += pem + junk[i + 1].encode()
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(text)
        trustRoot = _loadTrustRoot(path)
        self.assertEqual(
            [derOf(c.to_cryptography()) for c in trustRoot._caCerts],
            [derOf(c.certificate) for c in _bundleCAs()[:count]],
        )


_CAS: list[CertificateAuthority] = []


def _bundleCAs() -> list[CertificateAuthority]:
    if not _CAS:
        _CAS.extend(CertificateAuthority(f"bundle CA {i}") for i in range(3))
    return _CAS


def derOf(certificate: Any) -> bytes:
    """
    The DER bytes of a C{cryptography} certificate.
    """
    from cryptography.hazmat.primitives.serialization import Encoding

    return certificate.public_bytes(Encoding.DER)


class DescribeTLSFailureTests(unittest.TestCase):
    """
    L{describeTLSFailure} says in one line why a handshake failed.
    """

    def test_wrongName(self) -> None:
        """
        A service-identity mismatch names the name expected.
        """
        value = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("localhost"))])
        text = describeTLSFailure(Failure(value))
        self.assertIn("does not match the expected name", text)
        self.assertIn("localhost", text)

    def test_openSSLError(self) -> None:
        """
        An OpenSSL error gives its reasons.
        """
        value = SSL.Error([("SSL routines", "", "certificate verify failed")])
        self.assertEqual(describeTLSFailure(Failure(value)), "certificate verify failed")

    def test_closed(self) -> None:
        """
        A connection closed or reset during the handshake says so.
        """
        for value in (error.ConnectionDone(), error.ConnectionLost()):
            self.assertEqual(
                describeTLSFailure(Failure(value)),
                "the server closed the connection during the handshake",
            )

    def test_other(self) -> None:
        """
        Anything else is described by its text, or its type.
        """
        self.assertEqual(describeTLSFailure(Failure(RuntimeError("boom"))), "boom")
        self.assertEqual(describeTLSFailure(Failure(RuntimeError())), "RuntimeError")

    def test_errorText(self) -> None:
        """
        L{TLSHandshakeError} reads as one line naming the host.
        """
        self.assertEqual(
            str(TLSHandshakeError("example.com", "certificate verify failed")),
            "TLS handshake with example.com failed: certificate verify failed",
        )
        self.assertIsInstance(TLSHandshakeError("a", "b"), error.ConnectError)


class TLSTimeoutTests(unittest.TestCase):
    """
    The connect timeout of a TLS next hop, with a fake reactor.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.dialer = Dialer(self.reactor, 2.0)
        ca = CertificateAuthority()
        self.hop = NextHop(
            HostPort("127.0.0.1", 443), tls=True, tlsHostname="localhost",
            caCertificates=ca.writeCertificate(self.mktemp()),
        )

    def test_timeoutBeforeTCP(self) -> None:
        """
        Past the timeout without a TCP connection, the attempt fails with
        L{error.TimeoutError} and stops connecting.
        """
        factory = RecorderFactory()
        d = self.dialer.connect(self.hop, factory)
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.failureResultOf(d, error.TimeoutError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(factory.protocols, [])

    def test_cancel(self) -> None:
        """
        Cancelling the attempt stops connecting and its timer.
        """
        d = self.dialer.connect(self.hop, RecorderFactory())
        d.cancel()
        self.failureResultOf(d, error.ConnectingCancelledError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_tcpFails(self) -> None:
        """
        A TCP connection failure fails the attempt with that error and
        stops the timer.
        """
        d = self.dialer.connect(self.hop, RecorderFactory())
        [(_, _, factory, _, _)] = self.reactor.tcpClients
        factory.clientConnectionFailed(
            self.reactor.connectors[0], Failure(error.ConnectionRefusedError())
        )
        self.failureResultOf(d, error.ConnectionRefusedError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class SilentServer(Protocol):
    """
    Accepts and never speaks.
    """

    def __init__(self) -> None:
        self.lost: defer.Deferred = defer.Deferred()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


class TLSHandshakeTests(unittest.TestCase):
    """
    L{Dialer.connect} to TLS next hops on real loopback sockets.
    """

    timeout = TEST_TIMEOUT

    def setUp(self) -> None:
        self.ca = CertificateAuthority()
        self.caFile = self.ca.writeCertificate(self.mktemp())
        self.net = Network(self)
        from twisted.internet import reactor

        self.dialer = Dialer(reactor, 5)

    def hop(self, port: int, host: str = "localhost", **kw: Any) -> NextHop:
        return NextHop(HostPort(host, port), tls=True, caCertificates=self.caFile, **kw)

    def tlsServer(self, pem: bytes) -> tuple[int, PeerFactory]:
        servers = PeerFactory(self.net)
        return listenTLS(self.net, servers, pem), servers

    @defer.inlineCallbacks
    def connect(self, hop: NextHop) -> Any:
        factory = RecorderFactory()
        protocol = yield withTimeout(
            self.dialer.connect(hop, factory), 10, "the TLS connection"
        )

        def close() -> defer.Deferred:
            if not protocol.lost.called:
                protocol.transport.abortConnection()
            return protocol.lost

        self.addCleanup(close)
        return protocol, factory

    @defer.inlineCallbacks
    def test_connectedAfterHandshake(self) -> Any:
        """
        The protocol is connected only once the handshake is done (it sees
        the server's certificate at C{connectionMade}); then bytes pass
        both ways and the server's close reaches it.
        """
        port, servers = self.tlsServer(self.ca.issue("localhost"))
        protocol, _ = yield self.connect(self.hop(port))
        self.assertTrue(protocol.made)
        self.assertIsNotNone(protocol.peerCertificateAtConnect)
        self.assertEqual(
            protocol.peerCertificateAtConnect.get_subject().commonName, "localhost"
        )
        server = yield servers.nextPeer()
        protocol.transport.write(b"hello over TLS")
        yield withTimeout(server.waitForBytes(14), 10, "the bytes at the server")
        server.transport.write(b"answer")
        server.transport.loseConnection()
        yield withTimeout(protocol.lost, 10, "the close")
        self.assertEqual(server.received, b"hello over TLS")
        self.assertEqual(protocol.data, b"answer")
        self.assertTrue(protocol.reason.check(error.ConnectionDone), protocol.reason)

    @defer.inlineCallbacks
    def test_hostnameOverride(self) -> Any:
        """
        C{hostname=} verifies a name other than the host connected to.
        """
        port, _ = self.tlsServer(self.ca.issue("proxy.example"))
        protocol, _ = yield self.connect(
            self.hop(port, host="127.0.0.1", tlsHostname="proxy.example")
        )
        self.assertTrue(protocol.made)

    @defer.inlineCallbacks
    def test_ipAddressCertificate(self) -> Any:
        """
        A next hop given as an IP literal is verified against the IP
        address in the certificate.
        """
        port, _ = self.tlsServer(self.ca.issue("127.0.0.1"))
        protocol, _ = yield self.connect(self.hop(port, host="127.0.0.1"))
        self.assertTrue(protocol.made)

    @defer.inlineCallbacks
    def assertHandshakeFails(self, hop: NextHop, *texts: str) -> Any:
        factory = RecorderFactory()
        d = self.dialer.connect(hop, factory)
        value = yield self.assertFailure(
            withTimeout(d, 10, "the failed handshake"), TLSHandshakeError
        )
        for text in texts:
            self.assertIn(text, str(value))
        self.assertEqual([p.made for p in factory.protocols], [False] * len(factory.protocols))
        return value

    @defer.inlineCallbacks
    def test_wrongName(self) -> Any:
        """
        A trusted certificate for another name fails the attempt with
        L{TLSHandshakeError}; the protocol is never connected.
        """
        port, servers = self.tlsServer(self.ca.issue("wrong.example"))
        yield self.assertHandshakeFails(
            self.hop(port), "TLS handshake with localhost failed", "does not match"
        )
        server = yield servers.nextPeer()
        yield withTimeout(server.lost, 10, "the server's side to close")

    @defer.inlineCallbacks
    def test_untrusted(self) -> Any:
        """
        A certificate from a CA not in C{trustRoots} fails the attempt.
        """
        port, _ = self.tlsServer(CertificateAuthority("stranger").issue("localhost"))
        yield self.assertHandshakeFails(self.hop(port), "certificate verify failed")

    @defer.inlineCallbacks
    def test_bundle(self) -> Any:
        """
        A server whose CA is the second of a C{trustRoots} bundle verifies.
        """
        second = CertificateAuthority("second CA")
        with open(self.caFile, "ab") as f:
            f.write(second.certificatePEM)
        port, _ = self.tlsServer(second.issue("localhost"))
        protocol, _ = yield self.connect(self.hop(port))
        self.assertTrue(protocol.made)

    @defer.inlineCallbacks
    def test_plainServerCloses(self) -> Any:
        """
        A server that closes at once, without TLS, fails the attempt.
        """
        servers = PeerFactory(self.net)
        servers.onConnect = lambda peer: peer.transport.loseConnection()
        port = self.net.listen(servers)
        yield self.assertHandshakeFails(self.hop(port), "TLS handshake with localhost failed")

    @defer.inlineCallbacks
    def test_silentServerTimesOut(self) -> Any:
        """
        A server that accepts TCP and never answers the handshake fails
        the attempt with L{error.TimeoutError} after the timeout, and the
        connection to it is closed.
        """
        from twisted.internet import reactor

        silent: list[SilentServer] = []

        def build(addr: Any) -> SilentServer:
            protocol = SilentServer()
            silent.append(protocol)
            self.net.track(protocol)
            return protocol

        factory = Factory()
        factory.buildProtocol = build  # type: ignore[method-assign]
        port = self.net.listen(factory)
        dialer = Dialer(reactor, 0.3)
        started = reactor.seconds()
        yield self.assertFailure(
            withTimeout(dialer.connect(self.hop(port), RecorderFactory()), 10, "the timeout"),
            error.TimeoutError,
        )
        self.assertGreaterEqual(reactor.seconds() - started, 0.29)
        self.assertEqual(len(silent), 1)
        yield withTimeout(silent[0].lost, 10, "the silent server's connection to close")

    @defer.inlineCallbacks
    def test_cancelDuringHandshake(self) -> Any:
        """
        Cancelling while the handshake is under way fails the attempt with
        L{defer.CancelledError} and closes the connection.
        """
        silent: list[SilentServer] = []
        accepted: defer.Deferred = defer.Deferred()

        def build(addr: Any) -> SilentServer:
            protocol = SilentServer()
            silent.append(protocol)
            self.net.track(protocol)
            accepted.callback(None)
            return protocol

        factory = Factory()
        factory.buildProtocol = build  # type: ignore[method-assign]
        port = self.net.listen(factory)
        d = self.dialer.connect(self.hop(port), RecorderFactory())
        yield withTimeout(accepted, 10, "the TCP connection")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError, error.ConnectingCancelledError)
        yield withTimeout(silent[0].lost, 10, "the connection to close")


class PlainConnectTests(unittest.TestCase):
    """
    L{Dialer.connect} to plain TCP next hops on real loopback sockets.
    """

    timeout = TEST_TIMEOUT

    def test_endpointReused(self) -> None:
        """
        The flows of a next hop are connected through one endpoint, made at
        the first; another next hop, or another timeout, gets its own.
        """
        from twisted.internet import reactor

        from miniproxy.tcpclient import TunedTCPClientEndpoint

        dialer = Dialer(reactor, 5)
        hop = NextHop(HostPort("127.0.0.1", 9))
        endpoint = dialer._literalEndpoint(hop)
        self.assertIsInstance(endpoint, TunedTCPClientEndpoint)
        self.assertIs(dialer._literalEndpoint(hop), endpoint)
        other = dialer._literalEndpoint(NextHop(HostPort("127.0.0.1", 10)))
        self.assertIsNot(other, endpoint)
        dialer.timeout = 1
        slower = dialer._literalEndpoint(NextHop(HostPort("127.0.0.1", 10)))
        self.assertIsNot(slower, other)
        self.assertEqual(slower._timeout, 1)

    @defer.inlineCallbacks
    def test_refused(self) -> Any:
        """
        A refused connection fails with L{error.ConnectionRefusedError}.
        """
        from twisted.internet import reactor

        net = Network(self)
        d = Dialer(reactor, 5).connect(
            NextHop(HostPort("127.0.0.1", net.refusingPort())), RecorderFactory()
        )
        yield self.assertFailure(d, error.ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_timeout(self) -> Any:
        """
        A connection whose SYNs are dropped fails with
        L{error.TimeoutError} after the timeout.
        """
        from twisted.internet import reactor

        net = Network(self)
        started = reactor.seconds()
        d = Dialer(reactor, 0.3).connect(
            NextHop(HostPort("127.0.0.1", net.blackHolePort())), RecorderFactory()
        )
        yield self.assertFailure(d, error.TimeoutError)
        self.assertGreaterEqual(reactor.seconds() - started, 0.29)

    @defer.inlineCallbacks
    def test_connected(self) -> Any:
        """
        A connection to a listening server fires with the protocol.
        """
        from twisted.internet import reactor

        net = Network(self)
        port, servers = net.server()
        factory = RecorderFactory()
        protocol = yield Dialer(reactor, 5).connect(
            NextHop(HostPort("127.0.0.1", port)), factory
        )
        server: Peer = yield servers.nextPeer()
        self.assertEqual(protocol.transport.getPeer().port, port)
        self.assertEqual(factory.protocols, [protocol])
        protocol.transport.loseConnection()
        yield withTimeout(
            defer.gatherResults([server.ended, protocol.lost]), 10, "the close"
        )
