"""
Helpers for the tests that run miniproxy on real loopback sockets.

A L{Network} belongs to one test: it starts servers, clients and proxies
on 127.0.0.1 with the global reactor, and tears every one of them down in
the test's cleanup, waiting until every connection is closed so that trial
finds a clean reactor.  Nothing here sleeps: waiting is on Deferreds fired
by protocol events, and L{waitUntil} polls a condition with a bounded
deadline only where no event exists.
"""

from __future__ import annotations

import hashlib
import os
import socket
from typing import Any, Callable, Iterable

from twisted.internet import defer, error, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from miniproxy.config import buildConfig
from miniproxy.service import ProxyService

#: What every real-socket test may take at most, in seconds.
TEST_TIMEOUT = 30


def openFileCount() -> int:
    """
    How many file descriptors this process has open.
    """
    return len(openFiles())


def openFiles() -> dict[int, str]:
    """
    This process's open file descriptors, with what each points to (for
    messages when one leaked).
    """
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return found


def waitUntil(
    condition: Callable[[], bool],
    what: str,
    timeout: float = 10.0,
    interval: float = 0.005,
    reactor: Any = None,
) -> defer.Deferred:
    """
    Poll C{condition} on the reactor until it holds, for when no event says
    so.

    @param what: What is waited for, for the failure message.
    @return: A L{defer.Deferred} firing with L{None} once C{condition()} is
        true, or failing with L{AssertionError} after C{timeout} seconds.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    deadline = reactor.seconds() + timeout

    @defer.inlineCallbacks
    def poll() -> Any:
        while not condition():
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
            yield task.deferLater(reactor, interval, lambda: None)

    return poll()


def withTimeout(d: defer.Deferred, seconds: float, what: str, reactor: Any = None) -> defer.Deferred:
    """
    Fail C{d} with an L{AssertionError} naming C{what} if it has not fired
    within C{seconds}.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor

    def timedOut(result: Any, timeout: float) -> Any:
        # Called only when C{d} timed out (C{result} is then the
        # cancellation's failure).
        raise AssertionError(f"timed out after {seconds:g}s waiting for {what}")

    return d.addTimeout(seconds, reactor, onTimeoutCancel=timedOut)


def sha256(data: bytes) -> str:
    """
    The hex SHA-256 of C{data}.
    """
    return hashlib.sha256(data).hexdigest()


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """
    A client or a server in a test: it records what it reads, sees a FIN
    as such (it is half-closeable), and fires Deferreds at each step.

    @ivar received: What was read (unless C{keep} is false).
    @ivar size: How many bytes were read.
    @ivar digest: The running SHA-256 of what was read.
    @ivar whenConnected: Fires with the peer at C{connectionMade}.
    @ivar eof: Fires with the peer when the other side's FIN arrives.
    @ivar lost: Fires with the peer at C{connectionLost} (never fails);
        C{reason} is then the reason.
    @ivar ended: Fires with the peer at the first of the other side's FIN
        and C{connectionLost}: when the other side is done with it (a
        half-closeable peer stays open after a FIN until it closes too).
    @ivar echo: Whether to write back what is read, and FIN after a FIN.
    @ivar pauseOnConnect: Whether not to read until C{resumeProducing}.
    """

    def __init__(
        self, echo: bool = False, pauseOnConnect: bool = False, keep: bool = True
    ) -> None:
        self.echo = echo
        self.pauseOnConnect = pauseOnConnect
        self.keep = keep
        self.chunks: list[bytes] = []
        self.size = 0
        self.digest = hashlib.sha256()
        self.whenConnected: defer.Deferred = defer.Deferred()
        self.eof: defer.Deferred = defer.Deferred()
        self.lost: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()
        self.sawEOF = False
        self.eofBeforeLost = False
        self.writeClosed = False
        self.reason: Failure | None = None
        self.isConnected = False
        self._byteWaiters: list[tuple[int, defer.Deferred]] = []

    @property
    def received(self) -> bytes:
        """
        Everything read so far.
        """
        return b"".join(self.chunks)

    def connectionMade(self) -> None:
        """
        Record the connection, and pause reading if asked.
        """
        self.isConnected = True
        if self.pauseOnConnect:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self.whenConnected.callback(self)

    def dataReceived(self, data: bytes) -> None:
        """
        Record the bytes; echo them if asked.
        """
        self.size += len(data)
        self.digest.update(data)
        if self.keep:
            self.chunks.append(data)
        if self.echo:
            self.transport.write(data)  # type: ignore[union-attr]
        waiting, self._byteWaiters = self._byteWaiters, []
        for n, d in waiting:
            if self.size >= n:
                d.callback(self)
            else:
                self._byteWaiters.append((n, d))

    def waitForBytes(self, n: int) -> defer.Deferred:
        """
        @return: A L{defer.Deferred} firing with the peer once C{n} bytes in
            all were read, or failing if the connection is lost first.
        """
        d: defer.Deferred = defer.Deferred()
        if self.size >= n:
            d.callback(self)
        elif self.reason is not None:
            d.errback(AssertionError(f"connection lost after {self.size} of {n} bytes"))
        else:
            self._byteWaiters.append((n, d))
        return d

    def readConnectionLost(self) -> None:
        """
        The other side sent a FIN.
        """
        self.sawEOF = True
        # Fire eof first: closing (when our write side is shut already)
        # runs connectionLost at once, which would fail a pending eof.
        if not self.eof.called:
            self.eof.callback(self)
        if not self.ended.called:
            self.ended.callback(self)
        if self.echo:
            self.transport.loseWriteConnection()  # type: ignore[union-attr]
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        """
        Our FIN is sent.
        """
        self.writeClosed = True
        self._closeIfDone()

    def _closeIfDone(self) -> None:
        if self.sawEOF and self.writeClosed:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        """
        Record the reason and fire C{lost}.
        """
        self.isConnected = False
        self.reason = reason
        self.eofBeforeLost = self.sawEOF
        waiting, self._byteWaiters = self._byteWaiters, []
        for n, d in waiting:
            d.errback(AssertionError(f"connection lost after {self.size} of {n} bytes"))
        if not self.eof.called:
            self.eof.errback(
                AssertionError(f"connection lost without a FIN: {reason.value!r}")
            )
            self.eof.addErrback(lambda f: None)
        if not self.ended.called:
            self.ended.callback(self)
        self.lost.callback(self)

    def wasReset(self) -> bool:
        """
        Whether the connection ended with a reset (or another error), not
        cleanly.
        """
        return self.reason is not None and not self.reason.check(error.ConnectionDone)


