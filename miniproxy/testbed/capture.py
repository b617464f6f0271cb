# -*- test-case-name: tests.test_capture -*-
"""
Packet capture on a namespace's interface with kernel timestamps, without
tcpdump.

A L{PacketCapture} is an C{AF_PACKET}/C{SOCK_DGRAM} socket made in the
namespace and bound to one interface: it gets a copy of every packet the
interface receives and of every packet sent out of it (marked
L{CapturedPacket.outgoing}), starting at the network header.  With
C{SO_TIMESTAMPNS} each copy carries the time the kernel saw it (for a
received packet, when the device handed it to the stack; for a sent one,
when it was given to the device), so timings do not depend on when the
capture is read.  An optional classic BPF program (L{synFilter}) keeps the
socket's buffer for the packets wanted.

Packets wait in the socket's buffer until L{PacketCapture.read} takes them;
nothing needs the reactor::

    capture = PacketCapture(proxy, "client", filter=synFilter([8080])).start()
    self.addCleanup(capture.stop)
    ...
    for packet in capture.read():
        print(packet.time, packet.outgoing, packet.segment())

It needs C{CAP_NET_RAW}.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import Iterable, Sequence

from attrs import frozen

from miniproxy.syntap import attachFilter
from miniproxy.syntap import synFilter as _tcpSynFilter
from miniproxy.testbed.netns import Namespace
from miniproxy.wire.errors import MalformedInput
from miniproxy.wire.packet import TCPSegment, parseIP

#: Every protocol.
ETH_P_ALL = 0x0003
#: IPv4.
ETH_P_IP = 0x0800
#: IPv6.
ETH_P_IPV6 = 0x86DD
#: Asks for nanosecond receive timestamps (C{SO_TIMESTAMPNS_OLD}).
SO_TIMESTAMPNS = 35
#: Sets a buffer size over C{rmem_max} (root).
SO_RCVBUFFORCE = 33
#: The packet type of a copy of a sent packet.
PACKET_OUTGOING = 4

_TIMESPEC = struct.Struct("@qq")


def _stampOf(ancillary: Iterable[tuple[int, int, bytes]]) -> int:
    # The SO_TIMESTAMPNS time of a received message, in ns (0: none).
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = _TIMESPEC.unpack(value[: _TIMESPEC.size])
            return seconds * 1_000_000_000 + nanoseconds
    return 0


def awaitArrivalTimestamps(timeout: float = 5.0) -> None:
    """
    Return once the kernel timestamps packets when they arrive.

    The first socket of a system that asks for receive timestamps turns the
    kernel's timestamping on only from a work queue, a moment later; until
    then a packet carries no time, and C{recvmsg} reports the time it was
    read instead.  There is no notification, so this sends datagrams to
    itself over loopback until one is stamped before it was read, letting
    the work queue run (a 1 ms wait) between tries.  Once on, it stays on
    while any socket asks for timestamps (a capture does).

    @raise RuntimeError: If it is not on after C{timeout} seconds.
    """
    space = socket.CMSG_SPACE(_TIMESPEC.size)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        receiver.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            sender.sendto(b"t", receiver.getsockname())
            before = time.time_ns()
            _, ancillary, _, _ = receiver.recvmsg(1, space)
            if 0 < _stampOf(ancillary) < before:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the kernel did not timestamp arriving packets within {timeout} s"
                )
            select.select([], [], [], 0.001)


#: Where classic BPF loads the packet's ethertype from (C{SKF_AD_OFF +
#: SKF_AD_PROTOCOL}).
_SKF_PROTOCOL = 0xFFFFF000
_LD_H_ABS, _JEQ_K, _RET_K = 0x28, 0x15, 0x06


def synFilter(ports: Iterable[int]) -> list[tuple[int, int, int, int]]:
    """
    A BPF program that keeps only IPv4 TCP SYNs (SYN set, ACK and RST
    clear) to C{ports}, received or sent.
    """
    return [
        (_LD_H_ABS, 0, 0, _SKF_PROTOCOL),
        (_JEQ_K, 1, 0, ETH_P_IP),
        (_RET_K, 0, 0, 0),
        *_tcpSynFilter(ports, withIPHeader=True),
    ]


@frozen
class CapturedPacket:
    """
    A packet seen on an interface.

    @ivar time: When the kernel saw it, in nanoseconds since the epoch
        (C{CLOCK_REALTIME}: comparable between interfaces and namespaces).
    @ivar outgoing: Whether it was sent out of the interface (rather than
        received by it).
    @ivar protocol: Its ethertype (L{ETH_P_IP}, L{ETH_P_IPV6}).
    @ivar data: The packet, from its network header.
    """

    time: int
    outgoing: bool
    protocol: int
    data: bytes

    def segment(self) -> TCPSegment | None:
        """
        The TCP segment it carries, or L{None} if it is not an IPv4 or IPv6
        packet carrying TCP.
        """
        try:
            return parseIP(self.data)
        except MalformedInput:
            return None


class PacketCapture:
    """
    Captures the packets of one interface of a namespace.

    @ivar namespace: Where the interface is (L{None}: this thread's own).
    @ivar interface: Its name.
    @ivar protocol: The ethertype captured (L{ETH_P_ALL}: every one).  The
        kernel gives sent packets only to captures of every protocol: to
        see them, keep the default and filter (L{synFilter} does).
    @ivar filter: A classic BPF program run on each packet, or L{None}.
    @ivar dropped: Packets the kernel dropped because the buffer was full
        (updated by L{read}).
    """

    def __init__(
        self,
        namespace: Namespace | None,
        interface: str,
        protocol: int = ETH_P_ALL,
        filter: Sequence[tuple[int, int, int, int]] | None = None,
        receiveBuffer: int = 8 * 1024 * 1024,
    ) -> None:
        """
        @param receiveBuffer: The socket's buffer, in bytes: packets wait
            there until read.
        """
        self.namespace = namespace
        self.interface = interface
        self.protocol = protocol
        self.filter = list(filter) if filter is not None else None
        self.receiveBuffer = receiveBuffer
        self.dropped = 0
        self._sock: socket.socket | None = None

    def __repr__(self) -> str:
        where = self.namespace.name if self.namespace is not None else "-"
        return f"<PacketCapture {where}/{self.interface}>"

    def start(self) -> PacketCapture:
        """
        Open the socket and start capturing, once the kernel timestamps
        arriving packets (L{awaitArrivalTimestamps}).

        @return: C{self}.
        @raise OSError: Without C{CAP_NET_RAW}, or if the interface does not
            exist.
        """
        if self._sock is not None:
            return self
        # Protocol 0: the socket gets nothing until it is bound to the
        # interface, so no packet of another interface slips in.
        if self.namespace is not None:
            sock = self.namespace.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        else:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        try:
            if self.filter is not None:
                attachFilter(sock, self.filter)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.receiveBuffer)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receiveBuffer)
            sock.bind((self.interface, self.protocol))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        # Its packets carry the times they arrived only once the kernel's
        # timestamping is on.
        awaitArrivalTimestamps()
        return self

    @property
    def running(self) -> bool:
        """
        Whether it captures.
        """
        return self._sock is not None

    def read(self) -> list[CapturedPacket]:
        """
        Take the packets captured since the last call, oldest first.
        """
        sock = self._sock
        if sock is None:
            raise ValueError(f"{self!r} is not running")
        packets = []
        space = socket.CMSG_SPACE(_TIMESPEC.size)
        while True:
            try:
                data, ancillary, _flags, address = sock.recvmsg(65535, space)
            except BlockingIOError:
                break
            stamp = _stampOf(ancillary)
            # address: (interface, ethertype, packet type, hardware type, address)
            packets.append(
                CapturedPacket(stamp, address[2] == PACKET_OUTGOING, address[1], data)
            )
        self.dropped += self._kernelDrops(sock)
        return packets

    @staticmethod
    def _kernelDrops(sock: socket.socket) -> int:
        # PACKET_STATISTICS: struct tpacket_stats {packets, drops}; reading
        # it resets it.
        try:
            raw = sock.getsockopt(263, 6, 8)  # SOL_PACKET, PACKET_STATISTICS
        except OSError:
            return 0
        return int(struct.unpack("II", raw)[1])

    def stop(self) -> None:
        """
        Close the socket; packets not read are lost.  Stopping twice is
        harmless.
        """
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
