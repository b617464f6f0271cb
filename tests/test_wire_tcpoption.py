"""
Tests for L{miniproxy.wire.tcpoption}.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from miniproxy.address import HostPort
from miniproxy.wire import tcpoption
from miniproxy.wire.errors import MalformedInput
from miniproxy.wire.packet import encodeOptions, parseOptions
from miniproxy.wire.tcpoption import EXID, KIND, FlowAddressOption, decodeData, encode, find

ports = st.integers(0, 65535)
v4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
v6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))


@st.composite
def options(draw: st.DrawFn) -> FlowAddressOption:
    hosts = draw(st.sampled_from([v4, v6]))
    source = HostPort(draw(hosts), draw(ports)) if draw(st.booleans()) else None
    return FlowAddressOption(HostPort(draw(hosts), draw(ports)), source)


class TCPOptionTests(unittest.TestCase):
    """
    The flow address option round-trips through a SYN's option list.
    """

    @given(options(), st.lists(st.tuples(st.integers(2, 252), st.binary(max_size=6)), max_size=3))
    def test_roundTrip(self, option: FlowAddressOption, others: list[tuple[int, bytes]]) -> None:
        raw = encode(option)
        self.assertEqual(raw[0], KIND)
        self.assertEqual(raw[1], len(raw))
        parsed = parseOptions(encodeOptions(others + [(raw[0], raw[2:])]))
        self.assertEqual(find(parsed), option)

    def test_layout(self) -> None:
        """
        The IPv4 4-tuple is 16 bytes: kind, length, ExID, source,
        destination, source port, destination port.
        """
        raw = encode(FlowAddressOption(HostPort("10.0.0.2", 80), HostPort("10.0.0.1", 5000)))
        self.assertEqual(
            raw,
            bytes([253, 16, 0x4D, 0x50, 10, 0, 0, 1, 10, 0, 0, 2, 0x13, 0x88, 0, 80]),
        )
        self.assertEqual(len(encode(FlowAddressOption(HostPort("10.0.0.2", 80)))), 10)
        self.assertEqual(len(encode(FlowAddressOption(HostPort("::1", 80)))), 22)
        self.assertEqual(
            len(encode(FlowAddressOption(HostPort("::1", 80), HostPort("::2", 1)))), 40
        )

    def test_otherExperiment(self) -> None:
        """
        Another experiment's kind-253 option is not ours.
        """
        self.assertIsNone(find([(KIND, b"\x12\x34" + bytes(6))]))
        self.assertIsNone(find([(2, b"\x05\xb4")]))

    def test_errors(self) -> None:
        with self.assertRaises(MalformedInput):
            decodeData(bytes(7))
        with self.assertRaises(MalformedInput):
            find([(KIND, EXID.to_bytes(2, "big") + bytes(3))])
        with self.assertRaises(MalformedInput):
            encode(FlowAddressOption(HostPort("example.com", 80)))
        with self.assertRaises(MalformedInput):
            encode(FlowAddressOption(HostPort("::1", 80), HostPort("1.2.3.4", 1)))

    @given(st.binary(max_size=40))
    def test_garbage(self, data: bytes) -> None:
        """
        Any option bytes either parse or raise L{MalformedInput}.
        """
        try:
            tcpoption.find(parseOptions(data))
        except MalformedInput:
            pass