class PeerFactory(Factory):
    """
    Makes server L{Peer}s, keeping them and handing them out in order.

    @ivar peers: Every peer made.
    @ivar accepted: A L{defer.DeferredQueue} of connected peers.
    """

    noisy = False

    def __init__(self, network: Network, **peerArgs: Any) -> None:
        self.network = network
        self.peerArgs = peerArgs
        self.peers: list[Peer] = []
        self.accepted: defer.DeferredQueue = defer.DeferredQueue()
        self.onConnect: Callable[[Peer], None] | None = None

    def buildProtocol(self, addr: Any) -> Peer:
        """
        Make a peer and watch it.
        """
        peer = Peer(**self.peerArgs)
        peer.factory = self
        self.peers.append(peer)
        self.network.track(peer)

        def connected(p: Peer) -> Peer:
            if self.onConnect is not None:
                self.onConnect(p)
            self.accepted.put(p)
            return p

        peer.whenConnected.addCallback(connected)
        return peer

    def nextPeer(self, timeout: float = 10.0) -> defer.Deferred:
        """
        @return: A L{defer.Deferred} firing with the next accepted peer.
        """
        return withTimeout(self.accepted.get(), timeout, "a connection to the server")


class _Resetting(Protocol):
    """
    A server that resets each connection: after C{after} bytes, or at once.
    """

    def __init__(self, after: int) -> None:
        self.after = after
        self.size = 0
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        if self.after == 0:
            self._reset()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size >= self.after:
            self._reset()

    def _reset(self) -> None:
        resetTransport(self.transport)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


def resetTransport(transport: Any) -> None:
    """
    Close a TCP connection with a RST (C{SO_LINGER} 0, then close).
    """
    sock = transport.getHandle()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    transport.abortConnection()


class ResettingFactory(Factory):
    """
    Makes L{_Resetting} servers.
    """

    noisy = False

    def __init__(self, network: Network, after: int = 0) -> None:
        self.network = network
        self.after = after
        self.count = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.count += 1
        protocol = _Resetting(self.after)
        self.network.track(protocol)
        return protocol


