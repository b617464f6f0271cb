# -*- test-case-name: tests.test_wire_proxyv2 -*-
"""
The PROXY protocol version 2 header, as HAProxy's specification
(C{doc/proxy-protocol.txt}) defines it.

Twisted's own L{twisted.protocols.haproxy} parses v2 headers too, but it
needs the whole header in the first chunk, drops the TLVs and cannot write
a header; miniproxy needs all three (a header split across reads, TLVs
passed on to functions, and a writer for the outgoing leg), so this codec is
its own.  Version 1 (text) headers are not accepted.

Layout::

    12 bytes  signature  0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
    1 byte    version (high nibble, 2) | command (low: 0 LOCAL, 1 PROXY)
    1 byte    family (high: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX)
              | transport (low: 0 UNSPEC, 1 STREAM, 2 DGRAM)
    2 bytes   length of what follows, big-endian
    addresses INET: src 4, dst 4, src port 2, dst port 2 (12 bytes)
              INET6: src 16, dst 16, src port 2, dst port 2 (36 bytes)
              UNIX: src 108, dst 108 (216 bytes)
    TLVs      type 1 byte, length 2 bytes big-endian, value
"""

from __future__ import annotations

import socket
import struct
from enum import IntEnum

from attrs import field, frozen

from miniproxy.address import HostPort, ipText
from miniproxy.wire.errors import MalformedInput

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_FIXED = 16


class Command(IntEnum):
    """
    The command nibble.

    @cvar LOCAL: The connection was made by the proxy itself (a health
        check): the addresses are to be ignored.
    @cvar PROXY: The connection is relayed for a client: the addresses are
        the original ones.
    """

    LOCAL = 0
    PROXY = 1


class Family(IntEnum):
    """
    The address family nibble.
    """

    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


class Transport(IntEnum):
    """
    The transport protocol nibble.
    """

    UNSPEC = 0
    STREAM = 1
    DGRAM = 2


class TLVType(IntEnum):
    """
    Registered TLV types.
    """

    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


_ADDRESS_SIZES = {Family.UNSPEC: 0, Family.INET: 12, Family.INET6: 36, Family.UNIX: 216}


@frozen
class ProxyHeader:
    """
    A PROXY v2 header.

    @ivar command: LOCAL or PROXY.
    @ivar source: The original client, or L{None} (LOCAL, UNSPEC, UNIX).
    @ivar destination: The original destination, or L{None}.
    @ivar family: The address family.
    @ivar transport: The transport protocol.
    @ivar tlvs: The TLVs, in order, as C{(type, value)} pairs.
    """

    command: Command = Command.PROXY
    source: HostPort | None = None
    destination: HostPort | None = None
    family: Family = Family.UNSPEC
    transport: Transport = Transport.STREAM
    tlvs: tuple[tuple[int, bytes], ...] = field(default=())

    def tlv(self, kind: int) -> bytes | None:
        """
        The value of the first TLV of type C{kind}, or L{None}.
        """
        for t, value in self.tlvs:
            if t == kind:
                return value
        return None

    @classmethod
    def forStream(
        cls,
        source: HostPort,
        destination: HostPort,
        tlvs: tuple[tuple[int, bytes], ...] = (),
    ) -> ProxyHeader:
        """
        A PROXY command for a TCP connection; the family follows the
        addresses, which must both be IPv4 or both IPv6 literals.

        @raise MalformedInput: If they are not.
        """
        families = {_familyOf(source.host), _familyOf(destination.host)}
        if len(families) != 1:
            raise MalformedInput(
                f"source {source} and destination {destination} are not of one family"
            )
        return cls(Command.PROXY, source, destination, families.pop(), Transport.STREAM, tlvs)


def _familyOf(host: str) -> Family:
    try:
        socket.inet_pton(socket.AF_INET, host)
        return Family.INET
    except OSError:
        pass
    try:
        socket.inet_pton(socket.AF_INET6, host)
        return Family.INET6
    except OSError:
        raise MalformedInput(f"{host!r} is not an IP address literal") from None


def encode(header: ProxyHeader) -> bytes:
    """
    Write a header.

    @raise MalformedInput: If it cannot be represented (a UNIX family, an
        address of the wrong family, a TLV too long).
    """
    family = header.family
    if header.command is Command.LOCAL:
        family = Family.UNSPEC if header.source is None else family
    if family is Family.UNIX:
        raise MalformedInput("UNIX addresses are not written by miniproxy")
    body = b""
    if family in (Family.INET, Family.INET6):
        if header.source is None or header.destination is None:
            raise MalformedInput("an INET or INET6 header needs both addresses")
        af = socket.AF_INET if family is Family.INET else socket.AF_INET6
        try:
            body = (
                socket.inet_pton(af, header.source.host)
                + socket.inet_pton(af, header.destination.host)
                + struct.pack("!HH", header.source.port, header.destination.port)
            )
        except (OSError, struct.error) as e:
            raise MalformedInput(f"cannot write addresses: {e}") from None
    for kind, value in header.tlvs:
        if not 0 <= kind <= 255 or len(value) > 0xFFFF:
            raise MalformedInput(f"TLV type {kind} with {len(value)} bytes cannot be written")
        body += struct.pack("!BH", kind, len(value)) + value
    if len(body) > 0xFFFF:
        raise MalformedInput("header longer than 65535 bytes")
    return (
        SIGNATURE
        + bytes([0x20 | header.command, (family << 4) | header.transport])
        + struct.pack("!H", len(body))
        + body
    )


