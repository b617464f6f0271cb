# -*- test-case-name: tests.test_nfqueue -*-
"""
A minimal client of the kernel's netfilter queue (C{nfnetlink_queue}),
speaking netlink directly: packets that an C{iptables ... -j NFQUEUE} rule
sends to a queue are read here, possibly changed, and given back with a
verdict.

Only what miniproxy needs is implemented: bind one queue of one address
family in copy-packet mode, read packets, and accept each (with its payload
replaced or not).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any, Callable

from twisted.logger import Logger

from miniproxy.socketreader import SocketReader

_log = Logger(namespace="miniproxy.nfqueue")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2

NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_CFG_CMD_PF_BIND = 3
NFQNL_CFG_CMD_PF_UNBIND = 4
NFQNL_COPY_PACKET = 2

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_PAYLOAD = 10

NF_DROP = 0
NF_ACCEPT = 1

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NLMSG_DONE = 3

#: Packets handled per wake-up at most.
READ_BATCH = 256


def _attribute(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def _message(kind: int, family: int, queue: int, attributes: bytes, flags: int = 0) -> bytes:
    # nlmsghdr, then nfgenmsg (family, version 0, resource id = queue, BE).
    body = struct.pack("=BBH", family, 0, socket.htons(queue)) + attributes
    header = struct.pack(
        "=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind,
        NLM_F_REQUEST | flags, 0, 0,
    )
    return header + body


def parseAttributes(data: bytes) -> dict[int, bytes]:
    """
    Parse netlink attributes (type to value; nested flag bits dropped).
    """
    found = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found[kind & 0x3FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return found


class QueueError(OSError):
    """
    The kernel refused a queue configuration request.
    """


class NetfilterQueue(SocketReader):
    """
    One bound netfilter queue, read by the reactor.

    @ivar onPacket: Called with each packet's bytes (an IP packet); returns
        the bytes to accept it with (the same object to leave it as it is).
    @ivar handled: Packets given back.
    """

    def __init__(
        self,
        reactor: Any,
        queue: int,
        onPacket: Callable[[bytes], bytes],
        family: int = socket.AF_INET,
    ) -> None:
        super().__init__(reactor)
        self.queue = queue
        self.family = family
        self.onPacket = onPacket
        self.handled = 0

    prefix = "NetfilterQueue"

    def _request(self, sock: socket.socket, kind: int, attributes: bytes) -> None:
        sock.send(_message(kind, self.family, self.queue, attributes, NLM_F_ACK))
        reply = sock.recv(65536)
        if len(reply) >= 20:
            _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", reply, 16)
                if code:
                    raise QueueError(-code, f"netfilter queue {self.queue}: {errno.errorcode.get(-code, code)}")

    def start(self) -> None:
        """
        Bind the queue and start reading.

        @raise OSError: Without CAP_NET_ADMIN, or if another process has the
            queue.
        """
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            command = lambda cmd: _attribute(  # noqa: E731
                NFQA_CFG_CMD, struct.pack("=BxH", cmd, socket.htons(self.family))
            )
            self._request(sock, NFQNL_MSG_CONFIG, command(NFQNL_CFG_CMD_BIND))
            self._request(
                sock, NFQNL_MSG_CONFIG,
                _attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_PACKET)),
            )
        except BaseException:
            sock.close()
            raise
        self._listen(sock)

    def doRead(self) -> None:
        """
        Handle the queued packets: each gets its verdict at once.
        """
        for _ in range(READ_BATCH):
            sock = self._sock
            if sock is None:
                return
            try:
                data = sock.recv(262144)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    return
                if e.errno == errno.ENOBUFS:
                    _log.warn("netfilter queue {queue} overran its socket buffer", queue=self.queue)
                    continue
                raise
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, _, _ = struct.unpack_from("=IHHII", data, offset)
                if length < 16:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    self._packet(sock, data[offset + 20:offset + length])
                offset += (length + 3) & ~3

    def _packet(self, sock: socket.socket, body: bytes) -> None:
        attributes = parseAttributes(body)
        header = attributes.get(NFQA_PACKET_HDR)
        payload = attributes.get(NFQA_PAYLOAD, b"")
        if header is None:
            return
        (packetId,) = struct.unpack_from("!I", header)
        try:
            verdictPayload = self.onPacket(payload)
        except Exception:
            _log.failure("netfilter queue handler failed; packet passed unchanged")
            verdictPayload = payload
        attributes_ = _attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packetId))
        if verdictPayload is not payload:
            attributes_ += _attribute(NFQA_PAYLOAD, verdictPayload)
        sock.send(_message(NFQNL_MSG_VERDICT, socket.AF_UNSPEC, self.queue, attributes_))
        self.handled += 1
