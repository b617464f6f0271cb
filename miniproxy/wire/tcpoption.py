# -*- test-case-name: tests.test_wire_tcpoption -*-
"""
The TCP option that carries a flow's addresses in its SYN, so that an
explicit proxy learns the final destination at SYN time (the paper's new
option, section 4).

It is an RFC 6994 shared experimental option: kind 253, then a 16-bit
experiment identifier (ExID), then the data.  The data has one of four
lengths, which say what it holds::

    offset  size  field
    0       1     kind = 253
    1       1     length (of the whole option, kind and length included)
    2       2     ExID = 0x4D50 ("MP"), big-endian
    4       ...   one of:
      length 10  IPv4 destination address (4), destination port (2)
      length 16  IPv4 source address (4), destination address (4),
                 source port (2), destination port (2)
      length 22  IPv6 destination address (16), destination port (2)
      length 40  IPv6 source (16), destination (16), source port (2),
                 destination port (2)

A SYN has at most 40 bytes of options, and Linux's own SYN options take 20
(MSS 4, SACK-permitted 2, timestamps 10, window scale 3, one NOP).  The
IPv4 4-tuple (16 bytes) fits beside them (36).  The IPv6 4-tuple (40 bytes)
never fits; the IPv6 destination alone (22 bytes) fits only on a SYN
without timestamps (20 - 10 + 22 = 32).  L{encode} writes the form asked
for; the emitter chooses one that fits.
"""

from __future__ import annotations

import socket
import struct

from attrs import frozen

from miniproxy.address import HostPort, ipText
from miniproxy.wire.errors import MalformedInput

KIND = 253
EXID = 0x4D50
MAX_OPTION_SPACE = 40


@frozen
class FlowAddressOption:
    """
    The addresses a SYN carries.

    @ivar destination: The flow's final destination.
    @ivar source: The original client, or L{None} when only the destination
        is carried.
    """

    destination: HostPort
    source: HostPort | None = None


def _family(host: str) -> int:
    for af in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(af, host)
            return af
        except OSError:
            pass
    raise MalformedInput(f"{host!r} is not an IP address literal")


def encode(option: FlowAddressOption) -> bytes:
    """
    Write the option.

    @raise MalformedInput: If the addresses are not IP literals of one
        family.
    """
    af = _family(option.destination.host)
    dst = socket.inet_pton(af, option.destination.host)
    if option.source is None:
        data = dst + struct.pack("!H", option.destination.port)
    else:
        if _family(option.source.host) != af:
            raise MalformedInput("source and destination are not of one family")
        data = (
            socket.inet_pton(af, option.source.host)
            + dst
            + struct.pack("!HH", option.source.port, option.destination.port)
        )
    return struct.pack("!BBH", KIND, 4 + len(data), EXID) + data


def decodeData(data: bytes) -> FlowAddressOption:
    """
    Decode the data after kind, length and ExID.

    @raise MalformedInput: If its length is not one of the four.
    """
    n = len(data)
    if n == 6:
        return FlowAddressOption(
            HostPort(ipText(data[:4]), struct.unpack("!H", data[4:])[0])
        )
    if n == 12:
        sport, dport = struct.unpack("!HH", data[8:])
        return FlowAddressOption(
            HostPort(ipText(data[4:8]), dport),
            HostPort(ipText(data[:4]), sport),
        )
    if n == 18:
        return FlowAddressOption(
            HostPort(ipText(data[:16]), struct.unpack("!H", data[16:])[0])
        )
    if n == 36:
        sport, dport = struct.unpack("!HH", data[32:])
        return FlowAddressOption(
            HostPort(ipText(data[16:32]), dport),
            HostPort(ipText(data[:16]), sport),
        )
    raise MalformedInput(f"flow address option with {n} data bytes (6, 12, 18 or 36 expected)")


def find(options: list[tuple[int, bytes]]) -> FlowAddressOption | None:
    """
    Find and decode the option among a SYN's parsed options.

    @param options: C{(kind, value)} pairs as
        L{miniproxy.wire.packet.parseOptions} returns them.
    @return: The option, or L{None} if the SYN carries none (another
        experiment's kind-253 option is not ours and is skipped).
    @raise MalformedInput: If our option is there but malformed.
    """
    for kind, value in options:
        if kind == KIND and len(value) >= 2 and struct.unpack("!H", value[:2])[0] == EXID:
            return decodeData(value[2:])
    return None
