# -*- test-case-name: tests.test_carriers -*-
"""
The PROXY protocol v2 header as the carrier of a flow's explicit
destination, on both legs.

Reading
=======

A listener with C{explicit = ["proxy-v2"]} and C{trusted = [CIDRs]}
expects every flow to begin with a PROXY v2 header (HAProxy's
C{send-proxy-v2}, or a miniproxy next hop with C{carry=proxy-v2}):

  - A flow from a peer outside C{trusted} is refused at once (at its SYN
    or at accept), whether or not it sends a header: nobody else may tell
    the proxy where to connect.
  - From a trusted peer the first bytes must be a valid v2 header of at
    most L{MAX_HEADER_LENGTH} bytes, complete within C{limits.synTimeout}
    seconds of the flow's start.  Anything else (a v1 text header, a bad
    signature, a truncated TLV, an oversize header, a FIN or a timeout
    before the header is complete) refuses the flow with a reason in the
    access log, and the client leg is closed (not reset).  The header may
    arrive in any number of reads; the bytes after it are the client's
    first bytes, relayed in order.  Header bytes are not counted in
    C{bytesFromClient}.
  - A C{PROXY} command for a TCP stream over IPv4 or IPv6 gives the flow
    its C{destination} (with L{DestinationSource.EXPLICIT}: a function, the
    policy, must allow it, or the flow is refused: no open relay) and its
    C{origin}, the original client, which the access log shows.  When the
    listener has a static C{to}, that stays the next hop (the next proxy
    of a chain) and the header's destination is still the flow's.  An
    IPv4-mapped IPv6 address is taken as the IPv4 address.
  - A destination address of C{0.0.0.0} or C{::} together with an
    C{AUTHORITY} TLV (type 0x02) names the destination by the TLV's host
    name and the header's destination port: this is how miniproxy's own
    writer passes on a destination it only knows by name.  Without the
    TLV such a destination is refused; with a real address the TLV is only
    kept (HAProxy sends the client's SNI there).
  - The C{LOCAL} command (a health check), and a C{PROXY} command with the
    C{UNSPEC} family, carry no destination: the flow goes on as one
    accepted without a header, to the listener's static C{to} or a policy
    next hop, and is refused (C{no destination}) without either.  A C{UNIX}
    or datagram header is refused.
  - The header, TLVs included, is kept as C{flow.proxyHeader} (a
    L{ProxyHeader}; C{flow.proxyHeader.tlv(TLVType.UNIQUE_ID)} reads one).

I{When}: a flow begun at its SYN by the SYN tap whose SYN carries the whole
header as data (TCP Fast Open) is given its destination right there, so
its outgoing leg starts at the SYN even across a chain of proxies; its
accepted leg then only checks and strips those bytes from the stream.
Otherwise the flow waits for the header: its early-SYN hooks run, and (in
C{early} mode) its outgoing leg starts, when the header is complete, the
earliest moment its destination is known (C{startedBy} is then C{accept}).

Writing
=======

A next hop with C{carry=proxy-v2} (C{tcp:host=H:port=P:carry=proxy-v2}, as
C{to}, a policy rule's C{next-hop} or an entry of its C{chain}) gets a v2
C{PROXY} header as the very first bytes of its outgoing leg, written when
the leg connects and before any byte of the flow, so that a Fast Open SYN
carries it.  Its source is the flow's C{origin} (when the flow itself came
with a header) or its client; its destination is the flow's destination,
or the next hop's address when the flow has none (a static C{to}: then the
next hop is the destination).  A destination known by name is written as
C{0.0.0.0} (or C{::}) with its port, and its name in an C{AUTHORITY} TLV;
a source and destination of different families are both written as IPv6
(IPv4-mapped).  Only the next hop is told: for a policy C{chain}, the
hops after the first are not encoded, each proxy's own policy picks its
next hop.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from miniproxy.address import DestinationSource, HostPort, NextHop
from miniproxy.wire.errors import MalformedInput
from miniproxy.wire.proxyv2 import (
    Command,
    Family,
    ProxyHeader,
    ProxyV2Parser,
    TLVType,
    Transport,
    encode,
)

_log = Logger(namespace="miniproxy.carriers")

#: The longest PROXY v2 header a listener reads, TLVs included.  HAProxy's
#: headers (addresses, a unique id, SSL details, an authority) fit well
#: below it.
MAX_HEADER_LENGTH = 4096

#: What the reason of a refused flow calls the carrier.
WHAT = "PROXY v2 header"

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class ICarrierReader(Interface):
    """
    Reads an explicit carrier at the start of a flow's client stream.  The
    flow passes every byte from the client through it until it is done
    (see L{miniproxy.flow.Flow.readCarrier}).
    """

    what = Attribute("L{str}: what is read, for the reason of a refusal.")
    done = Attribute("L{bool}: whether the carrier was read completely.")

    def feed(flow: Any, data: bytes) -> bytes | None:
        """
        Consume bytes from the client.

        @return: The bytes after the carrier, once C{done} (possibly
            empty); L{None} while more is needed, or once the reader
            refused the flow.
        """

    def stop() -> None:
        """
        The flow ended: give up whatever is pending (a timer).
        """


def _unmapped(hostPort: HostPort) -> HostPort:
    # One spelling per address: no scope, an IPv4-mapped address as IPv4.
    ip = hostPort.ipAddress()
    if ip is None:
        return hostPort
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return HostPort(str(ip), hostPort.port)


def hostName(value: bytes) -> str | None:
    """
    The host name in an C{AUTHORITY} TLV, in lower-case ASCII (an
    internationalised name in its A-label form), or L{None} if it is not
    a valid host name.
    """
    try:
        name = value.decode("utf-8").rstrip(".")
        name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    if not name or len(name) > 253:
        return None
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if labels[-1].isdigit():
        # An address spelled as a name is not a name.
        return None
    return name


def applyHeader(flow: Any, header: ProxyHeader) -> str | None:
    """
    Give C{flow} what a complete header from a trusted peer tells: its
    destination (explicit) and origin, and the header itself.

    @return: L{None}, or why the flow must be refused.
    """
    flow.proxyHeader = header
    if header.command is Command.LOCAL or header.family is Family.UNSPEC:
        # A health check, or a connection the sender cannot describe: no
        # destination; the flow goes on as if it came without a header.
        return None
    if header.family is Family.UNIX:
        return f"{WHAT} with UNIX addresses names no TCP destination"
    if header.transport is not Transport.STREAM:
        return f"{WHAT} is for {header.transport.name}, not a TCP stream"
    assert header.source is not None and header.destination is not None
    origin = _unmapped(header.source)
    destination = _unmapped(header.destination)
    ip = destination.ipAddress()
    if ip is not None and ip.is_unspecified:
        authority = header.tlv(TLVType.AUTHORITY)
        if authority is None:
            return f"{WHAT} names no destination ({destination})"
        name = hostName(authority)
        if name is None:
            return f"{WHAT} AUTHORITY {authority[:64]!r} is not a host name"
        destination = HostPort(name, destination.port)
    if destination.port == 0:
        return f"{WHAT} names destination port 0"
    flow.origin = origin
    flow.destination = destination
    flow.destinationSource = DestinationSource.EXPLICIT
    return None


@implementer(ICarrierReader)
class ProxyV2Reader:
    """
    Reads the PROXY v2 header that must begin a flow's client stream, in
    however many reads it comes, and applies it to the flow.

    @ivar done: Whether the header was read.
    """

    what = WHAT

    def __init__(
        self,
        flow: Any,
        reactor: Any,
        timeout: float,
        maxLength: int = MAX_HEADER_LENGTH,
    ) -> None:
        """
        @param flow: The flow whose header this reads.
        @param reactor: Where the deadline runs.
        @param timeout: Seconds the header may take to complete, from now;
            0 for no deadline.
        @param maxLength: The longest header accepted.
        """
        self._flow = flow
        self._parser = ProxyV2Parser(maxLength)
        self.done = False
        self._timer: Any = None
        if timeout:
            self._timer = reactor.callLater(timeout, self._timedOut, timeout)

    def _timedOut(self, timeout: float) -> None:
        self._timer = None
        if not self.done:
            self.done = True
            self._flow.refuse(f"no complete {WHAT} within {timeout:g}s")

    def stop(self) -> None:
        """
        See L{ICarrierReader.stop}.
        """
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def feed(self, flow: Any, data: bytes) -> bytes | None:
        """
        See L{ICarrierReader.feed}.
        """
        if self.done:
            return data
        try:
            header, rest = self._parser.feed(data)
            if header is None:
                return None
            self.done = True
            self.stop()
            refusal = applyHeader(flow, header)
        except MalformedInput as e:
            refusal = f"malformed {WHAT}: {e}"
        except Exception:
            # A bug here must not take the connection's read loop down.
            _log.failure("reading the {what} of {flow!r}", Failure(), what=WHAT, flow=flow)
            refusal = f"{WHAT} could not be read"
        if refusal is not None:
            self.done = True
            self.stop()
            flow.refuse(refusal)
            return None
        return rest


@implementer(ICarrierReader)
class SeenHeaderReader:
    """
    Strips from the client stream the header already read from the SYN's
    data (TCP Fast Open): the stream must begin with exactly those bytes.

    @ivar done: Whether all of them were stripped.
    """

    what = WHAT

    def __init__(self, seen: bytes) -> None:
        """
        @param seen: The header's bytes, as the SYN carried them.
        """
        self._seen = seen
        self._offset = 0
        self.done = False

    def stop(self) -> None:
        """
        See L{ICarrierReader.stop}: nothing is pending.
        """

    def feed(self, flow: Any, data: bytes) -> bytes | None:
        """
        See L{ICarrierReader.feed}.
        """
        if self.done:
            return data
        offset = self._offset
        n = min(len(self._seen) - offset, len(data))
        if data[:n] != self._seen[offset:offset + n]:
            self.done = True
            flow.refuse(f"the stream does not begin with the {WHAT} its SYN carried")
            return None
        self._offset = offset + n
        if self._offset < len(self._seen):
            return None
        self.done = True
        return data[n:]


def _untrusted(flow: Any) -> str:
    return f"peer {flow.client.host} is not trusted to send a {WHAT}"


def prepareAtAccept(context: Any, flow: Any) -> str | None:
    """
    A flow accepted by a listener that reads PROXY v2 headers: it waits for
    its header.

    @param context: The listener's L{miniproxy.listener.ListenerContext}.
    @return: L{None}, or why the flow is refused (an untrusted peer).
    """
    if not context.isTrusted(flow.client):
        return _untrusted(flow)
    flow.readCarrier(
        ProxyV2Reader(flow, context.reactor, context.limits.synTimeout), awaiting=True
    )
    return None


def prepareAtSyn(context: Any, flow: Any, segment: Any) -> str | None:
    """
    A flow begun at its SYN by a listener that reads PROXY v2 headers: a
    SYN that carries the whole header as data gives the flow its
    destination now; otherwise the flow waits for its header.

    @param context: The listener's L{miniproxy.listener.ListenerContext}.
    @param segment: The SYN, a L{miniproxy.wire.packet.TCPSegment}.
    @return: L{None}, or why the flow is refused (an untrusted peer, a
        malformed header in the SYN, a header that names no acceptable
        destination).
    """
    if not context.isTrusted(flow.client):
        return _untrusted(flow)
    payload = bytes(segment.payload)
    if payload:
        try:
            header, rest = ProxyV2Parser(MAX_HEADER_LENGTH).feed(payload)
        except MalformedInput as e:
            return f"malformed {WHAT} in the SYN: {e}"
        if header is not None:
            refusal = applyHeader(flow, header)
            if refusal is not None:
                return refusal
            flow.readCarrier(
                SeenHeaderReader(payload[: len(payload) - len(rest)]), awaiting=False
            )
            return None
    flow.readCarrier(
        ProxyV2Reader(flow, context.reactor, context.limits.synTimeout), awaiting=True
    )
    return None


def headerBytes(source: HostPort, destination: HostPort) -> bytes:
    """
    The PROXY v2 header of a TCP connection from C{source} to
    C{destination}.

    @param source: The original client: an IP address literal.
    @param destination: The destination: an IP address literal, or a host
        name (written as the unspecified address and an C{AUTHORITY} TLV).
    @raise MalformedInput: If it cannot be written (a source that is not
        an address, a name that is not a host name).
    """
    source = _unmapped(source)
    tlvs: tuple[tuple[int, bytes], ...] = ()
    if destination.ipAddress() is None:
        name = hostName(destination.host.encode("utf-8"))
        if name is None:
            raise MalformedInput(f"{destination.host!r} is not a host name")
        tlvs = ((TLVType.AUTHORITY, name.encode("ascii")),)
        sourceIP = source.ipAddress()
        unspecified = "::" if sourceIP is not None and sourceIP.version == 6 else "0.0.0.0"
        destination = HostPort(unspecified, destination.port)
    else:
        destination = _unmapped(destination)
    sourceIP, destinationIP = source.ipAddress(), destination.ipAddress()
    if sourceIP is None:
        raise MalformedInput(f"source {source.host!r} is not an IP address")
    if sourceIP.version != destinationIP.version:  # type: ignore[union-attr]
        # One family for both: IPv4 as IPv4-mapped IPv6, as HAProxy does.
        source = HostPort(_mapped(sourceIP), source.port)
        destination = HostPort(_mapped(destinationIP), destination.port)
    return encode(ProxyHeader.forStream(source, destination, tlvs))


def _mapped(ip: Any) -> str:
    if ip.version == 4:
        return str(ipaddress.IPv6Address(f"::ffff:{ip}"))
    return str(ip)


def preambleFor(flow: Any, nextHop: NextHop) -> bytes:
    """
    What the outgoing leg to C{nextHop} writes first, for its C{carry}.

    @raise ValueError: If the header cannot be written, or the carrier is
        unknown.
    """
    if nextHop.carry == "tcp-option":
        # Carried in the SYN itself (see miniproxy.optionemitter): no bytes.
        return b""
    if nextHop.carry != "proxy-v2":
        raise ValueError(f"unknown carrier {nextHop.carry!r}")
    source = flow.origin if flow.origin is not None else flow.client
    destination = flow.destination if flow.destination is not None else nextHop.address
    return headerBytes(source, destination)