class ProxyHarness:
    """
    A L{ProxyService} started in this process, with its closed flows.

    @ivar service: The service.
    @ivar port: The port its first listener is bound to.
    @ivar ports: The ports of all its listeners.
    @ivar closed: The flows closed so far, in order.
    """

    def __init__(self, service: ProxyService) -> None:
        self.service = service
        self.port = 0
        self.ports: list[int] = []
        self.closed: list[Any] = []
        self._taken = 0
        self._waiters: list[tuple[int, defer.Deferred]] = []

    def flowClosed(self, flow: Any) -> None:
        """
        The service's C{onFlowClosed}.
        """
        self.closed.append(flow)
        waiting, self._waiters = self._waiters, []
        for n, d in waiting:
            if len(self.closed) >= n:
                d.callback(self.closed[:n])
            else:
                self._waiters.append((n, d))

    def waitForClosed(self, n: int, timeout: float = 15.0) -> defer.Deferred:
        """
        @return: A L{defer.Deferred} firing with the first C{n} flows closed,
            once there are that many.
        """
        d: defer.Deferred = defer.Deferred()
        if len(self.closed) >= n:
            d.callback(self.closed[:n])
        else:
            self._waiters.append((n, d))
        return withTimeout(d, timeout, f"{n} closed flows (have {len(self.closed)})")

    def nextClosed(self, timeout: float = 15.0) -> defer.Deferred:
        """
        @return: A L{defer.Deferred} firing with the next closed flow not
            returned by an earlier call (it may have closed already).
        """
        self._taken += 1
        return self.waitForClosed(self._taken, timeout).addCallback(
            lambda flows: flows[-1]
        )

    def openFlows(self) -> list[Any]:
        """
        The flows open now.
        """
        return list(self.service.table.flows)

    def stop(self) -> defer.Deferred:
        """
        Stop the service and wait until every flow it had is closed.
        """
        if not self.service.running:
            return defer.succeed(None)
        d = defer.maybeDeferred(self.service.stopService)
        d.addCallback(
            lambda _: waitUntil(
                lambda: not self.service.table.flows, "the proxy's flows to close"
            )
        )
        return d


class Network:
    """
    The sockets one test makes on 127.0.0.1, closed in its cleanup.
    """

    def __init__(self, testCase: Any) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.synTap = getattr(testCase, "synTap", True)
        self._protocols: list[Any] = []
        self._ports: list[Any] = []
        self._proxies: list[ProxyHarness] = []
        self._sockets: list[socket.socket] = []
        testCase.addCleanup(self.close)

    def track(self, protocol: Any) -> None:
        """
        Close C{protocol}'s connection at cleanup if it is still open.
        """
        self._protocols.append(protocol)

    def listen(self, factory: Factory) -> int:
        """
        Listen on 127.0.0.1 with C{factory}.

        @return: The port number.
        """
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self._ports.append(port)
        return port.getHost().port

    def server(self, **peerArgs: Any) -> tuple[int, PeerFactory]:
        """
        Start a server of L{Peer}s made with C{peerArgs}.

        @return: Its port and its factory.
        """
        factory = PeerFactory(self, **peerArgs)
        return self.listen(factory), factory

    def connect(
        self, port: int, peer: Peer | None = None, bindAddress: str | None = None
    ) -> defer.Deferred:
        """
        Connect a client L{Peer} to C{port} on 127.0.0.1.

        @return: A L{defer.Deferred} firing with the connected peer.
        """
        if peer is None:
            peer = Peer()
        self.track(peer)
        endpoint = TCP4ClientEndpoint(
            self.reactor,
            "127.0.0.1",
            port,
            timeout=5,
            bindAddress=(bindAddress, 0) if bindAddress else None,
        )
        return connectProtocol(endpoint, peer)

    def refusingPort(self) -> int:
        """
        A port on 127.0.0.1 where connecting is refused (with a RST): a
        socket is bound there but does not listen, so nobody else can
        take the port for the test's duration.
        """
        sock = socket.socket()
        self._sockets.append(sock)
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

    def blackHolePort(self) -> int:
        """
        A port on 127.0.0.1 where connecting times out: a listening socket
        with a backlog of 0 whose accept queue is already full (a
        connection was made and never accepted), so the kernel drops every
        further SYN.
        """
        sock = socket.socket()
        self._sockets.append(sock)
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        port = sock.getsockname()[1]
        filler = socket.socket()
        self._sockets.append(filler)
        filler.settimeout(5)
        filler.connect(("127.0.0.1", port))
        # More attempts, left pending: if this kernel's queue had room for
        # more than one, these fill it.
        for _ in range(2):
            extra = socket.socket()
            self._sockets.append(extra)
            extra.setblocking(False)
            extra.connect_ex(("127.0.0.1", port))
        return port

    @defer.inlineCallbacks
    def startProxy(
        self,
        to: str | None,
        listen: Iterable[str] | None = ("tcp:0:interface=127.0.0.1",),
        limits: dict[str, Any] | None = None,
        functions: tuple[tuple[str, Any], ...] | None = None,
        functionNames: list[str] | None = None,
        mode: str | None = None,
        document: dict[str, Any] | None = None,
    ) -> Any:
        """
        Start a L{ProxyService} in this process.

        The listeners run a SYN tap (when the process may) unless the test
        case's C{synTap} attribute is false: then flows start at accept.

        @param to: The static next hop, as for C{--to}.
        @param functions: Configured functions to run, as C{(name, factory)}
            pairs, instead of the ones the configuration names.
        @return: A L{defer.Deferred} firing with a L{ProxyHarness} once every
            listener listens.
        """
        document = dict(document or {})
        if not self.synTap:
            if listen is not None:
                document["listeners"] = [{"endpoint": e} for e in listen]
                listen = None
            document["listeners"] = [
                dict(table, **{"syn-tap": False}) for table in document["listeners"]
            ]
        config = buildConfig(
            document,
            listen=list(listen) if listen is not None else None,
            to=to,
            mode=mode,
            functions=functionNames,
            limits=limits,
        )
        harness = ProxyHarness(None)  # type: ignore[arg-type]
        service = ProxyService(
            config, self.reactor, functions=functions, onFlowClosed=harness.flowClosed
        )
        harness.service = service
        self._proxies.append(harness)
        service.startService()
        ports = yield service.whenListening()
        harness.ports = [p.getHost().port for p in ports]
        harness.port = harness.ports[0]
        return harness

    @defer.inlineCallbacks
    def close(self) -> Any:
        """
        Stop the proxies, close every connection and stop listening; wait
        until all of it is done.
        """
        for harness in self._proxies:
            yield harness.stop()
        waiting = []
        for protocol in self._protocols:
            transport = getattr(protocol, "transport", None)
            lost = getattr(protocol, "lost", None)
            if transport is None or lost is None or lost.called:
                continue
            if getattr(protocol, "isConnected", True) or transport.connected:
                transport.abortConnection()
            waiting.append(lost)
        if waiting:
            yield withTimeout(
                defer.gatherResults(waiting), 10, "test connections to close"
            )
        for port in self._ports:
            yield port.stopListening()
        for sock in self._sockets:
            sock.close()


