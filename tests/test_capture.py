"""
Tests for L{miniproxy.testbed.capture}: packet capture with kernel
timestamps on a namespace's interface.
"""

from __future__ import annotations

import socket
import time

from twisted.trial import unittest

from miniproxy.address import HostPort
from miniproxy.testbed import capture
from miniproxy.testbed.capture import (
    ETH_P_IP,
    CapturedPacket,
    PacketCapture,
    synFilter,
)
from miniproxy.testbed.netns import Testbed, namespacesUnavailable
from miniproxy.wire.packet import ACK, SYN
from tests.test_wire_packet import ipv4, tcp

WAIT = 10.0


class CapturedPacketTests(unittest.TestCase):
    """
    L{CapturedPacket} gives the TCP segment it carries.
    """

    def test_segment(self) -> None:
        """
        An IPv4 packet carrying TCP is parsed; anything else is L{None}.
        """
        data = ipv4("10.0.0.1", "10.0.0.2", tcp(1234, 80, 7, SYN, b"", b""))
        packet = CapturedPacket(5, False, ETH_P_IP, data)
        segment = packet.segment()
        assert segment is not None
        self.assertEqual(
            (segment.source, segment.destination, segment.seq, segment.isSyn),
            (HostPort("10.0.0.1", 1234), HostPort("10.0.0.2", 80), 7, True),
        )
        self.assertIsNone(CapturedPacket(5, True, ETH_P_IP, b"\x45\0").segment())
        self.assertIsNone(CapturedPacket(5, True, ETH_P_IP, b"").segment())

    def test_notStarted(self) -> None:
        """
        A capture not started cannot be read; stopping it is harmless.
        """
        capture = PacketCapture(None, "lo")
        self.assertFalse(capture.running)
        self.assertRaises(ValueError, capture.read)
        capture.stop()
        self.assertIn("lo", repr(capture))


class ArrivalTimestampTests(unittest.TestCase):
    """
    L{capture.awaitArrivalTimestamps} returns once the kernel stamps
    packets as they arrive.
    """

    def test_on(self) -> None:
        """
        Afterwards, while a socket asks for timestamps, a datagram carries
        a time from before it was read.
        """
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.setsockopt(socket.SOL_SOCKET, capture.SO_TIMESTAMPNS, 1)
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(WAIT)
        capture.awaitArrivalTimestamps()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"x", receiver.getsockname())
        before = time.time_ns()
        _, ancillary, _, _ = receiver.recvmsg(1, socket.CMSG_SPACE(16))
        self.assertLess(0, capture._stampOf(ancillary))
        self.assertLess(capture._stampOf(ancillary), before)

    def test_neverOn(self) -> None:
        """
        When no datagram is stamped before it is read (here: the clock
        says every read comes first), it gives up after its timeout.
        """
        self.patch(capture.time, "time_ns", lambda: 0)
        error = self.assertRaises(RuntimeError, capture.awaitArrivalTimestamps, 0.01)
        self.assertIn("within 0.01 s", str(error))


class CaptureTests(unittest.TestCase):
    """
    Captures on a veth pair between two namespaces (root).
    """

    def setUp(self) -> None:
        reason = namespacesUnavailable()
        if reason is not None:
            raise unittest.SkipTest(reason)
        self.bed = Testbed()
        self.addCleanup(self.bed.teardown)
        self.a = self.bed.addNamespace("a")
        self.b = self.bed.addNamespace("b")
        self.bed.connect(
            self.a, self.b, ["10.7.0.1/24", "fd00:7::1/64"], ["10.7.0.2/24", "fd00:7::2/64"]
        )
        self.listener = self.b.socket()
        self.addCleanup(self.listener.close)
        self.listener.bind(("10.7.0.2", 8000))
        self.listener.listen(4)

    def handshake(self) -> tuple[int, int, int]:
        """
        Connect from C{a} to C{b}'s listener.

        @return: The client's port, and the times before and after.
        """
        before = time.time_ns()
        with self.a.socket() as client:
            client.settimeout(WAIT)
            client.connect(("10.7.0.2", 8000))
            port = client.getsockname()[1]
            accepted, _ = self.listener.accept()
            accepted.close()
        return port, before, time.time_ns()

    def test_bothDirections(self) -> None:
        """
        A capture sees what its interface receives and what it sends, in
        order, with kernel times taken while it happened.
        """
        capture = PacketCapture(self.b, "a").start()
        self.addCleanup(capture.stop)
        port, before, after = self.handshake()
        packets = [p for p in capture.read() if p.segment() is not None]
        segments = [p.segment() for p in packets]
        [synIndex] = [i for i, s in enumerate(segments) if s and s.isSyn]
        [synAckIndex] = [
            i for i, s in enumerate(segments) if s and s.flags & (SYN | ACK) == SYN | ACK
        ]
        self.assertLess(synIndex, synAckIndex)
        self.assertFalse(packets[synIndex].outgoing)
        self.assertTrue(packets[synAckIndex].outgoing)
        self.assertEqual(segments[synIndex].source, HostPort("10.7.0.1", port))  # type: ignore[union-attr]
        times = [p.time for p in packets]
        self.assertEqual(times, sorted(times))
        # The handshake happened between the two marks; the packets of the
        # close may come after the second one, handled in a softirq.
        handshake = [times[synIndex], times[synAckIndex]]
        self.assertTrue(all(before <= t <= after for t in handshake), (before, times, after))
        self.assertEqual(capture.read(), [])
        self.assertEqual(capture.dropped, 0)

    def test_synFilter(self) -> None:
        """
        With L{synFilter}, only the IPv4 SYNs to the given ports are kept
        (here: the one sent); the capture is only of its own interface.
        """
        capture = PacketCapture(self.a, "b", filter=synFilter([8000])).start()
        self.addCleanup(capture.stop)
        other = PacketCapture(self.a, "lo", ETH_P_IP).start()
        self.addCleanup(other.stop)
        port, _, _ = self.handshake()
        with self.a.socket(socket.AF_INET6) as client:
            # An IPv6 SYN to the same port, out of the same interface, is
            # not kept (nothing listens there: it is refused).
            client.settimeout(WAIT)
            self.assertRaises(ConnectionRefusedError, client.connect, ("fd00:7::2", 8000))
        [packet] = capture.read()
        self.assertTrue(packet.outgoing)
        segment = packet.segment()
        assert segment is not None
        self.assertTrue(segment.isSyn)
        self.assertEqual(segment.source.port, port)
        self.assertEqual(other.read(), [])

    def test_noSuchInterface(self) -> None:
        """
        Capturing on an interface the namespace does not have fails at
        once, and leaves nothing open.
        """
        capture = PacketCapture(self.a, "nosuch")
        self.assertRaises(OSError, capture.start)
        self.assertFalse(capture.running)
