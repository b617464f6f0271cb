# -*- test-case-name: tests.test_address -*-
"""
Addresses a flow deals in: host/port pairs, next hops, and where a
destination came from.
"""

from __future__ import annotations

import ipaddress
from enum import Enum

from attrs import field, frozen

from miniproxy.errors import ConfigError


class DestinationSource(Enum):
    """
    Where a flow's final destination came from.

    @cvar STATIC: The operator configured it (C{--to}, or a listener's
        C{to}).  Trusted.
    @cvar TRANSPARENT: The original destination of an intercepted flow
        (TPROXY or a NAT redirect).  Needs a policy decision.
    @cvar EXPLICIT: Carried by the flow itself (a PROXY header, a TCP
        option).  Needs a policy decision.
    @cvar NONE: Not known yet.
    """

    STATIC = "static"
    TRANSPARENT = "transparent"
    EXPLICIT = "explicit"
    NONE = "none"


#: The carriers of an explicit destination a next hop can write
#: (C{carry=} in a next hop description).
NEXT_HOP_CARRIERS = ("proxy-v2", "tcp-option")


@frozen
class HostPort:
    """
    A host (an IP address literal or a name) and a TCP port.

    @ivar host: The host.
    @ivar port: The port, 0 to 65535.
    """

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def fromAddress(cls, address: object) -> HostPort:
        """
        Convert a Twisted L{twisted.internet.address.IPv4Address} or
        L{twisted.internet.address.IPv6Address}.  An IPv4 peer of a
        dual-stack IPv6 socket (C{::ffff:a.b.c.d}) is the IPv4 address it
        is, so that logs, per-source limits and policy see one address.
        """
        host = address.host  # type: ignore[attr-defined]
        if host.startswith("::ffff:") and "." in host:
            try:
                mapped = ipaddress.IPv6Address(host).ipv4_mapped
            except ValueError:
                mapped = None
            if mapped is not None:
                host = str(mapped)
        return cls(host, address.port)  # type: ignore[attr-defined]

    def ipAddress(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """
        The host as an L{ipaddress} object, or L{None} if it is a name.
        """
        try:
            return ipaddress.ip_address(self.host.split("%", 1)[0])
        except ValueError:
            return None


def ipText(packed: bytes) -> str:
    """
    The canonical text of a packed IPv4 (4 bytes) or IPv6 (16 bytes)
    address, as L{ipaddress} writes it.
    """
    return str(ipaddress.ip_address(packed))


def _port(value: object, what: str) -> int:
    try:
        port = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: port must be an integer, not {value!r}")
    if not 0 < port < 65536:
        raise ConfigError(f"{what}: port must be 1 to 65535, not {port}")
    return port


def splitEndpointDescription(description: str) -> tuple[str, list[str], dict[str, str]]:
    """
    Split an endpoint description in Twisted's syntax,
    C{"kind:pos1:pos2:key=value"}, where a backslash escapes the next
    character (a C{:} within a value, say).

    @return: The kind, the positional arguments and the keyword arguments
        (the last of a repeated key wins).
    """
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    kind = parts[0]
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for part in parts[1:]:
        if "=" in part:
            key, value = part.split("=", 1)
            kwargs[key] = value
        else:
            args.append(part)
    return kind, args, kwargs


@frozen
class NextHop:
    """
    What an outgoing leg connects to.

    @ivar address: The host and port to connect to.
    @ivar tls: Whether to speak TLS on the outgoing leg.  The server's
        certificate is verified against C{tlsHostname} with service-identity.
    @ivar tlsHostname: The name to verify (and send as SNI); defaults to the
        host.
    @ivar caCertificates: A path to a PEM file of trusted CA certificates, or
        L{None} for the platform's trust store.
    @ivar bindAddress: A local address to bind the outgoing socket to, or
        L{None}.
    @ivar fastOpen: Whether to connect with TCP Fast Open
        (C{TCP_FASTOPEN_CONNECT}): the SYN then waits for the first bytes
        and carries them once the kernel holds a cookie for the server.
        Plain TCP to an address literal only.
    @ivar carry: The carrier of the flow's explicit destination to write on
        the outgoing leg, or L{None}.  C{"proxy-v2"} writes a PROXY
        protocol v2 header (see L{miniproxy.carriers}) as the leg's very
        first bytes: the flow's origin (or client) as its source and the
        flow's destination as its destination, so that the next proxy (a
        miniproxy listener with C{explicit = ["proxy-v2"]}, or HAProxy with
        C{accept-proxy}) learns both.  Only this hop is told: the hops of a
        policy C{chain} after it are not encoded, each proxy's own policy
        picks its next hop.  Plain TCP next hops only (on a TLS hop the
        header would have to precede the handshake).
    """

    address: HostPort
    tls: bool = False
    tlsHostname: str | None = None
    caCertificates: str | None = None
    bindAddress: str | None = field(default=None)
    fastOpen: bool = False
    carry: str | None = None

    def __str__(self) -> str:
        return ("tls:" if self.tls else "tcp:") + str(self.address)

    @classmethod
    def fromString(cls, description: str) -> NextHop:
        """
        Parse a client endpoint description, in Twisted's syntax.

        Accepted forms::

            tcp:host=HOST:port=PORT[:bindAddress=ADDR][:fastopen=yes]
                [:carry=proxy-v2]
            tcp:HOST:PORT
            tls:host=HOST:port=PORT[:hostname=NAME][:trustRoots=PEMFILE]
            tls:HOST:PORT

        An IPv6 literal is written with its colons escaped (C{tcp:host=\\:\\:1
        :port=80}) or in brackets (C{tcp:host=[::1]:port=80}).

        @raise ConfigError: If the description is not one of these.
        """
        if not isinstance(description, str) or not description:
            raise ConfigError(f"bad next hop {description!r}: empty")
        bracketed = description.replace("[", "\x00").replace("]", "\x01")
        # Allow "[::1]" by escaping the colons inside brackets.
        out = []
        inside = False
        for ch in bracketed:
            if ch == "\x00":
                inside = True
            elif ch == "\x01":
                inside = False
            elif ch == ":" and inside:
                out.append("\\:")
            else:
                out.append(ch)
        kind, args, kwargs = splitEndpointDescription("".join(out))
        where = f"bad next hop {description!r}"
        if kind not in ("tcp", "tls"):
            raise ConfigError(f"{where}: kind must be tcp or tls, not {kind!r}")
        known = {"host", "port", "bindAddress", "fastopen", "carry"}
        if kind == "tls":
            known |= {"hostname", "trustRoots"}
        unknown = set(kwargs) - known
        if unknown:
            raise ConfigError(f"{where}: unknown parameter {sorted(unknown)[0]!r}")
        if len(args) > 2:
            raise ConfigError(f"{where}: too many positional parts")
        if args:
            kwargs.setdefault("host", args[0])
        if len(args) > 1:
            kwargs.setdefault("port", args[1])
        host = kwargs.get("host")
        if not host:
            raise ConfigError(f"{where}: no host")
        if "port" not in kwargs:
            raise ConfigError(f"{where}: no port")
        port = _port(kwargs["port"], where)
        fastOpen = kwargs.get("fastopen", "no")
        if fastOpen not in ("yes", "no"):
            raise ConfigError(f"{where}: fastopen must be yes or no, not {fastOpen!r}")
        if fastOpen == "yes" and kind == "tls":
            raise ConfigError(f"{where}: fastopen is for plain tcp next hops")
        carry = kwargs.get("carry")
        if carry is not None and carry not in NEXT_HOP_CARRIERS:
            raise ConfigError(
                f"{where}: carry must be one of {', '.join(NEXT_HOP_CARRIERS)}, "
                f"not {carry!r}"
            )
        if carry is not None and kind == "tls":
            raise ConfigError(
                f"{where}: carry is for plain tcp next hops (a PROXY header "
                f"would have to precede the TLS handshake)"
            )
        return cls(
            HostPort(host, port),
            tls=(kind == "tls"),
            tlsHostname=kwargs.get("hostname"),
            caCertificates=kwargs.get("trustRoots"),
            bindAddress=kwargs.get("bindAddress"),
            fastOpen=(fastOpen == "yes"),
            carry=carry,
        )

    @classmethod
    def direct(cls, destination: HostPort) -> NextHop:
        """
        Connect straight to C{destination} over plain TCP.
        """
        return cls(destination)
