# -*- test-case-name: tests.test_model -*-
"""
The analytical model of a short TCP flow through a chain of split-TCP
proxies: time to first byte (TTFB) and time to complete (TTC).

A flow crosses hops 0..n: hop 0 joins the client to the first proxy (or to
the server when there is none), hop n joins the last proxy to the server.
Hop C{i} has round-trip time C{rtts[i]}.  The client sends its SYN at time
0, and its request (one segment) as soon as it may; the server answers with
C{size} bytes at once.  Each hop is its own TCP connection with its own
slow start from an initial window of C{iw} segments of C{mss} bytes; a proxy
relays each byte as it arrives.

Connect modes (when a proxy starts its outgoing handshake, and whether the
first bytes ride in SYNs):

 - C{ACCEPT}: at accept, when the client's ACK arrives;
 - C{ESF}: at the client's SYN (early SYN forwarding);
 - C{TFO_FIRST}: ESF, and the client uses TCP Fast Open with a cookie, so
   its request rides in its SYN;
 - C{TFO_ALL}: every hop uses Fast Open: each proxy sends its SYN with the
   request as soon as the request reaches it.

Timeline on hop C{i} (node C{i} is the sender: the client or a proxy):
node C{i} sends its SYN at C{s[i]}; the handshake completes for it at
C{s[i] + rtts[i]}; it sends the request when it has it and the handshake is
done (with Fast Open: with the SYN, as soon as it has it); the request
reaches node C{i+1} half a round trip later.  The first byte of the answer
travels back in half the sum of the round trips.  After that, the rest of
the answer is paced by slow start on the slowest hop: one round trip of
that hop per window doubling, or the link rate if that is slower.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Sequence

from attrs import frozen

#: Linux's initial congestion window, in segments (RFC 6928).
DEFAULT_IW = 10
#: The TCP payload of a 1500-byte IPv4 packet with timestamps.
DEFAULT_MSS = 1448
#: Bytes on the wire per full segment (IP, TCP with timestamps, Ethernet-ish).
WIRE_OVERHEAD = 52


class Mode(Enum):
    """
    How the proxies connect; see the module docstring.
    """

    ACCEPT = "accept"
    ESF = "esf"
    TFO_FIRST = "tfo-first"
    TFO_ALL = "tfo-all"


@frozen
class Prediction:
    """
    What the model predicts for one flow, in seconds.

    @ivar ttfb: From the client's SYN to the first byte of the answer at the
        client.
    @ivar ttc: From the client's SYN to the last byte of the answer at the
        client.
    @ivar rounds: Slow-start rounds the answer takes on the slowest hop.
    """

    ttfb: float
    ttc: float
    rounds: int


def slowStartRounds(size: int, iw: int = DEFAULT_IW, mss: int = DEFAULT_MSS) -> int:
    """
    How many windows (each twice the last, from C{iw} segments) it takes to
    send C{size} bytes.
    """
    if size <= 0:
        return 0
    segments = math.ceil(size / mss)
    rounds = 0
    sent = 0
    window = iw
    while sent < segments:
        sent += window
        window *= 2
        rounds += 1
    return rounds


def evenRTTs(rtt: float, proxies: int, extra: float = 0.0) -> list[float]:
    """
    The round trips of C{proxies + 1} hops splitting C{rtt} evenly, each
    lengthened by C{extra} (an off-path proxy's detour).
    """
    hops = proxies + 1
    return [rtt / hops + extra for _ in range(hops)]


def _serialization(nbytes: float, rate: float | None) -> float:
    return 0.0 if not rate else nbytes * 8 / rate


def ttfb(rtts: Sequence[float], mode: Mode = Mode.ESF, rate: float | None = None,
         requestSize: int = 100, mss: int = DEFAULT_MSS) -> float:
    """
    The time to first byte.  See L{predict}.
    """
    hops = len(rtts)
    if hops < 1:
        raise ValueError("a flow crosses at least one hop")
    perSegment = _serialization(min(requestSize, mss) + WIRE_OVERHEAD, rate)
    # When each node may send its SYN, and when it has the request.
    synAt = 0.0
    requestAt = 0.0 if mode in (Mode.TFO_FIRST, Mode.TFO_ALL) else None
    for i, r in enumerate(rtts):
        fastOpen = mode is Mode.TFO_ALL or (mode is Mode.TFO_FIRST and i == 0)
        if fastOpen and requestAt is not None:
            # The request rides in the SYN, as soon as this node has it.
            send = max(synAt, requestAt)
            arrives = send + r / 2 + perSegment
            nextSyn = arrives
        else:
            handshakeDone = synAt + r
            if i == 0:
                requestAt = handshakeDone  # the client sends it with its ACK
            send = max(requestAt, handshakeDone)  # type: ignore[type-var]
            arrives = send + r / 2 + perSegment
            if mode is Mode.ACCEPT:
                nextSyn = synAt + 1.5 * r  # the ACK reaches the next node
            else:
                nextSyn = synAt + r / 2  # the SYN reaches the next node
        requestAt = arrives
        synAt = nextSyn
    # The first byte of the answer travels back over every hop.
    return requestAt + sum(rtts) / 2 + hops * _serialization(mss + WIRE_OVERHEAD, rate)


def predict(
    rtts: Sequence[float],
    size: int,
    mode: Mode = Mode.ESF,
    iw: int = DEFAULT_IW,
    mss: int = DEFAULT_MSS,
    rate: float | None = None,
) -> Prediction:
    """
    Predict TTFB and TTC.

    @param rtts: Each hop's round trip, seconds, client side first.
    @param size: Bytes the server answers with.
    @param mode: How the proxies connect (with no proxy, all modes are the
        same but for Fast Open on the client's hop).
    @param iw: The initial window, segments.
    @param mss: The segment size, bytes.
    @param rate: Each link's rate, bits per second, or L{None} for no limit.
    """
    first = ttfb(rtts, mode, rate, mss=mss)
    rounds = slowStartRounds(size, iw, mss)
    slowest = max(rtts)
    # Round 1 delivers the first window with the first byte; each later
    # round takes one round trip of the slowest hop, or its flight's
    # serialization if that is longer.
    rest = 0.0
    window = iw
    remaining = math.ceil(size / mss) - min(iw, math.ceil(size / mss))
    for _ in range(1, rounds):
        window *= 2
        flight = min(window, remaining)
        remaining -= flight
        rest += max(slowest, _serialization(flight * (mss + WIRE_OVERHEAD), rate))
    # The last round's bytes follow its first one's at the link rate: the
    # segments left after the full windows of the rounds before it.
    lastFlight = math.ceil(size / mss) - iw * (2 ** max(rounds - 1, 0) - 1) if rounds else 0
    tail = _serialization(max(lastFlight - 1, 0) * (mss + WIRE_OVERHEAD), rate)
    return Prediction(ttfb=first, ttc=first + rest + tail, rounds=rounds)
