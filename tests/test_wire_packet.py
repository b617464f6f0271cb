"""
Tests for L{miniproxy.wire.packet}.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from miniproxy.address import HostPort
from miniproxy.wire.errors import MalformedInput
from miniproxy.wire.packet import ACK, SYN, encodeOptions, parseIP, parseOptions

ports = st.integers(0, 65535)
v4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
v6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
optionLists = st.lists(
    st.tuples(st.integers(2, 255), st.binary(max_size=8)), max_size=3
).filter(lambda opts: len(encodeOptions(opts)) <= 40)


def tcp(sport: int, dport: int, seq: int, flags: int, options: bytes, payload: bytes) -> bytes:
    offset = (20 + len(options)) // 4
    return struct.pack("!HHIIBBHHH", sport, dport, seq, 0, offset << 4, flags, 65535, 0, 0) + options + payload


def ipv4(src: str, dst: str, segment: bytes) -> bytes:
    return struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 0, 0, 64, socket.IPPROTO_TCP, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    ) + segment


def ipv6(src: str, dst: str, segment: bytes) -> bytes:
    return struct.pack(
        "!IHBB16s16s", 6 << 28, len(segment), socket.IPPROTO_TCP, 64,
        socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst),
    ) + segment


class PacketTests(unittest.TestCase):
    """
    Captured SYNs parse into addresses, flags, options and payload.
    """

    @given(st.sampled_from([(v4, ipv4), (v6, ipv6)]).flatmap(
        lambda p: st.tuples(p[0], p[0], st.just(p[1]))),
        ports, ports, st.integers(0, 2**32 - 1), st.integers(0, 255), optionLists,
        st.binary(max_size=100))
    def test_roundTrip(self, addrs, sport, dport, seq, flags, options, payload) -> None:  # type: ignore[no-untyped-def]
        src, dst, wrap = addrs
        packet = wrap(src, dst, tcp(sport, dport, seq, flags, encodeOptions(options), payload))
        segment = parseIP(packet)
        self.assertEqual(segment.source, HostPort(src, sport))
        self.assertEqual(segment.destination, HostPort(dst, dport))
        self.assertEqual(segment.seq, seq)
        self.assertEqual(segment.flags, flags)
        self.assertEqual(list(segment.options), options)
        self.assertEqual(segment.payload, payload)
        self.assertEqual(segment.isSyn, flags & 0x16 == SYN)

    def test_linuxSyn(self) -> None:
        """
        A SYN with Linux's usual options: MSS, SACK-permitted, timestamps,
        NOP, window scale.
        """
        opts = bytes.fromhex("020405b40402080a0000000100000000" "01030307")
        segment = parseIP(ipv4("10.0.0.1", "10.0.0.2", tcp(1, 2, 3, SYN, opts, b"")))
        self.assertTrue(segment.isSyn)
        self.assertEqual([k for k, _ in segment.options], [2, 4, 8, 3])
        segment = parseIP(ipv4("10.0.0.1", "10.0.0.2", tcp(1, 2, 3, SYN | ACK, opts, b"")))
        self.assertFalse(segment.isSyn)

    def test_errors(self) -> None:
        good = ipv4("10.0.0.1", "10.0.0.2", tcp(1, 2, 3, SYN, b"", b""))
        for packet, message in [
            (b"", "empty packet"),
            (b"\x45" + bytes(10), "IPv4 header truncated"),
            (good[:9] + b"\x11" + good[10:], "is not TCP"),
            (b"\x41" + good[1:], "bad IPv4 header length"),
            (good[:30], "TCP header truncated"),
            (good[:32] + b"\xf0" + good[33:], "TCP data offset"),
            (b"\x60" + bytes(20), "IPv6 header truncated"),
            (b"\x50" + bytes(40), "IP version 5"),
        ]:
            with self.assertRaises(MalformedInput, msg=message) as raised:
                parseIP(packet)
            self.assertIn(message, str(raised.exception))
        for options, message in [
            (b"\x02", "has no length byte"),
            (b"\x02\x01", "bad length 1"),
            (b"\x02\x09\x00", "bad length 9"),
        ]:
            with self.assertRaises(MalformedInput) as raised:
                parseOptions(options)
            self.assertIn(message, str(raised.exception))

    def test_eolStops(self) -> None:
        self.assertEqual(parseOptions(b"\x01\x01\x00\x02\x09"), [])

    @given(st.binary(max_size=120))
    def test_garbage(self, data: bytes) -> None:
        try:
            parseIP(data)
        except MalformedInput:
            pass


def tcpChecksumValid(packet: bytes) -> bool:
    from miniproxy.wire.packet import internetChecksum

    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        segment = packet[ihl:]
        pseudo = packet[12:20] + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(segment))
        if internetChecksum(packet[:ihl]) != 0:
            return False
    else:
        segment = packet[40:]
        pseudo = packet[8:40] + struct.pack("!IxxxB", len(segment), socket.IPPROTO_TCP)
    return internetChecksum(pseudo + segment) == 0


class AddOptionTests(unittest.TestCase):
    """
    L{addTCPOption} adds an option to a SYN, keeping the packet valid.
    """

    @given(
        st.sampled_from([(v4, ipv4), (v6, ipv6)]).flatmap(
            lambda p: st.tuples(p[0], p[0], st.just(p[1]))),
        st.lists(st.tuples(st.integers(2, 255), st.binary(max_size=4)), max_size=3),
        st.binary(min_size=2, max_size=14),
        st.binary(max_size=30),
    )
    def test_added(self, addrs, options, value, payload) -> None:  # type: ignore[no-untyped-def]
        from miniproxy.wire.packet import addTCPOption

        src, dst, wrap = addrs
        packet = wrap(src, dst, tcp(1, 2, 3, SYN, encodeOptions(options), payload))
        option = bytes([253, len(value) + 2]) + value
        try:
            changed = addTCPOption(packet, option)
        except MalformedInput as e:
            self.assertIn("no room", str(e))
            return
        segment = parseIP(changed)
        self.assertEqual(list(segment.options), options + [(253, value)])
        self.assertEqual(segment.payload, payload)
        self.assertEqual((segment.source.host, segment.destination.host), (src, dst))
        self.assertTrue(tcpChecksumValid(changed))

    def test_linuxSynHasRoom(self) -> None:
        """
        Linux's SYN options (20 bytes) leave room for the IPv4 4-tuple
        option (16 bytes).
        """
        from miniproxy.address import HostPort as HP
        from miniproxy.wire import tcpoption
        from miniproxy.wire.packet import addTCPOption

        opts = bytes.fromhex("020405b40402080a0000000100000000" "01030307")
        packet = ipv4("10.0.0.1", "10.0.0.2", tcp(1, 2, 3, SYN, opts, b""))
        option = tcpoption.encode(tcpoption.FlowAddressOption(HP("192.0.2.1", 80), HP("10.9.9.9", 5)))
        changed = addTCPOption(packet, option)
        self.assertEqual(len(changed), len(packet) + 16)
        found = tcpoption.find(list(parseIP(changed).options))
        self.assertEqual(found.destination, HP("192.0.2.1", 80))
        six = tcpoption.encode(tcpoption.FlowAddressOption(HP("::1", 80), HP("::2", 5)))
        with self.assertRaises(MalformedInput):
            addTCPOption(packet, six)

    def test_notTCP(self) -> None:
        from miniproxy.wire.packet import addTCPOption

        good = ipv4("10.0.0.1", "10.0.0.2", tcp(1, 2, 3, SYN, b"", b""))
        for bad in (b"", good[:9] + b"\x11" + good[10:], b"\x50" + good[1:], good[:25]):
            with self.assertRaises(MalformedInput):
                addTCPOption(bad, b"\xfd\x02")
