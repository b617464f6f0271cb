# -*- test-case-name: tests.test_wire_packet -*-
"""
The IPv4/IPv6 and TCP headers of a captured packet: what a SYN tap needs to
know about a SYN.
"""

from __future__ import annotations

import socket
import struct

from attrs import frozen

from miniproxy.address import HostPort, ipText
from miniproxy.wire.errors import MalformedInput

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10

_OPT_EOL = 0
_OPT_NOP = 1


@frozen
class TCPSegment:
    """
    A TCP segment and the addresses it travelled between.

    @ivar source: The sender's address and port.
    @ivar destination: The receiver's address and port.
    @ivar seq: The sequence number.
    @ivar flags: The flag bits (C{SYN}, C{ACK}, ...).
    @ivar options: The TCP options as C{(kind, value)} pairs, in order
        (NOP and EOL are left out).
    @ivar payload: The bytes after the TCP header (data in a TFO SYN).
    """

    source: HostPort
    destination: HostPort
    seq: int
    flags: int
    options: tuple[tuple[int, bytes], ...]
    payload: bytes

    @property
    def isSyn(self) -> bool:
        """
        Whether this opens a connection: SYN set, ACK and RST clear.
        """
        return self.flags & (SYN | ACK | RST) == SYN


def parseOptions(data: bytes) -> list[tuple[int, bytes]]:
    """
    Parse TCP options.

    @raise MalformedInput: On an option that runs past the end or has a
        length below 2.
    """
    options = []
    i = 0
    while i < len(data):
        kind = data[i]
        if kind == _OPT_EOL:
            break
        if kind == _OPT_NOP:
            i += 1
            continue
        if i + 1 >= len(data):
            raise MalformedInput(f"option kind {kind} has no length byte")
        length = data[i + 1]
        if length < 2 or i + length > len(data):
            raise MalformedInput(f"option kind {kind} has bad length {length}")
        options.append((kind, data[i + 2:i + length]))
        i += length
    return options


def encodeOptions(options: list[tuple[int, bytes]]) -> bytes:
    """
    Write TCP options, padded with NOPs to a multiple of four bytes.
    """
    out = b"".join(bytes([kind, len(value) + 2]) + value for kind, value in options)
    return out + b"\x01" * (-len(out) % 4)


def parseTCP(source: str, destination: str, data: bytes) -> TCPSegment:
    """
    Parse a TCP segment whose addresses are known from elsewhere (an
    C{AF_INET6} raw socket delivers no IP header).

    @raise MalformedInput: If it is truncated.
    """
    if len(data) < 20:
        raise MalformedInput(f"TCP header truncated ({len(data)} bytes)")
    sport, dport, seq, _ack, offsetByte, flags = struct.unpack_from("!HHIIBB", data)
    headerLength = (offsetByte >> 4) * 4
    if headerLength < 20 or headerLength > len(data):
        raise MalformedInput(f"TCP data offset {headerLength} does not fit {len(data)} bytes")
    return TCPSegment(
        HostPort(source, sport),
        HostPort(destination, dport),
        seq,
        flags,
        tuple(parseOptions(data[20:headerLength])),
        data[headerLength:],
    )