class LogCapture:
    """
    The log events emitted during a test.

    @ivar events: Every event, in order.
    """

    def __init__(self, testCase: Any) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def matching(self, namespace: str, **fields: Any) -> list[dict[str, Any]]:
        """
        The events of C{namespace} whose fields equal C{fields}.
        """
        return [
            event
            for event in self.events
            if event.get("log_namespace") == namespace
            and all(event.get(k) == v for k, v in fields.items())
        ]


class CertificateAuthority:
    """
    A throwaway certificate authority, made with C{cryptography}, that
    issues server certificates for the TLS tests.

    @ivar certificatePEM: The CA's certificate, in PEM.
    """

    def __init__(self, name: str = "miniproxy test CA") -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding
        from cryptography.x509.oid import NameOID

        self._x509 = x509
        self._hashes = hashes
        self._ec = ec
        self._now = datetime.datetime.now(datetime.timezone.utc)
        self._day = datetime.timedelta(days=1)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - self._day)
            .not_valid_after(self._now + self._day)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.certificatePEM = self.certificate.public_bytes(Encoding.PEM)

    def issue(self, hostname: str) -> bytes:
        """
        Issue a server certificate for C{hostname} (a DNS name, or an IP
        address literal).

        @return: The server's private key and certificate, in PEM, as
            L{twisted.internet.ssl.PrivateCertificate.loadPEM} takes them.
        """
        import ipaddress

        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            NoEncryption,
            PrivateFormat,
        )
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        x509 = self._x509
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        try:
            alternative: Any = x509.IPAddress(ipaddress.ip_address(hostname))
        except ValueError:
            alternative = x509.DNSName(hostname)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - self._day)
            .not_valid_after(self._now + self._day)
            .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(self.key, self._hashes.SHA256())
        )
        return key.private_bytes(
            Encoding.PEM, PrivateFormat.TraditionalOpenSSL, NoEncryption()
        ) + certificate.public_bytes(Encoding.PEM)

    def writeCertificate(self, path: str) -> str:
        """
        Write the CA's certificate to C{path}, for C{trustRoots=}.

        @return: C{path}.
        """
        with open(path, "wb") as f:
            f.write(self.certificatePEM)
        return path


def listenTLS(network: Network, factory: Factory, serverPEM: bytes) -> int:
    """
    Listen with TLS on 127.0.0.1, presenting C{serverPEM} (a key and a
    certificate, from L{CertificateAuthority.issue}).

    @return: The port number.
    """
    from twisted.internet import ssl

    options = ssl.PrivateCertificate.loadPEM(serverPEM).options()
    port = network.reactor.listenSSL(0, factory, options, interface="127.0.0.1")
    network._ports.append(port)
    return port.getHost().port
