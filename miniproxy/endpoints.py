# -*- test-case-name: tests.test_endpoints -*-
"""
Server endpoints for intercepted (transparent) flows.

A C{tproxy} listener accepts connections that the kernel's TPROXY target
(C{nft ... tproxy to :PORT}) steered to it although they were addressed to
somewhere else.  Its socket needs C{IP_TRANSPARENT} (C{IPV6_TRANSPARENT}
for IPv6), which needs C{CAP_NET_ADMIN}; an accepted socket's local address
then is the client's original destination (see
L{miniproxy.listener.originalDestination}).

The string syntax, for L{twisted.internet.endpoints.serverFromString} (the
parser is registered as a plugin in C{twisted/plugins/miniproxy_endpoints.py})::

    tproxy:port=8080[:interface=0.0.0.0][:backlog=1024]
    tproxy:8080                                  # the port may be positional
    tproxy:port=8080:interface=\\:\\:               # IPv6: escape the colons

The socket is IPv6 when the interface contains a colon.  The port may be 0
(the kernel picks one; the listening port's C{getHost()} tells which).

The kernel side of interception, for IPv4 (IPv6 is the same with C{ip6},
C{ip -6} and C{::/0})::

    nft add table ip mp
    nft add chain ip mp pre '{ type filter hook prerouting priority mangle; }'
    nft add rule ip mp pre tcp dport 80 tproxy to :8080 meta mark set 1 accept
    ip rule add fwmark 1 lookup 100
    ip route add local 0.0.0.0/0 dev lo table 100
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorSocket,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

#: C{setsockopt(SOL_IP, IP_TRANSPARENT)}: accept and send for non-local
#: addresses (linux/in.h).
IP_TRANSPARENT: int = getattr(socket, "IP_TRANSPARENT", 19)
#: C{setsockopt(SOL_IPV6, IPV6_TRANSPARENT)} (linux/in6.h).
IPV6_TRANSPARENT: int = getattr(socket, "IPV6_TRANSPARENT", 75)

#: The interface a C{tproxy} listener binds when none is given.
DEFAULT_INTERFACE = "0.0.0.0"
#: The C{listen(2)} backlog when none is given.
DEFAULT_BACKLOG = 1024
#: The largest backlog accepted (the kernel caps it at C{net.core.somaxconn}).
MAX_BACKLOG = 65535

#: What the C{tproxy} syntax knows, in the order of the usage message.
KNOWN_PARAMETERS = ("port", "interface", "backlog")

#: The message of the C{EPERM} that setting C{IP_TRANSPARENT} gives a
#: process without the capability.
CAPABILITY_MESSAGE = (
    "IP_TRANSPARENT needs CAP_NET_ADMIN: run miniproxy as root, or grant it "
    "the capability (setcap cap_net_admin+ep, or AmbientCapabilities="
    "CAP_NET_ADMIN in a systemd unit)"
)

_USAGE = "tproxy:port=PORT[:interface=ADDRESS][:backlog=N]"
_DIGITS = re.compile(r"[0-9]+")


class EndpointStringError(ValueError):
    """
    A C{tproxy} endpoint description is bad.  The message says what and
    shows the syntax.

    It is a L{ValueError}, as L{serverFromString} raises for bad
    descriptions.
    """


def _bad(message: str) -> EndpointStringError:
    return EndpointStringError(f"bad tproxy endpoint: {message} (syntax: {_USAGE})")


def _wholeNumber(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise _bad(f"{name} must be a whole number, not {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
    else:
        raise _bad(f"{name} must be a whole number, not {value!r}")
    if not low <= number <= high:
        raise _bad(f"{name} must be {low} to {high}, not {value!r}")
    return number


def parsePort(value: object) -> int:
    """
    Check a listening port: a whole number from 0 (any free port) to 65535.

    @param value: The port, as the description's text or an L{int}.
    @return: The port.
    @raise EndpointStringError: If it is not one.
    """
    return _wholeNumber(value, "port", 0, 65535)


def parseBacklog(value: object) -> int:
    """
    Check a C{listen(2)} backlog: a whole number from 1 to L{MAX_BACKLOG}.

    @param value: The backlog, as text or an L{int}.
    @return: The backlog.
    @raise EndpointStringError: If it is not one.
    """
    return _wholeNumber(value, "backlog", 1, MAX_BACKLOG)


def parseInterface(value: object) -> str:
    """
    Check the address a transparent listener binds: an IPv4 or IPv6
    literal (IPv6 may carry a C{%scope}).  Host names are refused: what
    TPROXY steers to a listener must not depend on name resolution.

    @param value: The address.
    @return: The address, unchanged.
    @raise EndpointStringError: If it is not an IP literal.
    """
    if not isinstance(value, str) or not value:
        raise _bad(f"interface must be an IP address, not {value!r}")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise _bad(
            f"interface must be an IPv4 or IPv6 address (escape an IPv6 "
            f"address's colons with backslashes), not {value!r}"
        ) from None
    return value


@implementer(IStreamServerEndpoint)
class TransparentServerEndpoint:
    """
    Listens on a TCP socket with C{IP_TRANSPARENT} set, so that connections
    TPROXY steers to it are accepted whatever address they were sent to.

    Each L{listen} makes, binds and listens on a new socket, then hands it
    to the reactor with L{IReactorSocket.adoptStreamPort}, which keeps a
    duplicate; the endpoint closes its own copy at once.

    @ivar port: The port to bind (0: any free port).
    @ivar interface: The address to bind.
    @ivar backlog: The C{listen(2)} backlog.
    @ivar addressFamily: C{AF_INET6} when C{interface} contains a colon,
        otherwise C{AF_INET}.
    """

    #: Makes the socket (replaced in tests).
    _socketFactory: Callable[..., Any] = socket.socket

    def __init__(
        self,
        reactor: IReactorSocket,
        port: int,
        interface: str = DEFAULT_INTERFACE,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        """
        @param reactor: The reactor that adopts the listening socket.
        @param port: See L{parsePort}.
        @param interface: See L{parseInterface}.
        @param backlog: See L{parseBacklog}.
        @raise EndpointStringError: If a value is bad.
        """
        self._reactor = reactor
        self.port = parsePort(port)
        self.interface = parseInterface(interface)
        self.backlog = parseBacklog(backlog)
        self.addressFamily = socket.AF_INET6 if ":" in self.interface else socket.AF_INET

    def __repr__(self) -> str:
        return (
            f"<TransparentServerEndpoint interface={self.interface} "
            f"port={self.port} backlog={self.backlog}>"
        )

    def listen(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        """
        Listen for intercepted connections with C{protocolFactory}.

        @return: A L{Deferred} that fires with the L{IListeningPort}, or
            fails with L{CannotListenError} (whose C{socketError} is a
            L{PermissionError} saying C{CAP_NET_ADMIN} is needed when the
            process lacks it).
        """
        try:
            sock = self._listeningSocket()
        except BaseException:
            return defer.fail()
        try:
            port = self._reactor.adoptStreamPort(
                sock.fileno(), self.addressFamily, protocolFactory
            )
        except BaseException:
            return defer.fail()
        finally:
            # The reactor keeps a duplicate of the descriptor.
            sock.close()
        return defer.succeed(port)

    def _listeningSocket(self) -> Any:
        """
        Make, set up, bind and listen on the socket.

        @raise CannotListenError: If any step fails; the socket is closed.
        """
        try:
            sock = self._socketFactory(self.addressFamily, socket.SOCK_STREAM)
        except OSError as e:
            raise CannotListenError(self.interface, self.port, e) from e
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.addressFamily == socket.AF_INET6:
                level, option = socket.IPPROTO_IPV6, IPV6_TRANSPARENT
            else:
                level, option = socket.SOL_IP, IP_TRANSPARENT
            try:
                sock.setsockopt(level, option, 1)
            except OSError as e:
                if e.errno == errno.EPERM:
                    raise CannotListenError(
                        self.interface,
                        self.port,
                        PermissionError(errno.EPERM, CAPABILITY_MESSAGE),
                    ) from None
                raise
            if self.addressFamily == socket.AF_INET6:
                sock.bind((self.interface, self.port, 0, 0))
            else:
                sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except CannotListenError:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            raise CannotListenError(self.interface, self.port, e) from e
        except BaseException:
            sock.close()
            raise
        return sock


@implementer(IPlugin, IStreamServerEndpointStringParser)
class TransparentServerParser:
    """
    Parses C{tproxy:} server endpoint descriptions into
    L{TransparentServerEndpoint}s.  An instance is the plugin in
    C{twisted/plugins/miniproxy_endpoints.py}.

    @ivar prefix: See L{IStreamServerEndpointStringParser.prefix}.
    """

    prefix = "tproxy"

    def parseStreamServer(
        self, reactor: IReactorSocket, *args: str, **kwargs: str
    ) -> TransparentServerEndpoint:
        """
        See L{IStreamServerEndpointStringParser.parseStreamServer}.

        @param args: At most one positional part: the port.
        @param kwargs: C{port}, C{interface} and C{backlog}.
        @raise EndpointStringError: Saying what is missing, unknown or bad.
        """
        unknown = sorted(set(kwargs) - set(KNOWN_PARAMETERS))
        if unknown:
            raise _bad(
                f"unknown parameter {unknown[0]!r} (known: {', '.join(KNOWN_PARAMETERS)})"
            )
        args = tuple(a for a in args if a != "")
        if len(args) > 1:
            raise _bad(f"too many positional parts: {list(args)!r}")
        if args:
            if "port" in kwargs:
                raise _bad("the port is given twice")
            kwargs = dict(kwargs, port=args[0])
        if "port" not in kwargs:
            raise _bad("missing port")
        return TransparentServerEndpoint(
            reactor,
            parsePort(kwargs["port"]),
            parseInterface(kwargs.get("interface", DEFAULT_INTERFACE)),
            parseBacklog(kwargs.get("backlog", DEFAULT_BACKLOG)),
        )
