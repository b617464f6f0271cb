"""
Tests for L{miniproxy.wire.proxyv2}.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.trial import unittest

from miniproxy.address import HostPort
from miniproxy.wire.errors import MalformedInput
from miniproxy.wire.proxyv2 import (
    SIGNATURE,
    Command,
    Family,
    ProxyHeader,
    ProxyV2Parser,
    TLVType,
    decode,
    encode,
)

ports = st.integers(0, 65535)
v4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
v6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
tlvs = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=5
).map(tuple)


@st.composite
def headers(draw: st.DrawFn) -> ProxyHeader:
    hosts = draw(st.sampled_from([v4, v6]))
    if draw(st.booleans()):
        return ProxyHeader(Command.LOCAL, tlvs=draw(tlvs))
    return ProxyHeader.forStream(
        HostPort(draw(hosts), draw(ports)), HostPort(draw(hosts), draw(ports)), draw(tlvs)
    )


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for p in points + [len(data)]:
        chunks.append(data[last:p])
        last = p
    return chunks


class ProxyV2Tests(unittest.TestCase):
    """
    The PROXY v2 codec round-trips, streams, and rejects bad input with
    L{MalformedInput} only.
    """

    @given(headers(), st.binary(max_size=50), st.lists(st.integers(0, 10_000), max_size=8))
    def test_roundTripAnySplit(self, header: ProxyHeader, after: bytes, cuts: list[int]) -> None:
        """
        A header written and fed back in chunks split anywhere comes out
        equal, with the bytes after it intact.
        """
        data = encode(header) + after
        parser = ProxyV2Parser()
        result = None
        rest = b""
        for chunk in split(data, cuts):
            if result is None:
                result, rest = parser.feed(chunk)
            else:
                rest += chunk
        self.assertEqual(result, header)
        self.assertEqual(rest, after)

    @given(headers())
    def test_twistedAgrees(self, header: ProxyHeader) -> None:
        """
        Twisted's own parser reads what we write, addresses and all.
        """
        info, rest = V2Parser().feed(encode(header))
        self.assertEqual(rest, b"")
        if header.command is Command.LOCAL:
            self.assertIsNone(info.source)
        else:
            self.assertEqual(
                ipaddress.ip_address(info.source.host),
                ipaddress.ip_address(header.source.host),
            )
            self.assertEqual(info.source.port, header.source.port)
            self.assertEqual(info.destination.port, header.destination.port)

    def test_specExample(self) -> None:
        """
        A hand-built header from the spec's layout decodes as expected.
        """
        body = bytes([127, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 5555, 80)
        body += bytes([TLVType.AUTHORITY]) + struct.pack("!H", 11) + b"example.com"
        data = SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body + b"GET"
        header, rest = decode(data)
        self.assertEqual(header.source, HostPort("127.0.0.1", 5555))
        self.assertEqual(header.destination, HostPort("10.0.0.2", 80))
        self.assertEqual(header.family, Family.INET)
        self.assertEqual(header.tlv(TLVType.AUTHORITY), b"example.com")
        self.assertIsNone(header.tlv(TLVType.ALPN))
        self.assertEqual(rest, b"GET")

    def test_localIgnoresAddresses(self) -> None:
        body = bytes(12)
        data = SIGNATURE + b"\x20\x11" + struct.pack("!H", 12) + body
        header, _ = decode(data)
        self.assertEqual(header.command, Command.LOCAL)
        self.assertIsNone(header.source)

    def test_errors(self) -> None:
        good = encode(ProxyHeader.forStream(HostPort("1.2.3.4", 1), HostPort("5.6.7.8", 2)))
        cases = {
            b"GET / HTTP/1.1\r\n": "not a PROXY protocol v2 signature",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n": "not a PROXY protocol v2 signature",
            SIGNATURE + b"\x11": "version 1, not 2",
            good[:12] + b"\x22" + good[13:]: "unknown command 2",
            good[:13] + b"\x41" + good[14:]: "unknown family",
            good[:13] + b"\x21" + b"\x00\x04" + good[16:20]: "INET6 addresses need 36 bytes",
            SIGNATURE + b"\x21\x11\x00\x0e" + bytes(12) + b"\x01\x00": "truncated TLV header",
            SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x09\x00": "claims 9 bytes",
        }
        for data, message in cases.items():
            with self.assertRaises(MalformedInput, msg=data) as raised:
                decode(data)
            self.assertIn(message, str(raised.exception))

    def test_incomplete(self) -> None:
        with self.assertRaises(MalformedInput) as raised:
            decode(SIGNATURE)
        self.assertIn("incomplete header", str(raised.exception))

    def test_maxLength(self) -> None:
        header = ProxyHeader(Command.LOCAL, tlvs=((4, bytes(1000)),))
        with self.assertRaises(MalformedInput):
            ProxyV2Parser(maxLength=512).feed(encode(header))

    def test_signatureCheckedEarly(self) -> None:
        """
        A wrong first byte is an error at once, not after 16 bytes.
        """
        with self.assertRaises(MalformedInput):
            ProxyV2Parser().feed(b"G")

    def test_feedAfterDone(self) -> None:
        parser = ProxyV2Parser()
        parser.feed(encode(ProxyHeader(Command.LOCAL)))
        with self.assertRaises(MalformedInput):
            parser.feed(b"x")

    def test_encodeErrors(self) -> None:
        with self.assertRaises(MalformedInput):
            ProxyHeader.forStream(HostPort("1.2.3.4", 1), HostPort("::1", 2))
        with self.assertRaises(MalformedInput):
            ProxyHeader.forStream(HostPort("host", 1), HostPort("::1", 2))
        with self.assertRaises(MalformedInput):
            encode(ProxyHeader(Command.PROXY, None, None, Family.INET))
        with self.assertRaises(MalformedInput):
            encode(ProxyHeader(Command.PROXY, family=Family.UNIX))
        with self.assertRaises(MalformedInput):
            encode(ProxyHeader(Command.LOCAL, tlvs=((300, b""),)))

    @given(st.binary(max_size=200), st.lists(st.integers(0, 300), max_size=6))
    def test_garbage(self, data: bytes, cuts: list[int]) -> None:
        """
        Any bytes, in any chunks, either parse or raise L{MalformedInput}.
        """
        parser = ProxyV2Parser()
        try:
            for chunk in split(data, cuts):
                header, _ = parser.feed(chunk)
                if header is not None:
                    self.assertIsInstance(header, ProxyHeader)
                    break
        except MalformedInput:
            pass

    @given(headers(), st.integers(0, 1000), st.integers(0, 255))
    def test_corrupted(self, header: ProxyHeader, where: int, value: int) -> None:
        """
        A valid header with one byte changed either parses or raises
        L{MalformedInput}; never anything else.
        """
        data = bytearray(encode(header))
        data[where % len(data)] = value
        try:
            ProxyV2Parser().feed(bytes(data))
        except MalformedInput:
            pass
