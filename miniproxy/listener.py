# -*- test-case-name: tests.test_listener -*-
"""
A listener: its settings, and the context its flows share at run time.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Callable, Sequence

from attrs import field, frozen
from twisted.logger import Logger

from miniproxy.accesslog import logFlow, logRefusedAtAccept
from miniproxy.address import DestinationSource, HostPort, NextHop, splitEndpointDescription
from miniproxy.connect import Dialer
from miniproxy.errors import ConfigError
from miniproxy.flowtable import FlowTable
from miniproxy.interfaces import IFlowHandlerFactory, ISocketTuner
from miniproxy.limits import Limits

_log = Logger(namespace="miniproxy.listener")

#: getsockopt(SOL_IP, SO_ORIGINAL_DST): where a NAT-redirected flow was going.
SO_ORIGINAL_DST = 80
#: The same for IPv6 (IP6T_SO_ORIGINAL_DST).
IP6T_SO_ORIGINAL_DST = 80

#: The endpoint kinds a worker group can share (L{miniproxy.workers}), and
#: the ones L{parseListenDescription} reads.
SHARED_KINDS = ("tcp", "tcp6", "tproxy")


def parseListenDescription(description: str) -> tuple[str, str, int, int | None]:
    """
    Read a C{tcp}, C{tcp6} or C{tproxy} server endpoint description.

    @return: C{(kind, interface, port, backlog)}; the backlog is L{None}
        when the description gives none.
    @raise ConfigError: If it is of another kind or malformed.
    """
    kind, positional, keywords = splitEndpointDescription(description)
    if kind not in SHARED_KINDS:
        raise ConfigError(
            f"listen {description!r}: with workers, a listener must be one of "
            f"{', '.join(SHARED_KINDS)}"
        )
    unknown = set(keywords) - {"port", "interface", "backlog"}
    if unknown or len(positional) > 1 or (positional and "port" in keywords):
        raise ConfigError(f"listen {description!r}: cannot be shared by workers")
    default = {"tcp": "", "tcp6": "::", "tproxy": "0.0.0.0"}[kind]
    try:
        port = int(positional[0] if positional else keywords["port"])
        backlog = int(keywords["backlog"]) if "backlog" in keywords else None
    except (KeyError, ValueError):
        raise ConfigError(f"listen {description!r}: bad or missing port or backlog") from None
    return kind, keywords.get("interface", default), port, backlog


@frozen
class ListenerSettings:
    """
    What the operator configured for one listener.

    @ivar endpoint: The server endpoint description (Twisted syntax), such as
        C{tcp:8080:interface=127.0.0.1} or C{tproxy:port=8080}.
    @ivar mode: The connect mode (a L{miniproxy.flow.ConnectMode} value).
    @ivar to: The static next hop, or L{None} for a transparent listener or
        one whose functions choose the next hop.
    @ivar transparent: Whether flows are intercepted and their original
        destination is their destination.
    @ivar synTap: Whether, in C{early} mode, a SYN tap starts flows at the
        client's SYN (when the process has C{CAP_NET_RAW}).
    @ivar synPorts: For a transparent listener, the intercepted destination
        ports whose SYNs the tap watches (its own port is never the SYN's
        destination there).
    @ivar explicit: The carriers of an explicit destination this listener
        reads: C{"tcp-option"} (the flow address TCP option in the SYN),
        C{"proxy-v2"} (a PROXY protocol v2 header, the first bytes of every
        flow; see L{miniproxy.carriers}).
    @ivar trusted: The networks whose explicit carriers are believed;
        a carrier from anyone else refuses the flow.
    @ivar fastOpen: Whether the listening socket accepts TCP Fast Open
        SYNs (C{TCP_FASTOPEN}); the host's C{net.ipv4.tcp_fastopen} sysctl
        must have bit 2 set too.
    """

    endpoint: str
    mode: Any
    to: NextHop | None = None
    transparent: bool = False
    functionNames: tuple[str, ...] = field(default=())
    synTap: bool = True
    synPorts: tuple[int, ...] = ()
    explicit: tuple[str, ...] = ()
    trusted: tuple[Any, ...] = ()
    fastOpen: bool = True


def originalDestination(transport: Any) -> HostPort:
    """
    The destination an intercepted client was connecting to.

    With TPROXY the accepted socket's local address already is it.  With a
    NAT redirect (C{nft ... redirect}/C{dnat}) the kernel keeps it as
    C{SO_ORIGINAL_DST}; when that is available and differs, it wins.

    An IPv4 flow accepted by a dual-stack IPv6 socket (its local address is
    IPv4-mapped, C{::ffff:a.b.c.d}) is IPv4: its conntrack entry is asked
    for at C{SOL_IP}, and the destination is given as the IPv4 address.
    """
    # fromAddress gives an IPv4-mapped address as the IPv4 address it is.
    host = HostPort.fromAddress(transport.getHost())
    ip = host.ipAddress()
    isIPv4 = ip is not None and ip.version == 4
    handle = getattr(transport, "getHandle", None)
    if handle is None:
        return host
    sock = handle()
    try:
        if sock.family == socket.AF_INET or isIPv4:
            # struct sockaddr_in: family, port (big-endian), address.
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return HostPort(socket.inet_ntop(socket.AF_INET, packed), port)
        if sock.family == socket.AF_INET6:
            # struct sockaddr_in6: family, port, flowinfo, address, scope.
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port, packed = struct.unpack_from("!2xH4x16s", raw)
            return HostPort(socket.inet_ntop(socket.AF_INET6, packed), port)
    except OSError:
        # Not NATed (ENOENT), or no conntrack: TPROXY's local address holds.
        pass
    return host


class ListenerContext:
    """
    What the flows of one listener share at run time.

    @ivar reactor: The reactor.
    @ivar settings: The listener's settings.
    @ivar mode: The connect mode.
    @ivar limits: The bounds.
    @ivar functions: The configured functions, in order, as C{(name,
        factory)} pairs.
    @ivar tuners: The functions that tune sockets.
    @ivar staticNextHop: The configured next hop, if any.
    @ivar transparent: Whether the listener intercepts flows.
    @ivar dialer: Connects outgoing legs.
    @ivar table: The service's open flows.
    @ivar onFlowClosed: Called with each flow once it is closed, after the
        access log line (for tests and metrics).
    @ivar accessLog: Takes each closed flow and writes its access-log line
        (see L{miniproxy.accesslog.accessLogFor}).
    @ivar early: The service's L{miniproxy.earlysyn.EarlySyns}, through
        which accepted legs claim the flows begun at their SYN, or L{None}.
    """

    early: Any = None

    def __init__(
        self,
        reactor: Any,
        settings: ListenerSettings,
        limits: Limits,
        functions: Sequence[tuple[str, IFlowHandlerFactory]],
        table: FlowTable,
        dialer: Dialer | None = None,
        onFlowClosed: Callable[[Any], None] | None = None,
        accessLog: Callable[[Any], None] = logFlow,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.mode = settings.mode
        self.limits = limits
        self.functions = tuple(functions)
        self.tuners = tuple(
            ISocketTuner(factory)
            for _, factory in self.functions
            if ISocketTuner.providedBy(factory)
        )
        self.staticNextHop = settings.to
        self.transparent = settings.transparent
        self.dialer = dialer if dialer is not None else Dialer(
            reactor, limits.connectTimeout
        )
        self.table = table
        self.onFlowClosed = onFlowClosed
        self.accessLog = accessLog

    def prepareFlow(self, flow: Any, transport: Any) -> str | None:
        """
        Fill in what the accepted transport tells about a new flow (begun
        at accept): the original destination of an intercepted flow.  On a
        listener that reads PROXY v2 headers, the flow is set to wait for
        its header (see L{miniproxy.carriers}).

        @return: L{None}, or why the flow must be refused (an untrusted peer
            on a listener that reads PROXY v2 headers).
        """
        if self.transparent and flow.destinationSource is DestinationSource.TRANSPARENT:
            flow.destination = originalDestination(transport)
        if "proxy-v2" in self.settings.explicit:
            from miniproxy.carriers import prepareAtAccept

            return prepareAtAccept(self, flow)
        return None

    def isTrusted(self, client: HostPort) -> bool:
        """
        Whether C{client} may tell this listener a flow's destination.
        """
        ip = client.ipAddress()
        if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip is not None and any(ip in net for net in self.settings.trusted)

    def prepareFlowAtSyn(self, flow: Any, segment: Any) -> str | None:
        """
        Fill in what the SYN tells about a new flow: an explicit destination
        carried in the flow address TCP option, or in a PROXY v2 header the
        SYN carries as data (TCP Fast Open).  On a listener that reads PROXY
        v2 headers, a flow whose SYN carries no complete header waits for it
        (see L{miniproxy.carriers}).

        @return: L{None}, or why the flow must be refused (a carrier from an
            untrusted peer, a malformed carrier).
        """
        refusal = self._tcpOptionAtSyn(flow, segment)
        if refusal is None and "proxy-v2" in self.settings.explicit:
            from miniproxy.carriers import prepareAtSyn

            refusal = prepareAtSyn(self, flow, segment)
        return refusal

    def _tcpOptionAtSyn(self, flow: Any, segment: Any) -> str | None:
        if "tcp-option" not in self.settings.explicit:
            return None
        from miniproxy.wire import tcpoption
        from miniproxy.wire.errors import MalformedInput

        try:
            option = tcpoption.find(list(segment.options))
        except MalformedInput as e:
            return f"malformed flow address option: {e}"
        if option is None:
            return None
        if not self.isTrusted(flow.client):
            return f"explicit destination from untrusted peer {flow.client.host}"
        flow.destination = option.destination
        flow.destinationSource = DestinationSource.EXPLICIT
        # A static "to" stays the next hop (the next proxy of a chain).
        return None

    def refusedAtAccept(self, host: str, reason: str) -> None:
        """
        A connection was refused before it became a flow.
        """
        logRefusedAtAccept(self.settings.endpoint, host, reason)

    def flowClosed(self, flow: Any) -> None:
        """
        A flow is closed: write its access log line.
        """
        self.accessLog(flow)
        if self.onFlowClosed is not None:
            self.onFlowClosed(flow)
