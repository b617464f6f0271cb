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

import socket
from typing import Any, Callable, Sequence

from twisted.internet import error, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import ClientFactory
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
    Whether a client transport was connected with C{TCP_FASTOPEN_CONNECT}.
    """
    handle = getattr(transport, "getHandle", None)
    if handle is None:
        return False
    try:
        return bool(handle().getsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT))
    except (OSError, AttributeError, TypeError):
        return False


class _Connecting(ClientFactory):
    """
    The factory a L{TunedTCPClientEndpoint} connects with: it hands the
    transport the protocol C{wrapped} builds (Twisted's endpoints put a
    wrapping protocol between them, one more object per connection and one
    more call per read), and fires C{deferred} with it once it is
    connected.

    @ivar deferred: Fires with the connected protocol, or fails with the
        connection error (L{error.ConnectingCancelledError} when
        cancelled).
    """

    noisy = False

    def __init__(self, wrapped: IProtocolFactory) -> None:
        self._wrapped = wrapped
        self._connector: Any = None
        self.deferred: Deferred = Deferred(self._cancel)

    def _cancel(self, deferred: Deferred) -> None:
        deferred.errback(error.ConnectingCancelledError(self._connector.getDestination()))
        self._connector.stopConnecting()

    def startedConnecting(self, connector: Any) -> None:
        """
        Remember the connector, to cancel the attempt.
        """
        self._connector = connector

    def doStart(self) -> None:
        """
        Passed on to the wrapped factory.
        """
        self._wrapped.doStart()

    def doStop(self) -> None:
        """
        Passed on to the wrapped factory.
        """
        self._wrapped.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        """
        The wrapped factory's protocol; a failure or L{None} fails the
        attempt.
        """
        try:
            protocol = self._wrapped.buildProtocol(addr)
            if protocol is None:
                raise error.NoProtocol()
        except BaseException:
            self.deferred.errback()
            return None
        return protocol

    def connected(self, protocol: Any) -> None:
        """
        The transport connected C{protocol}.
        """
        if not self.deferred.called:
            self.deferred.callback(protocol)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        """
        Fail the attempt.
        """
        if not self.deferred.called:
            self.deferred.errback(reason)


class _TunedClient(tcp.Client):
    def __init__(
        self,
        host: str,
        port: int,
        bindAddress: Any,
        connector: Any,
        reactor: Any,
        options: Sequence[SocketOption],
        onSocket: Callable[[socket.socket], None] | None = None,
    ) -> None:
        # tcp.Client creates its socket in __init__.
        self._socketOptions = options
        self._onSocket = onSocket
        super().__init__(host, port, bindAddress, connector, reactor)

    def _connectDone(self) -> None:
        super()._connectDone()
        factory = self.connector.factory
        if isinstance(factory, _Connecting):
            factory.connected(self.protocol)

    def createInternetSocket(self) -> socket.socket:
        sock = super().createInternetSocket()
        for level, name, value in self._socketOptions:
            sock.setsockopt(level, name, value)
        if self._onSocket is not None:
            self._onSocket(sock)
        return sock


class _TunedConnector(tcp.Connector):
    def __init__(
        self,
        *args: Any,
        options: Sequence[SocketOption],
        onSocket: Callable[[socket.socket], None] | None,
        **kwargs: Any,
    ) -> None:
        self._socketOptions = options
        self._onSocket = onSocket
        super().__init__(*args, **kwargs)

    def _makeTransport(self) -> tcp.Client:
        return _TunedClient(
            self.host, self.port, self.bindAddress, self, self.reactor,
            self._socketOptions, self._onSocket,
        )


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

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:
        """
        Connect C{protocolFactory}; see L{IStreamClientEndpoint.connect}.

        @raise OSError: From C{setsockopt}, as a failed L{Deferred}.
        """
        try:
            wrapped = _Connecting(protocolFactory)
            connector = _TunedConnector(
                self._host,
                self._port,
                wrapped,
                self._timeout,
                self._bindAddress,
                self._reactor,
                options=self.options,
                onSocket=self.onSocket,
            )
            connector.connect()
            return wrapped.deferred
        except BaseException:
            from twisted.internet.defer import fail

            return fail()