def parseIP(packet: bytes) -> TCPSegment:
    """
    Parse an IPv4 or IPv6 packet carrying TCP.

    @raise MalformedInput: If it is not one, or is truncated.  IPv6 extension
        headers are not followed (a SYN normally has none).
    """
    if not packet:
        raise MalformedInput("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            raise MalformedInput("IPv4 header truncated")
        ihl = (packet[0] & 0x0F) * 4
        totalLength = struct.unpack_from("!H", packet, 2)[0]
        if ihl < 20 or len(packet) < ihl:
            raise MalformedInput(f"bad IPv4 header length {ihl}")
        if packet[9] != socket.IPPROTO_TCP:
            raise MalformedInput(f"IP protocol {packet[9]} is not TCP")
        end = min(len(packet), totalLength) if totalLength >= ihl else len(packet)
        # inet_ntop writes an IPv4 address as ipaddress does, without
        # parsing it into an object first (a SYN tap parses every SYN).
        return parseTCP(
            socket.inet_ntop(socket.AF_INET, packet[12:16]),
            socket.inet_ntop(socket.AF_INET, packet[16:20]),
            packet[ihl:end],
        )
    if version == 6:
        if len(packet) < 40:
            raise MalformedInput("IPv6 header truncated")
        if packet[6] != socket.IPPROTO_TCP:
            raise MalformedInput(f"IPv6 next header {packet[6]} is not TCP")
        payloadLength = struct.unpack_from("!H", packet, 4)[0]
        return parseTCP(
            ipText(packet[8:24]),
            ipText(packet[24:40]),
            packet[40:40 + payloadLength],
        )
    raise MalformedInput(f"IP version {version}")


def internetChecksum(data: bytes) -> int:
    """
    The 16-bit ones' complement checksum of IP, TCP and UDP.
    """
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _tcpChecksum(pseudo: bytes, segment: bytes) -> bytes:
    zeroed = segment[:16] + b"\0\0" + segment[18:]
    return struct.pack("!H", internetChecksum(pseudo + zeroed))


def addTCPOption(packet: bytes, option: bytes) -> bytes:
    """
    Add a TCP option to an IPv4 or IPv6 packet carrying TCP, fixing the
    lengths and both checksums.

    @param option: The option's bytes (kind, length, value).
    @raise MalformedInput: If the packet is not TCP over IP, or the options
        would exceed the 40 bytes a TCP header has room for.
    """
    if not packet:
        raise MalformedInput("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20 or packet[9] != socket.IPPROTO_TCP:
            raise MalformedInput("not a TCP over IPv4 packet")
        ipLength = (packet[0] & 0x0F) * 4
    elif version == 6:
        if len(packet) < 40 or packet[6] != socket.IPPROTO_TCP:
            raise MalformedInput("not a TCP over IPv6 packet (or has extension headers)")
        ipLength = 40
    else:
        raise MalformedInput(f"IP version {version}")
    segment = packet[ipLength:]
    if len(segment) < 20:
        raise MalformedInput("TCP header truncated")
    tcpLength = (segment[12] >> 4) * 4
    if tcpLength < 20 or tcpLength > len(segment):
        raise MalformedInput(f"TCP data offset {tcpLength} does not fit")
    # The options as they are, without the NOP/EOL padding, so that the new
    # one packs tightly (alignment padding is a convention, not a rule).
    kept = b"".join(
        bytes([kind, len(value) + 2]) + value
        for kind, value in parseOptions(segment[20:tcpLength])
    )
    options = kept + option
    options += b"\x01" * (-len(options) % 4)
    if len(options) > 40:
        raise MalformedInput(
            f"no room for a {len(option)}-byte option: the SYN's options would be "
            f"{len(options)} bytes (at most 40)"
        )
    newTCPLength = 20 + len(options)
    segment = (
        segment[:12]
        + bytes([(newTCPLength // 4) << 4 | (segment[12] & 0x0F)])
        + segment[13:20]
        + options
        + segment[tcpLength:]
    )
    if version == 4:
        header = bytearray(packet[:ipLength])
        struct.pack_into("!H", header, 2, ipLength + len(segment))
        struct.pack_into("!H", header, 10, 0)
        struct.pack_into("!H", header, 10, internetChecksum(bytes(header)))
        pseudo = bytes(header[12:20]) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(segment))
    else:
        header = bytearray(packet[:40])
        struct.pack_into("!H", header, 4, len(segment))
        pseudo = bytes(header[8:40]) + struct.pack("!IxxxB", len(segment), socket.IPPROTO_TCP)
    segment = segment[:16] + _tcpChecksum(pseudo, segment) + segment[18:]
    return bytes(header) + segment
