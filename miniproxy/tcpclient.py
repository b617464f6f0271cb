# -*- test-case-name: tests.test_tcpclient -*-
"""
A TCP client endpoint whose socket gets options before it connects: TCP
Fast Open (C{TCP_FASTOPEN_CONNECT}), a firewall mark (C{SO_MARK}), and so
on.  Twisted's L{twisted.internet.endpoints.TCP4ClientEndpoint} creates its
socket itself and offers no hook for that; this endpoint is the same
machinery (L{twisted.internet.tcp.Connector} and
L{twisted.internet.tcp.Client}) with one.

With C{TCP_FASTOPEN_CONNECT} the kernel reports the connection as made at
once and sends the SYN with the first bytes written, carrying them in the
SYN when it holds a Fast Open cookie for the server (from an earlier
connection).  So such a connection must be written to at once: the
outgoing leg does this when it has bytes (a PROXY header, early client
bytes); without them it connects without Fast Open so that its SYN leaves
at once (see L{miniproxy.connect}).
"""

from __future__ import annotations

import os
import socket
from errno import EALREADY, EINPROGRESS, EISCONN, EWOULDBLOCK
from typing import Any, Callable, Sequence

from twisted.internet import address, base, error, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from zope.interface import implementer

#: Linux's C{TCP_FASTOPEN_CONNECT} (4.11 and later).
TCP_FASTOPEN_CONNECT = 30
#: Linux's C{TCP_FASTOPEN}, on a listening socket: the queue of pending
#: Fast Open requests.
TCP_FASTOPEN = 23
#: Linux's C{SO_MARK}.
SO_MARK = 36

SocketOption = tuple[int, int, int]


def fastOpenConnect() -> SocketOption:
    """
    The option that makes a client socket use TCP Fast Open.
    """
    return (socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)


def mark(value: int) -> SocketOption:
    """
    The option that sets a socket's firewall mark (needs CAP_NET_ADMIN).
    """
    return (socket.SOL_SOCKET, SO_MARK, value)


def enableFastOpenListener(port: Any, queue: int = 256) -> bool:
    """
    Let a listening port accept TCP Fast Open SYNs (data in the SYN is
    delivered, and the connection accepted, at once).  The host must allow
    it: C{sysctl net.ipv4.tcp_fastopen} with bit 2 set (3 for client and
    server).

    @param port: A listening port with a C{socket} (Twisted's TCP ports).
    @return: Whether the option could be set.
    """
    sock = getattr(port, "socket", None)
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, queue)
    except OSError:
        return False
    return True


#: C{tcpi_state} of a socket whose SYN is sent and not yet answered.
TCP_SYN_SENT = 2
#: How often a Fast Open leg that must close early checks its handshake.
HANDSHAKE_POLL = 0.002


def handshakePending(transport: Any) -> bool:
    """
    Whether a TCP transport's handshake is still under way (C{SYN_SENT}).

    A Fast Open connection is reported as made before its SYN is even
    sent; shutting it down then (C{shutdown(2)} in C{SYN_SENT}) would
    discard it, bytes and all, so a leg that must close waits for this to
    be L{False}.
    """
    handle = getattr(transport, "getHandle", None)
    if handle is None:
        return False
    try:
        sock = handle()
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_SYN_SENT
    except (OSError, AttributeError, TypeError):
        return False


def usesFastOpen(transport: Any) -> bool:
    """
    Whether a client transport was connected with C{TCP_FASTOPEN_CONNECT}:
    for a transport of L{TunedTCPClientEndpoint} still connecting, from
    the options its socket was made with; otherwise asked of its socket.
    """
    options = getattr(getattr(transport, "connector", None), "_socketOptions", None)
    if options is not None:
        return _FAST_OPEN in options
    handle = getattr(transport, "getHandle", None)
    if handle is None:
        return False
    try:
        return bool(handle().getsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT))
    except (OSError, AttributeError, TypeError):
        return False


