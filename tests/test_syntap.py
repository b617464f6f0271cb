"""
Tests for L{miniproxy.syntap}.
"""

from __future__ import annotations

import os
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from miniproxy.syntap import SynTap, synFilter, workerOf
from miniproxy.wire.packet import ACK, RST, SYN, TCPSegment
from tests.test_wire_packet import ipv4, tcp


def runFilter(program: list[tuple[int, int, int, int]], packet: bytes) -> int:
    """
    Interpret the classic BPF instructions L{synFilter} uses.
    """
    a = x = 0
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0xB1:
            x = 4 * (packet[k] & 0x0F)
        elif code in (0x30, 0x50):
            i = k + (x if code == 0x50 else 0)
            if i >= len(packet):
                return 0
            a = packet[i]
        elif code in (0x28, 0x48):
            i = k + (x if code == 0x48 else 0)
            if i + 2 > len(packet):
                return 0
            a = struct.unpack_from("!H", packet, i)[0]
        elif code == 0x54:
            a &= k
        elif code == 0x24:
            a = (a * k) & 0xFFFFFFFF
        elif code == 0x74:
            a >>= k
        elif code == 0x94:
            a %= k
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


class SynFilterTests(unittest.TestCase):
    """
    The BPF program keeps exactly the SYNs to the tapped ports.
    """

    @given(
        st.sets(st.integers(1, 65535), min_size=1, max_size=5),
        st.integers(1, 65535),
        st.integers(0, 255),
        st.integers(0, 10).map(lambda n: bytes(4 * n)),
        st.booleans(),
    )
    def test_acceptsExactlySyns(self, ports, dport, flags, ipOptions, withIP) -> None:  # type: ignore[no-untyped-def]
        segment = tcp(1234, dport, 1, flags, b"", b"")
        if withIP:
            packet = ipv4("10.0.0.1", "10.0.0.2", segment)
            if ipOptions:
                ihl = 5 + len(ipOptions) // 4
                if ihl > 15:
                    ipOptions = ipOptions[: (15 - 5) * 4]
                    ihl = 15
                packet = bytes([0x40 | ihl]) + packet[1:20] + ipOptions + packet[20:]
        else:
            packet = segment
        verdict = runFilter(synFilter(ports, withIP), packet)
        wanted = flags & (SYN | ACK | RST) == SYN and dport in ports
        self.assertEqual(bool(verdict), wanted)

    def test_noPorts(self) -> None:
        with self.assertRaises(ValueError):
            synFilter([], True)

    @given(
        st.integers(1, 65535),
        st.integers(1, 8).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))),
        st.booleans(),
    )
    def test_share(self, sport, share, withIP) -> None:  # type: ignore[no-untyped-def]
        """
        With a share, the filter keeps a SYN only if its client port is
        steered to that worker, as L{workerOf} says.
        """
        segment = tcp(sport, 8080, 1, SYN, b"", b"")
        packet = ipv4("10.0.0.1", "10.0.0.2", segment) if withIP else segment
        verdict = runFilter(synFilter([8080], withIP, share), packet)
        self.assertEqual(bool(verdict), workerOf(sport, share[1]) == share[0])
        other = tcp(sport, 8081, 1, SYN, b"", b"")
        packet = ipv4("10.0.0.1", "10.0.0.2", other) if withIP else other
        self.assertEqual(runFilter(synFilter([8080], withIP, share), packet), 0)

    def test_workerOfSpreadsEvenPorts(self) -> None:
        """
        Linux gives C{connect()} even ports: L{workerOf} still spreads
        consecutive even ports over the workers about evenly.
        """
        for workers in (2, 3, 4):
            counts = [0] * workers
            for port in range(32768, 32768 + 2000, 2):
                counts[workerOf(port, workers)] += 1
            self.assertLess(max(counts) - min(counts), 1000 // workers // 5, counts)


class Recorder:
    def __init__(self) -> None:
        self.segments: list[TCPSegment] = []
        self.waiting: list[defer.Deferred[TCPSegment]] = []

    def __call__(self, segment: TCPSegment) -> None:
        self.segments.append(segment)
        while self.waiting:
            self.waiting.pop().callback(segment)

    def next(self) -> defer.Deferred[TCPSegment]:
        d: defer.Deferred[TCPSegment] = defer.Deferred()
        self.waiting.append(d)
        return d


class SynTapTests(unittest.TestCase):
    """
    A real tap sees a real SYN on loopback before the connection is
    accepted.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("the SYN tap needs CAP_NET_RAW (run as root)")

    def listen(self, reactor, interface):  # type: ignore[no-untyped-def]
        accepted: list[Protocol] = []

        class Remember(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)

        port = reactor.listenTCP(0, Factory.forProtocol(Remember), interface=interface)
        self.addCleanup(port.stopListening)
        return port, accepted

    @defer.inlineCallbacks
    def test_seesSyn(self):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        port, accepted = self.listen(reactor, "127.0.0.1")
        number = port.getHost().port
        recorder = Recorder()
        tap = SynTap(reactor, socket.AF_INET, [number], recorder)
        tap.start()
        self.addCleanup(tap.stop)
        arrived = recorder.next()
        client = socket.socket()
        self.addCleanup(client.close)
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", number))
        segment = yield arrived
        self.assertEqual(segment.destination.port, number)
        self.assertEqual(segment.source.port, client.getsockname()[1])
        self.assertEqual(segment.source.host, "127.0.0.1")
        self.assertTrue(segment.isSyn)
        self.assertIn(2, [kind for kind, _ in segment.options])  # MSS
        self.assertEqual(tap.seen, 1)

    @defer.inlineCallbacks
    def test_seesSynIPv6(self):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        port, _ = self.listen(reactor, "::1")
        number = port.getHost().port
        recorder = Recorder()
        tap = SynTap(reactor, socket.AF_INET6, [number], recorder)
        tap.start()
        self.addCleanup(tap.stop)
        arrived = recorder.next()
        client = socket.socket(socket.AF_INET6)
        self.addCleanup(client.close)
        client.setblocking(False)
        client.connect_ex(("::1", number))
        segment = yield arrived
        self.assertEqual(segment.destination.host, "::1")
        self.assertEqual(segment.destination.port, number)
        self.assertEqual(segment.source.port, client.getsockname()[1])

    def shareSeen(self, family: int, host: str) -> None:
        """
        Two taps, one per worker of two: each reads the SYNs of exactly the
        connections L{workerOf} steers to it, whether its filter (in the
        kernel) or its reading (in Python) drops the others.
        """
        listener = socket.socket(family)
        self.addCleanup(listener.close)
        listener.bind((host, 0))
        listener.listen(64)
        number = listener.getsockname()[1]
        recorders = [Recorder(), Recorder()]
        taps = [
            SynTap(MemoryReactor(), family, [number], recorders[i], share=(i, 2))
            for i in range(2)
        ]
        for tap in taps:
            tap.start()
            self.addCleanup(tap.stop)
        ports = []
        for _ in range(16):
            client = socket.socket(family)
            self.addCleanup(client.close)
            client.connect((host, number))
            ports.append(client.getsockname()[1])
        # The SYN reached the taps before the handshake completed.
        # Under load a SYN may be retransmitted (the SYN tap reports each
        # copy; EarlySyns counts the repeats): compare the connections seen.
        for i, tap in enumerate(taps):
            mine = sorted(p for p in ports if workerOf(p, 2) == i)
            # The kernel filter dropped the others: they were never read.
            queued = tap.readQueued()
            seenPorts = [s.source.port for s in recorders[i].segments]
            self.assertEqual(sorted(set(seenPorts)), mine)
            self.assertEqual(queued, len(seenPorts))
        self.assertGreaterEqual(taps[0].seen + taps[1].seen, len(ports))

    def test_share(self) -> None:
        """
        See L{shareSeen}, for IPv4.
        """
        self.shareSeen(socket.AF_INET, "127.0.0.1")

    def test_shareIPv6(self) -> None:
        """
        See L{shareSeen}, for IPv6.
        """
        self.shareSeen(socket.AF_INET6, "::1")

    def test_stopTwice(self) -> None:
        reactor = MemoryReactor()
        tap = SynTap(reactor, socket.AF_INET, [80], lambda s: None)
        tap.start()
        self.assertIn(tap, reactor.readers)
        fd = tap.fileno()
        self.assertIn("socket:", os.readlink(f"/proc/self/fd/{fd}"))
        tap.stop()
        tap.stop()
        self.assertNotIn(tap, reactor.readers)
        self.assertFalse(tap.running)
        self.assertEqual(tap.fileno(), -1)