def _parseTLVs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise MalformedInput("truncated TLV header")
        kind, length = struct.unpack_from("!BH", data, offset)
        offset += 3
        if len(data) - offset < length:
            raise MalformedInput(f"TLV type {kind:#x} claims {length} bytes, has {len(data) - offset}")
        tlvs.append((kind, data[offset:offset + length]))
        offset += length
    return tuple(tlvs)


def decodeBody(verCmd: int, famProto: int, body: bytes) -> ProxyHeader:
    """
    Decode what follows the fixed 16 bytes.

    @raise MalformedInput: On any violation of the format.
    """
    if verCmd >> 4 != 2:
        raise MalformedInput(f"version {verCmd >> 4}, not 2")
    try:
        command = Command(verCmd & 0x0F)
    except ValueError:
        raise MalformedInput(f"unknown command {verCmd & 0x0F}") from None
    try:
        family = Family(famProto >> 4)
        transport = Transport(famProto & 0x0F)
    except ValueError:
        raise MalformedInput(f"unknown family/transport byte {famProto:#04x}") from None
    size = _ADDRESS_SIZES[family]
    if len(body) < size:
        raise MalformedInput(
            f"{family.name} addresses need {size} bytes, the header has {len(body)}"
        )
    source = destination = None
    if family in (Family.INET, Family.INET6):
        af, n = (socket.AF_INET, 4) if family is Family.INET else (socket.AF_INET6, 16)
        source = HostPort(
            ipText(body[:n]), struct.unpack_from("!H", body, 2 * n)[0]
        )
        destination = HostPort(
            ipText(body[n:2 * n]), struct.unpack_from("!H", body, 2 * n + 2)[0]
        )
    tlvs = _parseTLVs(body[size:])
    if command is Command.LOCAL:
        # The receiver must ignore LOCAL addresses.
        source = destination = None
    return ProxyHeader(command, source, destination, family, transport, tlvs)


def decode(data: bytes) -> tuple[ProxyHeader, bytes]:
    """
    Decode a complete header at the start of C{data}.

    @return: The header and the bytes after it.
    @raise MalformedInput: If C{data} does not start with a complete, valid
        header.
    """
    parser = ProxyV2Parser()
    header, rest = parser.feed(data)
    if header is None:
        raise MalformedInput(f"incomplete header ({len(data)} bytes)")
    return header, rest


class ProxyV2Parser:
    """
    A streaming parser: feed it chunks as they arrive, however the header
    is split.

    @ivar maxLength: The longest header accepted (the format allows 16 +
        65535 bytes; a listener can refuse less).
    """

    def __init__(self, maxLength: int = HEADER_FIXED + 0xFFFF) -> None:
        self._buffer = b""
        self.maxLength = maxLength
        self.done = False

    def feed(self, data: bytes) -> tuple[ProxyHeader | None, bytes]:
        """
        Consume a chunk.

        @return: C{(header, rest)} once the header is complete, where
            C{rest} is what followed it in the bytes fed so far;
            C{(None, b"")} while more is needed.
        @raise MalformedInput: As soon as the bytes cannot be a valid header
            (a wrong signature byte is caught at once, not after 16 bytes).
        """
        if self.done:
            raise MalformedInput("the header was already parsed")
        buffer = self._buffer + data
        prefix = buffer[: len(SIGNATURE)]
        if SIGNATURE[: len(prefix)] != prefix:
            raise MalformedInput("not a PROXY protocol v2 signature")
        if len(buffer) >= 13 and buffer[12] >> 4 != 2:
            raise MalformedInput(f"version {buffer[12] >> 4}, not 2")
        if len(buffer) < HEADER_FIXED:
            self._buffer = buffer
            return None, b""
        (length,) = struct.unpack_from("!H", buffer, 14)
        total = HEADER_FIXED + length
        if total > self.maxLength:
            raise MalformedInput(f"header of {total} bytes exceeds {self.maxLength}")
        if len(buffer) < total:
            self._buffer = buffer
            return None, b""
        self._buffer = b""
        self.done = True
        header = decodeBody(buffer[12], buffer[13], buffer[HEADER_FIXED:total])
        return header, buffer[total:]