@implementer(IProtocolFactory)
class _Connecting:
    """
    The factory a L{TunedTCPClientEndpoint} connects with: it hands the
    transport the protocol C{wrapped} builds (Twisted's endpoints put a
    wrapping protocol between them, one more object per connection and one
    more call per read), and fires C{deferred} with it once it is
    connected.

    It lives as long as the connection (its connector keeps it), so it
    has C{__slots__}, and lets go of the Deferred and the wrapped factory
    once connected.

    @ivar deferred: Fires with the connected protocol, or fails with the
        connection error (L{error.ConnectingCancelledError} when
        cancelled); L{None} once fired.
    """

    __slots__ = ("_wrapped", "_connector", "deferred")

    noisy = False

    def __init__(self, wrapped: IProtocolFactory) -> None:
        self._wrapped: IProtocolFactory | None = wrapped
        self._connector: Any = None
        self.deferred: Deferred | None = Deferred(self._cancel)

    def _cancel(self, deferred: Deferred) -> None:
        deferred.errback(error.ConnectingCancelledError(self._connector.getDestination()))
        self._connector.stopConnecting()

    def doStart(self) -> None:
        """
        Passed on to the wrapped factory.
        """
        if self._wrapped is not None:
            self._wrapped.doStart()

    def doStop(self) -> None:
        """
        Passed on to the wrapped factory, if still connecting.
        """
        if self._wrapped is not None:
            self._wrapped.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        """
        The wrapped factory's protocol; a failure or L{None} fails the
        attempt.
        """
        try:
            protocol = self._wrapped.buildProtocol(addr)  # type: ignore[union-attr]
            if protocol is None:
                raise error.NoProtocol()
        except BaseException:
            self._fire(None)
            return None
        return protocol

    def _fire(self, result: Any) -> None:
        d, self.deferred = self.deferred, None
        if d is None or d.called:
            return
        if result is None:
            d.errback()
        else:
            d.callback(result)

    def connected(self, protocol: Any) -> None:
        """
        The transport connected C{protocol}: fire, and let go.
        """
        self._wrapped = None
        d, self.deferred = self.deferred, None
        if d is not None and not d.called:
            d.callback(protocol)

    def startedConnecting(self, connector: Any) -> None:
        """
        Remember the connector, to cancel the attempt.
        """
        self._connector = connector

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        """
        Fail the attempt.
        """
        d, self.deferred = self.deferred, None
        if d is not None and not d.called:
            d.errback(reason)

    def clientConnectionLost(self, connector: Any, reason: Any) -> None:
        """
        The connection ended: the protocol was told.
        """


class _AttemptOver:
    """
    The connector of a L{_TunedClient} connected through L{_Connecting}:
    the end of its connection concerns no factory (L{_Connecting} does
    nothing then).
    """

    __slots__ = ()

    def connectionLost(self, reason: Any) -> None:
        """
        Nothing to tell.
        """


_ATTEMPT_OVER = _AttemptOver()


#: C{connect()} results that mean the attempt is under way.
_CONNECTING = frozenset((EINPROGRESS, EALREADY, EWOULDBLOCK))
#: C{connect()} results that mean the attempt is under way or done.
_CONNECT_UNDER_WAY = _CONNECTING | {0, EISCONN}
_FAST_OPEN = fastOpenConnect()


class _Target:
    """
    Where a L{TunedTCPClientEndpoint} connects, worked out once for all its
    connections: Twisted's client and connector parse the host again at
    each connection (is it an IPv4 literal? an IPv6 one?).

    @ivar clientClass: The transport class for the address family.
    @ivar addr: The address C{connect()} is given (for IPv6, the 4-tuple).
    @ivar realAddress: The address as C{getPeer} reports it (for IPv6, the
        host with its scope, as Twisted's C{_setRealAddress} has it).
    """

    __slots__ = ("clientClass", "addr", "realAddress")

    def __init__(self, clientClass: type, addr: tuple, realAddress: tuple) -> None:
        self.clientClass = clientClass
        self.addr = addr
        self.realAddress = realAddress


def _targetFor(host: str, port: int) -> _Target | None:
    """
    The L{_Target} of an IPv4 or IPv6 address literal, or L{None} for
    anything else (a name: Twisted's client resolves it).
    """
    try:
        socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        pass
    else:
        if host.count(".") == 3:
            return _Target(_TunedClient, (host, port), (host, port))
    try:
        socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        addr = tcp._resolveIPv6(host, port)
    except (OSError, ValueError):
        return None
    scoped = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
    return _Target(_TunedClient6, addr, (scoped, *addr[1:]))


