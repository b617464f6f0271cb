# -*- test-case-name: tests.test_connect -*-
"""
Starting an outgoing leg: from a L{NextHop} to a connected protocol.

A plain TCP next hop is connected with Twisted's TCP client endpoints.  A
TLS next hop is connected over TCP and then the TLS handshake, with the
server's certificate verified against the next hop's name by
service-identity; the outgoing leg is only handed to its flow once the
handshake succeeded, so that a server that fails verification is a failed
connection (the flow's C{outgoingFailed} hook runs) and never a flow that
connected and then broke.  The connect timeout covers the handshake too.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from miniproxy.address import NextHop
from miniproxy.tcpclient import SocketOption, TunedTCPClientEndpoint, fastOpenConnect
from miniproxy.tcpclient import mark as markOption
from miniproxy.wire.tcpoption import FlowAddressOption


class TLSHandshakeError(error.ConnectError):
    """
    The TLS handshake with a next hop failed: its certificate did not verify
    (untrusted, or not for the expected name), or it does not speak TLS.

    @ivar hostname: The name the certificate was checked against.
    @ivar detail: What went wrong.
    """

    def __init__(self, hostname: str, detail: str) -> None:
        super().__init__(detail)
        self.hostname = hostname
        self.detail = detail

    def __str__(self) -> str:
        return f"TLS handshake with {self.hostname} failed: {self.detail}"


def describeTLSFailure(reason: Failure) -> str:
    """
    A short description of why a TLS handshake failed.

    @param reason: What the TLS layer reported when the connection was
        lost during the handshake.
    @return: One line for the access log.
    """
    value = reason.value
    errors = getattr(value, "errors", None)
    if errors is not None and type(value).__name__ == "VerificationError":
        # service_identity: the certificate is valid but for another name.
        names = ", ".join(str(e) for e in errors)
        return f"certificate does not match the expected name ({names})"
    args = getattr(value, "args", ())
    if args and isinstance(args[0], list):
        # OpenSSL.SSL.Error: a list of (library, function, reason) tuples.
        reasons = [entry[-1] for entry in args[0] if isinstance(entry, tuple)]
        if reasons:
            return "; ".join(str(r) for r in reasons if r) or str(value)
    if isinstance(value, (error.ConnectionDone, error.ConnectionLost)):
        return "the server closed the connection during the handshake"
    return str(value).strip() or type(value).__name__


def _loadTrustRoot(path: str) -> Any:
    from twisted.internet import ssl

    with open(path, "rb") as f:
        pem = f.read()
    begin = b"-----BEGIN CERTIFICATE-----"
    end = b"-----END CERTIFICATE-----"
    # Each certificate, without the text a bundle may have between them.
    blocks = [
        block[block.index(begin):] + end for block in pem.split(end) if begin in block
    ]
    if not blocks:
        raise ValueError(f"{path}: no PEM certificate found")
    return ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(block) for block in blocks]
    )


def tlsOptionsFor(nextHop: NextHop) -> Any:
    """
    The client TLS options of a next hop: verify the server's certificate
    against C{nextHop.tlsHostname} (or its host), trusting the CA
    certificates of C{nextHop.caCertificates} (every certificate of that
    PEM file) or, without it, the platform's trust store.

    @raise OSError: If the CA file cannot be read.
    @raise ValueError: If it holds no certificate.
    """
    from twisted.internet import ssl

    hostname = nextHop.tlsHostname or nextHop.address.host
    trustRoot = None
    if nextHop.caCertificates is not None:
        trustRoot = _loadTrustRoot(nextHop.caCertificates)
    return ssl.optionsForClientTLS(hostname, trustRoot=trustRoot)


@implementer(IHandshakeListener)
class _HandshakeGate(Protocol):
    """
    Sits between a TLS transport and the protocol that is to use it, and
    connects that protocol only once the handshake succeeded.

    @ivar wrapped: The protocol to connect.
    """

    def __init__(self, wrapped: IProtocol, ready: Deferred, hostname: str) -> None:
        self.wrapped = wrapped
        self._ready = ready
        self._hostname = hostname
        self._open = False

    def handshakeCompleted(self) -> None:
        """
        The server's certificate verified: connect the wrapped protocol.
        """
        ready = self._ready
        transport: Any = self.transport
        if transport.disconnecting:
            # The TLS layer is tearing the connection down (a failed
            # verification): connectionLost fails the attempt.
            return
        if ready.called:
            # Given up on (timed out or cancelled) in the meantime.
            transport.abortConnection()
            return
        self._open = True
        self.wrapped.makeConnection(self.transport)
        ready.callback(self.wrapped)

    def dataReceived(self, data: bytes) -> None:
        """
        Pass application bytes on.
        """
        if self._open:
            self.wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        """
        Pass the loss on, or fail the connection attempt if the handshake
        had not succeeded.
        """
        if self._open:
            self._open = False
            self.wrapped.connectionLost(reason)
            return
        if not self._ready.called:
            self._ready.errback(
                Failure(TLSHandshakeError(self._hostname, describeTLSFailure(reason)))
            )


class _HandshakeGateFactory(Factory):
    noisy = False

    def __init__(self, wrapped: IProtocolFactory, ready: Deferred, hostname: str) -> None:
        self._wrapped = wrapped
        self._ready = ready
        self._hostname = hostname
        self.gate: _HandshakeGate | None = None

    def buildProtocol(self, addr: Any) -> _HandshakeGate | None:
        protocol = self._wrapped.buildProtocol(addr)
        if protocol is None:
            return None
        self.gate = _HandshakeGate(protocol, self._ready, self._hostname)
        self.gate.factory = self
        return self.gate


def flowAddressOption(source: Any, destination: Any) -> FlowAddressOption:
    """
    The flow address option a SYN carries: the 4-tuple for IPv4, and for
    IPv6 the destination alone (the IPv6 4-tuple never fits in a SYN).

    @raise OSError: If the destination is not an IP address literal.
    """
    try:
        ip = ipaddress.ip_address(destination.host)
    except ValueError:
        raise OSError(
            f"cannot carry destination {destination} in a TCP option: not an IP address"
        ) from None
    if ip.version == 4:
        try:
            if ipaddress.ip_address(source.host).version == 4:
                return FlowAddressOption(destination, source)
        except ValueError:
            pass
    return FlowAddressOption(destination)


@functools.lru_cache(maxsize=256)
def _literal(host: str) -> str | None:
    """
    C{host} as an IP address literal without brackets, or L{None} for a
    name (asked at each connect: remembered).
    """
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(literal.split("%", 1)[0])
    except ValueError:
        return None
    return literal


class Dialer:
    """
    Connects outgoing legs.

    @ivar reactor: The reactor to connect with.
    @ivar timeout: Seconds a connection attempt may take, the TLS handshake
        included.
    """

    #: The service's L{miniproxy.optionemitter.OptionEmitter}, for next
    #: hops with C{carry=tcp-option}; L{None} where there is none.
    optionEmitter: Any = None

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self._tlsOptions: dict[tuple[str, str | None], Any] = {}
        # The last plain TCP next hop connected (with the timeout then) and
        # its endpoint: a listener's flows mostly go to its one static next
        # hop, and the endpoint holds nothing of a connection (see
        # _literalEndpoint).
        self._last: tuple[NextHop, float, IStreamClientEndpoint] | None = None
        # Whether the reactor is a real one (see _literalEndpoint); asked
        # at the first connect.
        self._posix: bool | None = None

    def tcpEndpointFor(self, nextHop: NextHop) -> IStreamClientEndpoint:
        """
        The TCP client endpoint that reaches C{nextHop}'s address: plain TCP
        to an address literal, happy eyeballs to a name, bound to
        C{nextHop.bindAddress} if given.
        """
        # Twisted's endpoints module imports its TLS support: only when
        # needed, not at start-up (see L{_literalEndpoint}).
        from twisted.internet.endpoints import (
            HostnameEndpoint,
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
        )

        host = nextHop.address.host
        port = nextHop.address.port
        bind = (nextHop.bindAddress, 0) if nextHop.bindAddress else None
        literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ip = ipaddress.ip_address(literal.split("%", 1)[0])
        except ValueError:
            return HostnameEndpoint(
                self.reactor,
                host.encode("idna"),
                port,
                timeout=self.timeout,
                bindAddress=bind,
            )
        options = self.socketOptionsFor(nextHop)
        if options:
            return TunedTCPClientEndpoint(
                self.reactor, literal, port, options, timeout=self.timeout,
                bindAddress=bind,
            )
        cls = TCP4ClientEndpoint if ip.version == 4 else TCP6ClientEndpoint
        return cls(self.reactor, literal, port, timeout=self.timeout, bindAddress=bind)

    def socketOptionsFor(self, nextHop: NextHop) -> list[SocketOption]:
        """
        The socket options an outgoing leg to C{nextHop} is created with:
        C{TCP_FASTOPEN_CONNECT} when the next hop asks for Fast Open.
        """
        options = []
        if nextHop.fastOpen:
            options.append(fastOpenConnect())
        return options

    def tlsOptionsFor(self, nextHop: NextHop) -> Any:
        """
        The client TLS options of C{nextHop}, made once per name and CA
        file and then reused (a CA file is read when first needed).
        """
        key = (nextHop.tlsHostname or nextHop.address.host, nextHop.caCertificates)
        options = self._tlsOptions.get(key)
        if options is None:
            options = self._tlsOptions[key] = tlsOptionsFor(nextHop)
        return options

    def endpointFor(self, nextHop: NextHop) -> IStreamClientEndpoint:
        """
        The client endpoint that reaches C{nextHop}: L{tcpEndpointFor},
        wrapped in TLS (verified with service-identity) when asked.

        Connecting this endpoint directly hands the protocol its transport
        before the TLS handshake; L{connect} waits for the handshake.
        """
        endpoint = self.tcpEndpointFor(nextHop)
        if nextHop.tls:
            from twisted.internet.endpoints import wrapClientTLS

            endpoint = wrapClientTLS(self.tlsOptionsFor(nextHop), endpoint)
        return endpoint

    def _literalEndpoint(self, nextHop: NextHop) -> IStreamClientEndpoint:
        """
        The endpoint that connects a plain TCP leg: to an address literal,
        a L{TunedTCPClientEndpoint}, which hands the transport the leg
        itself (no wrapping protocol) and needs no
        L{twisted.internet.endpoints}; to a name, or on a reactor that is
        not a real one, L{tcpEndpointFor}.

        The endpoint of the last next hop is kept and used again for the
        same next hop: an endpoint holds only where to connect and how.
        """
        last = self._last
        if last is not None and last[0] is nextHop and last[1] == self.timeout:
            return last[2]
        posix = self._posix
        if posix is None:
            from twisted.internet.posixbase import PosixReactorBase

            posix = self._posix = isinstance(self.reactor, PosixReactorBase)
        literal = _literal(nextHop.address.host)
        if literal is None or not posix:
            # A name, or a reactor of tests (MemoryReactor): Twisted's own
            # endpoint.
            return self.tcpEndpointFor(nextHop)
        endpoint = TunedTCPClientEndpoint(
            self.reactor,
            literal,
            nextHop.address.port,
            self.socketOptionsFor(nextHop),
            timeout=self.timeout,
            bindAddress=(nextHop.bindAddress, 0) if nextHop.bindAddress else None,
        )
        self._last = (nextHop, self.timeout, endpoint)
        return endpoint

    def connect(self, nextHop: NextHop, factory: IProtocolFactory) -> Deferred:
        """
        Connect to C{nextHop} with C{factory}.

        @return: A cancellable L{Deferred} that fires with the protocol once
            it is connected (for TLS, once the handshake succeeded), or
            fails: with L{twisted.internet.error.TimeoutError} on timeout,
            with L{TLSHandshakeError} if the TLS handshake failed, or with
            the connection error.
        """
        try:
            if getattr(nextHop, "carry", None) == "tcp-option":
                return self._connectWithOption(nextHop, factory)
            if not nextHop.tls:
                return self._literalEndpoint(nextHop).connect(factory)
            return self._connectTLS(nextHop, factory)
        except Exception:
            return fail()

    def _connectWithOption(self, nextHop: NextHop, factory: IProtocolFactory) -> Deferred:
        """
        Connect a leg whose SYN carries the flow address TCP option: mark
        its socket, bind it first so its port is known, and tell the
        emitter which SYN is to get which option.
        """
        flow = getattr(factory, "flow", None)
        emitter = self.optionEmitter
        if emitter is None or flow is None or flow.destination is None:
            raise OSError("cannot carry the destination in a TCP option here")
        option = flowAddressOption(getattr(flow, "origin", None) or flow.client, flow.destination)
        emitter.start()
        host = nextHop.address.host
        literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        family = socket.AF_INET6 if ":" in literal else socket.AF_INET
        bound: list[int] = []

        def bindFirst(sock: socket.socket) -> None:
            wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
            sock.bind((nextHop.bindAddress or wildcard, 0))
            bound.append(sock.getsockname()[1])
            emitter.expect(bound[0], nextHop.address, option)

        endpoint = TunedTCPClientEndpoint(
            self.reactor, literal, nextHop.address.port,
            [markOption(emitter.mark)] + self.socketOptionsFor(nextHop),
            timeout=self.timeout, onSocket=bindFirst,
        )

        def done(result: Any) -> Any:
            if bound:
                emitter.forget(bound[0], nextHop.address)
            return result

        return endpoint.connect(factory).addBoth(done)

    def _connectTLS(self, nextHop: NextHop, factory: IProtocolFactory) -> Deferred:
        from twisted.internet.endpoints import wrapClientTLS

        hostname = nextHop.tlsHostname or nextHop.address.host
        endpoint = wrapClientTLS(self.tlsOptionsFor(nextHop), self.tcpEndpointFor(nextHop))
        connecting: list[Deferred] = []

        def giveUp(ready: Deferred) -> None:
            # Stop the TCP attempt (cancelling a finished Deferred does
            # nothing; one waiting on another, as a name resolution's is,
            # cancels that one), or tear down the handshake under way.
            for d in connecting:
                d.cancel()
            gate = gateFactory.gate
            if gate is not None and gate.transport is not None and not gate._open:
                gate.transport.abortConnection()

        ready: Deferred = Deferred(giveUp)
        gateFactory = _HandshakeGateFactory(factory, ready, hostname)

        def timedOut() -> None:
            if ready.called:
                return
            ready.errback(
                error.TimeoutError(
                    string=f"TLS connection to {hostname} took over {self.timeout:g}s"
                )
            )
            giveUp(ready)

        timer = self.reactor.callLater(self.timeout, timedOut)

        def stopTimer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        ready.addBoth(stopTimer)

        def tcpFailed(reason: Failure) -> None:
            if not ready.called:
                ready.errback(reason)

        d = endpoint.connect(gateFactory)
        connecting.append(d)
        d.addCallbacks(lambda _: None, tcpFailed)
        return ready
