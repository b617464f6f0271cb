"""
Tests for L{miniproxy.address}.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial import unittest

from miniproxy.address import HostPort, NextHop, splitEndpointDescription
from miniproxy.errors import ConfigError

ports = st.integers(min_value=1, max_value=65535)
ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
names = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True)


def escape(host: str) -> str:
    return host.replace(":", "\\:")


class HostPortTests(unittest.TestCase):
    """
    L{HostPort} formats addresses and converts Twisted's.
    """

    def test_str(self) -> None:
        self.assertEqual(str(HostPort("10.0.0.1", 80)), "10.0.0.1:80")
        self.assertEqual(str(HostPort("::1", 443)), "[::1]:443")

    def test_fromAddress(self) -> None:
        self.assertEqual(
            HostPort.fromAddress(IPv4Address("TCP", "127.0.0.1", 5)),
            HostPort("127.0.0.1", 5),
        )
        self.assertEqual(
            HostPort.fromAddress(IPv6Address("TCP", "::1", 6)), HostPort("::1", 6)
        )
        self.assertEqual(
            HostPort.fromAddress(IPv6Address("TCP", "::ffff:10.0.1.1", 7)),
            HostPort("10.0.1.1", 7),
        )

    def test_ipAddress(self) -> None:
        self.assertEqual(
            HostPort("10.1.2.3", 1).ipAddress(), ipaddress.ip_address("10.1.2.3")
        )
        self.assertIsNone(HostPort("example.com", 1).ipAddress())


class SplitEndpointDescriptionTests(unittest.TestCase):
    """
    L{splitEndpointDescription} reads Twisted's endpoint syntax.
    """

    def test_split(self) -> None:
        self.assertEqual(
            splitEndpointDescription("tcp:8080:interface=\\:\\:1:backlog=5:backlog=9"),
            ("tcp", ["8080"], {"interface": "::1", "backlog": "9"}),
        )
        self.assertEqual(splitEndpointDescription("unix"), ("unix", [], {}))

    @given(st.lists(st.text(alphabet="ab:=\\", max_size=6), min_size=1, max_size=4))
    def test_escapedParts(self, values: list[str]) -> None:
        """
        Positional parts with every C{:} and C{\\} escaped come back as
        they were.
        """
        values = [v for v in values if "=" not in v]
        escaped = [v.replace("\\", "\\\\").replace(":", "\\:") for v in values]
        self.assertEqual(
            splitEndpointDescription(":".join(["kind"] + escaped)), ("kind", values, {})
        )


class NextHopTests(unittest.TestCase):
    """
    L{NextHop.fromString} parses Twisted-style client endpoint strings.
    """

    @given(host=st.one_of(ipv4, ipv6, names), port=ports, tls=st.booleans(),
           keywords=st.booleans())
    def test_roundTrip(self, host: str, port: int, tls: bool, keywords: bool) -> None:
        kind = "tls" if tls else "tcp"
        if keywords:
            text = f"{kind}:host={escape(host)}:port={port}"
        else:
            text = f"{kind}:{escape(host)}:{port}"
        hop = NextHop.fromString(text)
        self.assertEqual(hop.address, HostPort(host, port))
        self.assertEqual(hop.tls, tls)

    @given(host=ipv6, port=ports)
    def test_brackets(self, host: str, port: int) -> None:
        hop = NextHop.fromString(f"tcp:host=[{host}]:port={port}")
        self.assertEqual(hop.address, HostPort(host, port))

    def test_tlsOptions(self) -> None:
        hop = NextHop.fromString(
            "tls:host=10.0.0.1:port=443:hostname=example.com:trustRoots=/ca.pem"
        )
        self.assertEqual(hop.tlsHostname, "example.com")
        self.assertEqual(hop.caCertificates, "/ca.pem")
        self.assertEqual(str(hop), "tls:10.0.0.1:443")

    def test_bindAddress(self) -> None:
        hop = NextHop.fromString("tcp:host=10.0.0.1:port=80:bindAddress=10.0.0.9")
        self.assertEqual(hop.bindAddress, "10.0.0.9")

    def test_fastOpen(self) -> None:
        self.assertTrue(NextHop.fromString("tcp:host=10.0.0.1:port=80:fastopen=yes").fastOpen)
        self.assertFalse(NextHop.fromString("tcp:host=10.0.0.1:port=80").fastOpen)

    def test_errors(self) -> None:
        cases = {
            "tcp:host=a:port=1:fastopen=maybe": "fastopen must be yes or no",
            "tls:host=a:port=1:fastopen=yes": "fastopen is for plain tcp",
            "": "empty",
            "udp:host=a:port=1": "kind must be tcp or tls",
            "tcp:port=1": "no host",
            "tcp:host=a": "no port",
            "tcp:host=a:port=x": "port must be an integer",
            "tcp:host=a:port=0": "port must be 1 to 65535",
            "tcp:host=a:port=70000": "port must be 1 to 65535",
            "tcp:host=a:port=1:colour=red": "unknown parameter 'colour'",
            "tcp:host=a:port=1:timeout=5": "unknown parameter 'timeout'",
            "tcp:host=a:port=1:hostname=x": "unknown parameter 'hostname'",
            "tcp:a:1:2": "too many positional parts",
        }
        for text, message in cases.items():
            with self.assertRaises(ConfigError, msg=text) as raised:
                NextHop.fromString(text)
            self.assertIn(message, str(raised.exception), text)

    @given(st.text(max_size=40))
    def test_garbageNeverCrashes(self, text: str) -> None:
        """
        Any string either parses or raises L{ConfigError}; nothing else.
        """
        try:
            hop = NextHop.fromString(text)
        except ConfigError:
            return
        self.assertTrue(0 < hop.address.port < 65536)