class _TunedClient(tcp.Client):
    # The options are the connector's: a transport has about 20 attributes
    # of its own, and one more past 21 costs each connection its share of
    # the class's dict keys (some 600 bytes).

    def __init__(
        self, host: str, port: int, bindAddress: Any, connector: Any, reactor: Any = None
    ) -> None:
        target = connector._target
        if target is None or bindAddress is not None:
            # A name, or a bind address: Twisted's own checks.
            super().__init__(host, port, bindAddress, connector, reactor)
            return
        # tcp.Client.__init__ for an address literal and no bind address,
        # with the address worked out once per endpoint.
        self.connector = connector
        self.addr = target.addr
        self._requiresResolution = False
        try:
            skt = self.createInternetSocket()
        except OSError as e:
            self._finishInit(None, None, error.ConnectBindError(e.args[0], e.args[1]), reactor)
            return
        self._finishInit(self.resolveAddress, skt, None, reactor)

    def _finishInit(self, whenDone: Any, skt: Any, err: Any, reactor: Any) -> None:
        # Twisted calls connect() in the next reactor iteration, so that
        # nothing happens before connectTCP returns.  An early leg's SYN
        # should leave now: the SYN that began the flow is still being
        # handled.  Only the system call moves; what follows from it (a
        # failure, or the connection being made) still happens in the next
        # iteration, from doConnect, which calls connect() again and reads
        # the outcome (EALREADY: still under way; EISCONN: done; on
        # loopback the handshake is over by then).  Under way, that
        # doConnect is called directly: without Twisted's resolveAddress,
        # its Deferred and _setRealAddress, which only lead to it.
        if whenDone and not self._requiresResolution:
            try:
                result = skt.connect_ex(self.addr)
            except OSError as e:
                result = e.args[0]
            connector = self.connector
            target = connector._target
            if result in _CONNECTING and target is not None:
                self._commonConnection.__init__(self, skt, None, reactor)
                self.realAddress = target.realAddress
                # The connector's timeout waits for doConnect to find the
                # handshake still under way (see _TunedConnector.connect).
                connector._timeoutLater = True
                reactor.callLater(0, self.doConnect)
                return
            if result not in _CONNECT_UNDER_WAY:
                # Fail in the next iteration, as Twisted would; the socket
                # is not used again.
                super()._finishInit(
                    None, skt, error.getConnectError((result, os.strerror(result))), reactor
                )
                skt.close()
                return
        super()._finishInit(whenDone, skt, err, reactor)

    def doConnect(self) -> None:
        """
        Twisted's C{doConnect}, except once connected: a socket that waited
        for the handshake stays registered for reading (C{_connectDone}
        registers it for reading anyway) and only stops waiting to be
        writable, one C{epoll_ctl} instead of three.
        """
        self.doWrite = self.doRead = self.doConnect
        if not hasattr(self, "connector"):
            # The attempt failed, with doConnect still to come from the
            # delayed call _finishInit made.
            return
        skt = self.socket
        err = skt.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.failIfNotConnected(error.getConnectError((err, os.strerror(err))))
            return
        try:
            result = skt.connect_ex(self.realAddress)
        except OSError as e:
            result = e.args[0]
        if result in _CONNECTING:
            self.startReading()
            self.startWriting()
            self.connector.startTimeout()
            return
        if result not in _CONNECT_UNDER_WAY:
            self.failIfNotConnected(error.getConnectError((result, os.strerror(result))))
            return
        del self.doWrite
        del self.doRead
        self.stopWriting()
        self._connectDone()

    def _connectDone(self) -> None:
        super()._connectDone()
        factory = self.connector.factory
        if isinstance(factory, _Connecting):
            factory.connected(self.protocol)
            # The attempt is over: let go of the connector and the factory
            # (as Twisted does once an attempt fails), instead of holding
            # them, some 250 bytes, as long as the connection.
            self.connector = _ATTEMPT_OVER

    def createInternetSocket(self) -> socket.socket:
        """
        The connection's socket, with the endpoint's options set before it
        connects.
        """
        # tcp.Client creates its socket in __init__, once it has its
        # connector.
        sock = super().createInternetSocket()
        connector = self.connector
        for level, name, value in connector._socketOptions:
            sock.setsockopt(level, name, value)
        if connector._onSocket is not None:
            connector._onSocket(sock)
        return sock


