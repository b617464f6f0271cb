# -*- test-case-name: tests.test_syntap -*-
"""
The SYN tap: a raw socket that sees a client's SYN when it arrives, so the
early-SYN hook runs (and the outgoing leg starts) one client round trip
before C{accept()} returns.

The kernel answers a SYN itself and C{accept()} returns only after the
client's ACK.  A raw C{AF_INET}/C{AF_INET6} socket bound to C{IPPROTO_TCP}
gets a copy of every TCP segment the host receives, before TCP itself
handles it; a classic BPF filter attached with C{SO_ATTACH_FILTER} keeps
only SYNs (SYN set, ACK and RST clear) to the tapped ports, so the reactor
is woken for nothing else.  The tap needs C{CAP_NET_RAW}.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from typing import Any, Callable, Iterable

from twisted.logger import Logger

from miniproxy.address import ipText
from miniproxy.socketreader import SocketReader
from miniproxy.wire.errors import MalformedInput
from miniproxy.wire.packet import TCPSegment, parseIP, parseTCP

_log = Logger(namespace="miniproxy.syntap")

SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
IPV6_RECVPKTINFO = 49
IPV6_PKTINFO = 50

# Classic BPF opcodes.
_LD_B_ABS = 0x30
_LD_H_ABS = 0x28
_LDX_B_MSH = 0xB1
_LD_B_IND = 0x50
_LD_H_IND = 0x48
_AND_K = 0x54
_JEQ_K = 0x15
_RET_K = 0x06

#: The flags a SYN has (SYN) among those checked (SYN, RST, ACK).
_SYN_MASK = 0x16
_SYN_ONLY = 0x02

#: Segments read per wake-up at most, so a flood cannot starve the reactor.
READ_BATCH = 256

_MUL_K = 0x24
_RSH_K = 0x74
_MOD_K = 0x94

#: The multiplier of the hash that steers a connection to one of several
#: workers by its client port (Fibonacci hashing: consecutive or evenly
#: spaced ports, as Linux hands out to C{connect()}, spread evenly).
STEERING_MULTIPLIER = 0x9E3779B1


def workerOf(clientPort: int, workers: int) -> int:
    """
    The worker (0 to C{workers - 1}) a connection from C{clientPort} is
    steered to.  The kernel computes the same, in the C{SO_REUSEPORT}
    program of L{miniproxy.workers}, and each worker's tap the same again
    (L{synFilter} with C{share}), so a worker begins early flows only for
    the connections it will accept.

    @param clientPort: The client's TCP port.
    @param workers: How many workers share the listener.
    """
    return (((clientPort * STEERING_MULTIPLIER) & 0xFFFFFFFF) >> 16) % workers


def steeringInstructions(workers: int) -> list[tuple[int, int, int, int]]:
    """
    The classic BPF instructions that turn a client port in the
    accumulator into its worker (L{workerOf}), left in the accumulator.
    """
    return [
        (_MUL_K, 0, 0, STEERING_MULTIPLIER),
        (_RSH_K, 0, 0, 16),
        (_MOD_K, 0, 0, workers),
    ]


def synFilter(
    ports: Iterable[int],
    withIPHeader: bool,
    share: tuple[int, int] | None = None,
) -> list[tuple[int, int, int, int]]:
    """
    A classic BPF program that accepts SYNs (no ACK, no RST) to C{ports}.

    @param withIPHeader: Whether packets start with an IPv4 header (an
        C{AF_INET} raw socket); an C{AF_INET6} raw socket gets the TCP
        header first.
    @param share: C{(index, workers)}: accept only the SYNs of the
        connections steered to worker C{index} of C{workers} (see
        L{workerOf}); L{None} for all of them.
    @return: The instructions as C{(code, jt, jf, k)}.
    """
    ports = sorted(set(ports))
    if not ports:
        raise ValueError("a SYN filter needs at least one port")
    program: list[tuple[int, int, int, int]] = []
    if withIPHeader:
        program.append((_LDX_B_MSH, 0, 0, 0))  # X = IPv4 header length
        flags, port, source = (_LD_B_IND, 13), (_LD_H_IND, 2), (_LD_H_IND, 0)
    else:
        flags, port, source = (_LD_B_ABS, 13), (_LD_H_ABS, 2), (_LD_H_ABS, 0)
    n = len(ports)
    program += [
        (flags[0], 0, 0, flags[1]),
        (_AND_K, 0, 0, _SYN_MASK),
        (_JEQ_K, 0, n + 1, _SYN_ONLY),  # not a SYN: drop
        (port[0], 0, 0, port[1]),
    ]
    for i, p in enumerate(ports):
        program.append((_JEQ_K, n - i, 0, p))  # past "drop"
    program.append((_RET_K, 0, 0, 0))
    if share is not None:
        index, workers = share
        program.append((source[0], 0, 0, source[1]))
        program += steeringInstructions(workers)
        program += [(_JEQ_K, 1, 0, index), (_RET_K, 0, 0, 0)]
    program.append((_RET_K, 0, 0, 0xFFFF))
    return program


def attachFilter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """
    Attach a classic BPF program to C{sock}.
    """
    raw = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class SynTap(SocketReader):
    """
    Reads SYNs from a raw socket registered with the reactor as a reader.

    @ivar ports: The tapped destination ports.
    @ivar seen: SYNs reported.
    @ivar malformed: Segments that could not be parsed (counted, dropped).
    """

    def __init__(
        self,
        reactor: Any,
        family: int,
        ports: Iterable[int],
        onSyn: Callable[[TCPSegment], None],
        receiveBuffer: int = 4 * 1024 * 1024,
        share: tuple[int, int] | None = None,
    ) -> None:
        """
        @param family: C{AF_INET} or C{AF_INET6}.
        @param ports: The destination ports to tap.
        @param onSyn: Called with each SYN.
        @param receiveBuffer: The raw socket's receive buffer, in bytes.
        @param share: C{(index, workers)}: report only the SYNs of the
            connections steered to this worker (see L{synFilter}).
        """
        super().__init__(reactor)
        self.family = family
        self.ports = frozenset(ports)
        self.onSyn = onSyn
        self.receiveBuffer = receiveBuffer
        self.share = share
        self.seen = 0
        self.malformed = 0

    def start(self) -> None:
        """
        Open the raw socket and start reading.

        @raise OSError: C{EPERM} without C{CAP_NET_RAW}; the caller falls back
            to connecting at accept.
        """
        sock = socket.socket(self.family, socket.SOCK_RAW, socket.IPPROTO_TCP)
        try:
            attachFilter(
                sock, synFilter(self.ports, self.family == socket.AF_INET, self.share)
            )
            if self.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.receiveBuffer)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receiveBuffer)
        except BaseException:
            sock.close()
            raise
        self._listen(sock)

    prefix = "SynTap"

    def setPorts(self, ports: Iterable[int]) -> None:
        """
        Tap these ports from now on (the filter is replaced in place).
        """
        self.ports = frozenset(ports)
        if self._sock is not None:
            attachFilter(
                self._sock, synFilter(self.ports, self.family == socket.AF_INET, self.share)
            )

    def doRead(self) -> None:
        """
        Read the queued SYNs, at most L{READ_BATCH} per call.
        """
        self.readQueued()

    def readQueued(self, limit: int = READ_BATCH) -> int:
        """
        Read the queued SYNs now, at most C{limit}: also called outside the
        reactor's wake-ups, by an accept that must see its SYN first.

        @return: How many segments were read (C{limit}: more may be
            queued).
        """
        sock = self._sock
        share = self.share
        read = 0
        while read < limit:
            if sock is None:
                break
            try:
                read += 1
                if self.family == socket.AF_INET:
                    segment = parseIP(sock.recv(65535))
                else:
                    segment = self._readIPv6(sock)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    return read - 1
                raise
            except MalformedInput:
                self.malformed += 1
                continue
            if not segment.isSyn or segment.destination.port not in self.ports:
                continue
            if share is not None and workerOf(segment.source.port, share[1]) != share[0]:
                continue
            self.seen += 1
            try:
                self.onSyn(segment)
            except Exception:
                _log.failure("SYN handler failed for {segment}", segment=segment)
            sock = self._sock
        return read

    def _readIPv6(self, sock: socket.socket) -> TCPSegment:
        data, ancillary, _flags, source = sock.recvmsg(65535, socket.CMSG_SPACE(20))
        destination = None
        for level, kind, value in ancillary:
            if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(value) >= 16:
                destination = ipText(value[:16])
        if destination is None:
            raise MalformedInput("IPv6 segment without its destination address")
        return parseTCP(source[0].split("%", 1)[0], destination, data)
