# -*- test-case-name: tests.test_evaluation -*-
"""
Flows as packet captures see them (L{miniproxy.testbed.capture}): kernel
timestamps of each connection's SYN, SYN-ACK and data, on the client's
device, and the order of the connections a proxy relays.

These times do not depend on when a process got to run: they show what
the network did, where the client's own timestamps show what the client
program saw.
"""

from __future__ import annotations

from typing import Collection, Iterable

from attrs import define

from miniproxy.testbed.capture import CapturedPacket
from miniproxy.wire.packet import ACK, RST, SYN


@define
class WireFlow:
    """
    One connection on a device, in kernel nanoseconds (C{CLOCK_REALTIME}).

    @ivar port: The connecting side's port.
    @ivar syn: Its first SYN.
    @ivar synAck: The first SYN-ACK back.
    @ivar firstData: The first segment with data back.
    @ivar lastData: The last segment with data back.
    @ivar dataBytes: The bytes of data back.
    @ivar synData: The bytes of data in the SYN (TCP Fast Open).
    @ivar request: The first segment with data from the connecting side
        (its SYN, with Fast Open).
    """

    port: int
    syn: int | None = None
    synAck: int | None = None
    firstData: int | None = None
    lastData: int | None = None
    dataBytes: int = 0
    synData: int = 0
    request: int | None = None

    def ms(self, end: int | None) -> float | None:
        """
        Milliseconds from the SYN to C{end}.
        """
        if self.syn is None or end is None:
            return None
        return (end - self.syn) / 1e6


def connections(
    packets: Iterable[CapturedPacket], port: int, outgoing: bool = True
) -> dict[int, WireFlow]:
    """
    The connections to C{port} seen on a device, by the connecting side's
    port.

    @param port: The port connected to.
    @param outgoing: Whether the connecting side is this host (its SYNs
        leave by the device), or a host beyond it (they arrive).
    """
    flows: dict[int, WireFlow] = {}
    for packet in packets:
        segment = packet.segment()
        if segment is None:
            continue
        if packet.outgoing == outgoing and segment.destination.port == port:
            if segment.flags & (SYN | ACK | RST) == SYN:
                flow = flows.setdefault(segment.source.port, WireFlow(segment.source.port))
                if flow.syn is None:
                    flow.syn = packet.time
                    flow.synData = len(segment.payload)
            flow = flows.get(segment.source.port)
            if flow is not None and segment.payload and flow.request is None:
                flow.request = packet.time
        elif packet.outgoing != outgoing and segment.source.port == port:
            flow = flows.get(segment.destination.port)
            if flow is None:
                continue
            if segment.flags & (SYN | ACK) == SYN | ACK:
                if flow.synAck is None:
                    flow.synAck = packet.time
            if segment.payload:
                if flow.firstData is None:
                    flow.firstData = packet.time
                flow.lastData = packet.time
                flow.dataBytes += len(segment.payload)
    return flows


def inOrder(flows: dict[int, WireFlow]) -> list[WireFlow]:
    """
    Connections in the order of their first SYN.
    """
    return sorted((f for f in flows.values() if f.syn is not None), key=lambda f: f.syn or 0)


def synOrder(
    packets: Iterable[CapturedPacket], ports: Collection[int], outgoing: bool
) -> list[tuple[int, int]]:
    """
    The first SYN of each connection to one of C{ports} on a device, in
    order (not the retransmissions).

    A connection is its addresses and its initial sequence number, which
    its retransmitted SYNs repeat: the client's port alone is not enough,
    since a later connection may have the same one (to another of
    C{ports}, or once the earlier one's TIME_WAIT is over).

    @return: C{(time in ns, source port)} of each.
    """
    seen: set[tuple[object, object, int]] = set()
    found = []
    for packet in packets:
        segment = packet.segment()
        if (
            segment is not None
            and packet.outgoing == outgoing
            and segment.flags & (SYN | ACK | RST) == SYN
            and segment.destination.port in ports
        ):
            connection = (segment.source, segment.destination, segment.seq)
            if connection not in seen:
                seen.add(connection)
                found.append((packet.time, segment.source.port))
    return found