class _TunedClient6(_TunedClient):
    # An IPv6 literal's transport: what tcp.Client.__init__ sets on the
    # instance, here on the class (so that both families' transports have
    # the same instance attributes).
    addressFamily = socket.AF_INET6
    _addressType = address.IPv6Address


class _TunedConnector(tcp.Connector):
    def __init__(self, endpoint: TunedTCPClientEndpoint, factory: Any) -> None:
        self._socketOptions = endpoint.options
        self._onSocket = endpoint.onSocket
        target = self._target = endpoint._target
        if target is None:
            # A name (or a service name for a port): Twisted's own checks.
            super().__init__(
                endpoint._host, endpoint._port, factory, endpoint._timeout,
                endpoint._bindAddress, endpoint._reactor,
            )
            return
        # What tcp.Connector.__init__ sets, from what the endpoint worked
        # out once.
        self.host = endpoint._host
        self.port = endpoint._port
        self.bindAddress = endpoint._bindAddress
        if target.clientClass is _TunedClient6:
            self._addressType = address.IPv6Address
        base.BaseConnector.__init__(self, factory, endpoint._timeout, endpoint._reactor)

    #: Whether the timeout is left to L{startTimeout}.
    _timeoutLater = False

    def connect(self) -> None:
        """
        Start connecting, as L{base.BaseConnector.connect} does, except
        for the timeout of a connection whose transport calls its first
        C{doConnect} itself (see L{_TunedClient._finishInit}): that delayed
        call is only made if the handshake is still under way then
        (L{startTimeout}), for the time left.  On loopback, and to any next
        hop that answers within a reactor iteration, a connection then
        makes and cancels no delayed call of 30 seconds, which would stay
        in the reactor's heap of delayed calls until it is cleaned out.
        """
        if self.state != "disconnected":
            raise RuntimeError("can't connect in this state")
        self.state = "connecting"
        if not self.factoryStarted:
            self.factory.doStart()
            self.factoryStarted = 1
        self._started = self.reactor.seconds()
        transport = self.transport = self._makeTransport()
        if self.timeout is not None and not self._timeoutLater:
            self.timeoutID = self.reactor.callLater(
                self.timeout, transport.failIfNotConnected, error.TimeoutError()
            )
        self.factory.startedConnecting(self)

    def startTimeout(self) -> None:
        """
        The handshake is still under way: fail the attempt if it is not
        over C{timeout} seconds after it started.
        """
        if self.timeout is None or self.timeoutID is not None or self.state != "connecting":
            return
        left = max(0.0, self._started + self.timeout - self.reactor.seconds())
        self.timeoutID = self.reactor.callLater(
            left, self.transport.failIfNotConnected, error.TimeoutError()
        )

    def _makeTransport(self) -> tcp.Client:
        target = self._target
        cls = _TunedClient if target is None else target.clientClass
        return cls(self.host, self.port, self.bindAddress, self, self.reactor)


@implementer(IStreamClientEndpoint)
class TunedTCPClientEndpoint:
    """
    A TCP client endpoint (IPv4 or IPv6 address literal) that sets socket
    options before connecting.

    @ivar options: C{(level, name, value)} triples for C{setsockopt}.
    @ivar onSocket: Called with the socket once its options are set and
        before it connects (or is bound to C{bindAddress}); it may bind the
        socket itself (then give no C{bindAddress}).
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        options: Sequence[SocketOption] = (),
        timeout: float = 30,
        bindAddress: tuple[str, int] | None = None,
        onSocket: Callable[[socket.socket], None] | None = None,
    ) -> None:
        self.onSocket = onSocket
        self._reactor = reactor
        self._host = host
        self._port = port
        self.options = tuple(options)
        self._timeout = timeout
        self._bindAddress = bindAddress
        self._target = _targetFor(host, port) if isinstance(port, int) else None

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:
        """
        Connect C{protocolFactory}; see L{IStreamClientEndpoint.connect}.

        @raise OSError: From C{setsockopt}, as a failed L{Deferred}.
        """
        try:
            wrapped = _Connecting(protocolFactory)
            connector = _TunedConnector(self, wrapped)
            d = wrapped.deferred
            connector.connect()
            return d
        except BaseException:
            from twisted.internet.defer import fail

            return fail()
