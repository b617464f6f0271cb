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

The congestion control (L{CongestionControl}) decides how the answer's
rounds leave each sender.  With C{reno} and C{cubic} (whose slow start is
Reno's) each round leaves at once, as above: the closed form of
L{predict}.  With C{bbr} (Linux's C{tcp_bbr.c}, STARTUP) the rounds are
paced, and the model follows the answer segment by segment through each
hop (L{hopDeliveries}), server side first, each proxy relaying every
segment the moment it arrives, so that a proxy's own sender sees its
input paced by the hop upstream:

 - the first 10 segments a socket sends leave at once (C{tcp_output.c},
   C{tcp_update_skb_after_send}: "Original sch_fq does not pace first 10
   MSS"); after that each socket buffer (a TSO unit) of C{len} bytes moves
   the next departure on by C{len / pacing rate}, less up to half of that
   when the sender has been idle (its "OS jitter" credit);
 - the pacing rate starts at C{high_gain * cwnd * mss / srtt} (C{high_gain}
   = 2/ln 2, 739/256 in the kernel's fixed point; C{srtt} the handshake's
   round trip) and in STARTUP only ever grows, to C{high_gain} times the
   largest delivery rate measured in the last 10 rounds, less the 1 %
   pacing margin;
 - each ACK gives a delivery-rate sample (C{tcp_rate.c}): the segments
   delivered since the acknowledged one was sent, over the longer of its
   send and ACK intervals; samples shorter than the minimum RTT are
   discarded, and samples of segments sent while the application had
   nothing more to send (app-limited) count only if they raise the
   estimate;
 - the congestion window grows by the segments each ACK acknowledges
   while it is below C{high_gain * bw * min_rtt} plus three TSO units
   (rounded up to even), or while fewer than 10 segments were delivered;
 - a TSO unit is C{pacing rate / 1024} bytes (about 1 ms of sending) in
   whole segments, at least 2 (1 below 1.2 Mb/s), fixed for the data a
   write queued when it was written;
 - STARTUP ends after three rounds without 25 % more bandwidth (DRAIN at
   gain 1/high_gain, then PROBE_BW at its cruising gain of 1; the
   kernel's random starting phase of the gain cycle is not modelled).

The receiver acknowledges every segment as it arrives (Linux acknowledges
at once in quick-ACK mode at the start of a connection, and a reading
application's window update acknowledges the rest promptly); each link
serialises packets at C{rate}, first come first served, and delays them by
half its round trip each way.
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


#: BBR's STARTUP gain, 2/ln 2 in the kernel's fixed point (C{bbr_high_gain}).
BBR_HIGH_GAIN = (256 * 2885 // 1000 + 1) / 256
#: BBR's DRAIN pacing gain (C{bbr_drain_gain}).
BBR_DRAIN_GAIN = (256 * 1000 // 2885) / 256
#: BBR's cwnd gain in PROBE_BW (C{bbr_cwnd_gain}).
BBR_CWND_GAIN = 2.0
#: BBR paces 1 % below its estimate (C{bbr_pacing_margin_percent}).
BBR_PACING_MARGIN = 0.99
#: Below this pacing rate, bytes per second, a TSO unit is one segment
#: (C{bbr_min_tso_rate}, 1.2 Mb/s).
BBR_MIN_TSO_RATE = 1_200_000 / 8
#: Rounds of BBR's max-bandwidth filter (C{bbr_bw_rtts}).
BBR_BW_RTTS = 10
#: STARTUP ends after this many rounds without C{BBR_FULL_BW_THRESH} more
#: bandwidth (C{bbr_full_bw_cnt}, C{bbr_full_bw_thresh}).
BBR_FULL_BW_CNT = 3
BBR_FULL_BW_THRESH = 1.25
#: BBR's smallest congestion window (C{bbr_cwnd_min_target}).
BBR_CWND_MIN = 4
#: The kernel's C{TCP_INIT_CWND}: BBR grows its window below this many
#: delivered segments whatever its target.
TCP_INIT_CWND = 10
#: Data segments a socket sends before pacing starts (C{tcp_output.c}).
UNPACED_SEGMENTS = 10
#: A TSO unit is about C{pacing rate >> PACING_SHIFT} bytes (C{sk_pacing_shift}).
PACING_SHIFT = 10
#: C{tcp_tso_autosize} adds C{GSO_MAX_SIZE >> (min_rtt_us >> TSO_RTT_LOG)}
#: bytes (C{tcp_tso_rtt_log}); it only matters below about 16 ms.
TSO_RTT_LOG = 9
GSO_MAX_SIZE = 65536


class CongestionControl(Enum):
    """
    The senders' congestion control; see the module docstring.
    """

    RENO = "reno"
    CUBIC = "cubic"
    BBR = "bbr"


def congestionControlNamed(name: str | None) -> CongestionControl:
    """
    The model's congestion control for a kernel's name for one
    (C{net.ipv4.tcp_congestion_control}): C{bbr} for BBR, C{cubic} for
    CUBIC, and Reno's slow start for any other (or none).
    """
    name = (name or "").strip().lower()
    if name.startswith("bbr"):
        return CongestionControl.BBR
    if name == "cubic":
        return CongestionControl.CUBIC
    return CongestionControl.RENO


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


def _tsoSegments(pacingRate: float, mss: int, minRtt: float | None = None) -> int:
    """
    Segments per TSO unit at this pacing rate (bytes per second):
    C{tcp_tso_autosize} with BBR's C{min_tso_segs}, or, without C{minRtt},
    C{bbr_tso_segs_goal}.
    """
    least = 1 if pacingRate < BBR_MIN_TSO_RATE else 2
    nbytes = int(pacingRate) >> PACING_SHIFT
    if minRtt is not None:
        shift = int(minRtt * 1e6) >> TSO_RTT_LOG
        if shift < 32:
            nbytes += GSO_MAX_SIZE >> shift
        nbytes = min(nbytes, GSO_MAX_SIZE)
    return min(max(nbytes // mss, least), 0x7F)


class _Sender:
    """
    One hop of L{hopDeliveries}: a Linux sender (BBR, or Reno's slow start
    unpaced), its link and its receiver, segment by segment.
    """

    def __init__(self, lengths: Sequence[int], rtt: float, rate: float | None,
                 iw: int, mss: int, bbr: bool = True) -> None:
        n = len(lengths)
        self.bbr = bbr
        self.lengths = lengths
        self.oneWay = rtt / 2
        self.rate = rate
        self.mss = mss
        self.ackSer = _serialization(WIRE_OVERHEAD, rate)
        self.arrive = [0.0] * n
        self.ackAt = [0.0] * n
        self.txTime = [0.0] * n
        self.txDelivered = [0] * n
        self.txDeliveredAt = [0.0] * n
        self.txFirst = [0.0] * n
        self.txAppLimited = [False] * n
        self.linkFree = -math.inf
        self.ackLinkFree = -math.inf
        # The handshake's round trip: SYN and SYN-ACK, headers only.
        handshake = rtt + 2 * self.ackSer
        self.minRtt = handshake
        self.pacingRate = BBR_HIGH_GAIN * iw * mss / handshake * BBR_PACING_MARGIN
        self.cwnd = iw
        self.written = 0  # segments the application has written
        self.sent = 0
        self.acked = 0
        self.delivered = 1  # the SYN-ACK counts (tcp_rcv_state_process)
        self.deliveredAt = 0.0
        self.firstTx = 0.0
        self.appLimited = 0
        self.dataSegsOut = 0
        self.wstamp = -math.inf
        # Unsent socket buffers: [first segment, segments].
        self.queue: list[list[int]] = []
        # BBR's state.
        self.bwSamples: list[tuple[int, float]] = []  # (round, segments/s)
        self.roundCount = 0
        self.nextRoundDelivered = self.delivered
        self.fullBw = 0.0
        self.fullBwCount = 0
        self.fullBwReached = False
        self.mode = "startup"
        self.pacingGain = BBR_HIGH_GAIN
        self.cwndGain = BBR_HIGH_GAIN

    def maxBw(self) -> float:
        """
        The largest delivery rate of the last L{BBR_BW_RTTS} rounds,
        segments per second.
        """
        recent = [bw for r, bw in self.bwSamples if r > self.roundCount - BBR_BW_RTTS]
        return max(recent, default=0.0)

    def write(self, count: int, now: float) -> None:
        """
        The application writes C{count} more segments (C{tcp_sendmsg}).
        """
        inflight = self.sent - self.acked
        if self.written == self.sent and inflight < self.cwnd:
            # tcp_rate_check_app_limited: nothing left to send.
            self.appLimited = (self.delivered + inflight) or 1
        goal = _tsoSegments(self.pacingRate, self.mss)
        first = self.written
        self.written += count
        while first < self.written:
            if self.queue and self.queue[-1][1] < goal:
                room = goal - self.queue[-1][1]
                take = min(room, self.written - first)
                self.queue[-1][1] += take
            else:
                take = min(goal, self.written - first)
                self.queue.append([first, take])
            first += take

    def nextSend(self) -> float | None:
        """
        When the sender may send next if nothing else happens, or L{None}
        if it must wait for an ACK or data.
        """
        if self.queue and self.sent - self.acked < self.cwnd:
            return self.wstamp
        return None

    def send(self, now: float) -> None:
        """
        Send what the window, the pacing and the queue allow at C{now}.
        """
        while self.queue and self.sent - self.acked < self.cwnd and self.wstamp <= now:
            head = self.queue[0]
            limit = min(head[1], self.cwnd - (self.sent - self.acked),
                        _tsoSegments(self.pacingRate, self.mss, self.minRtt))
            if limit == head[1]:
                self.queue.pop(0)
            else:
                head[0] += limit
                head[1] -= limit
            if self.sent == self.acked:  # tcp_rate_skb_sent: nothing in flight
                self.firstTx = self.deliveredAt = now
            nbytes = 0
            for i in range(self.sent, self.sent + limit):
                self.txTime[i] = now
                self.txDelivered[i] = self.delivered
                self.txDeliveredAt[i] = self.deliveredAt
                self.txFirst[i] = self.firstTx
                self.txAppLimited[i] = self.appLimited > 0
                self.linkFree = max(self.linkFree, now) + _serialization(
                    self.lengths[i] + WIRE_OVERHEAD, self.rate)
                self.arrive[i] = self.linkFree + self.oneWay
                self.ackLinkFree = max(self.ackLinkFree, self.arrive[i]) + self.ackSer
                self.ackAt[i] = self.ackLinkFree + self.oneWay
                nbytes += self.lengths[i]
            self.sent += limit
            self.dataSegsOut += limit
            # __tcp_transmit_skb, then tcp_update_skb_after_send.
            prior = self.wstamp
            self.wstamp = max(self.wstamp, now)
            if self.bbr and self.dataSegsOut >= UNPACED_SEGMENTS:
                length = nbytes / self.pacingRate
                self.wstamp += length - min(length / 2, self.wstamp - prior)

    def ack(self, now: float) -> None:
        """
        The ACK of the next unacknowledged segment arrives (C{tcp_ack},
        C{tcp_rate_gen}, C{bbr_main}).
        """
        i = self.acked
        self.acked += 1
        self.delivered += 1
        self.deliveredAt = now
        if not self.bbr:
            self.cwnd += 1  # slow start, no loss: no threshold
            return
        self.firstTx = self.txTime[i]
        if self.appLimited and self.delivered > self.appLimited:
            self.appLimited = 0
        self.minRtt = min(self.minRtt, now - self.txTime[i])
        interval = max(self.txTime[i] - self.txFirst[i], now - self.txDeliveredAt[i])
        sampleDelivered = self.delivered - self.txDelivered[i]
        roundStart = False
        if interval > 0 and interval >= self.minRtt:
            if self.txDelivered[i] >= self.nextRoundDelivered:
                self.nextRoundDelivered = self.delivered
                self.roundCount += 1
                roundStart = True
            bw = sampleDelivered / interval
            if not self.txAppLimited[i] or bw >= self.maxBw():
                self.bwSamples.append((self.roundCount, bw))
        bw = self.maxBw()
        if not self.fullBwReached and roundStart and not self.txAppLimited[i]:
            if bw >= self.fullBw * BBR_FULL_BW_THRESH:
                self.fullBw = bw
                self.fullBwCount = 0
            else:
                self.fullBwCount += 1
                self.fullBwReached = self.fullBwCount >= BBR_FULL_BW_CNT
        if self.mode == "startup" and self.fullBwReached:
            self.mode = "drain"
            self.pacingGain = BBR_DRAIN_GAIN
        if self.mode == "drain" and self.sent - self.acked <= self._inflight(bw, 1.0):
            self.mode = "probe-bw"
            self.pacingGain = 1.0
            self.cwndGain = BBR_CWND_GAIN
        rate = bw * self.mss * self.pacingGain * BBR_PACING_MARGIN
        if self.fullBwReached or rate > self.pacingRate:
            self.pacingRate = rate
        target = self._inflight(bw, self.cwndGain)
        if self.fullBwReached:
            self.cwnd = min(self.cwnd + 1, target)
        elif self.cwnd < target or self.delivered < TCP_INIT_CWND:
            self.cwnd += 1
        self.cwnd = max(self.cwnd, BBR_CWND_MIN)

    def _inflight(self, bw: float, gain: float) -> int:
        """
        C{bbr_inflight}: the bandwidth-delay product with a gain, plus the
        quantization budget.
        """
        cwnd = math.ceil(bw * self.minRtt * gain - 1e-9) + 3 * _tsoSegments(self.pacingRate, self.mss)
        return (cwnd + 1) & ~1


def hopDeliveries(
    ready: Sequence[float],
    rtt: float,
    rate: float | None = None,
    iw: int = DEFAULT_IW,
    mss: int = DEFAULT_MSS,
    lengths: Sequence[int] | None = None,
    congestionControl: CongestionControl | str = CongestionControl.BBR,
) -> list[float]:
    """
    When each segment of an answer reaches the receiver of one hop whose
    sender runs BBR (see the module docstring), or, with C{reno} or
    C{cubic}, slow start sending each round at once: then the hops of
    L{segmentSpread} reproduce L{predict}'s closed form but for a few
    serializations.

    @param ready: When each segment is written to the sender's socket,
        seconds, in order (all 0 for a server answering at once; the
        previous hop's deliveries for a proxy relaying them).
    @param rtt: The hop's round trip, seconds.
    @param rate: The link's rate, bits per second, or L{None} for no limit.
    @param iw: The initial window, segments.
    @param mss: The segment size, bytes.
    @param lengths: Each segment's payload, bytes (C{mss} each by default).
    @param congestionControl: The sender's congestion control.
    @return: When each segment arrives at the receiver, seconds.
    """
    if lengths is None:
        lengths = [mss] * len(ready)
    bbr = CongestionControl(congestionControl) is CongestionControl.BBR
    sender = _Sender(lengths, rtt, rate, iw, mss, bbr)
    n = len(ready)
    now = ready[0] if n else 0.0
    while sender.acked < n:
        # Everything due now: ACKs, then writes, then sending.
        while sender.acked < sender.sent and sender.ackAt[sender.acked] <= now:
            sender.ack(sender.ackAt[sender.acked])
        due = sender.written
        while due < n and ready[due] <= now:
            due += 1
        if due > sender.written:
            sender.write(due - sender.written, now)
        sender.send(now)
        candidates = []
        if sender.acked < sender.sent:
            candidates.append(sender.ackAt[sender.acked])
        if sender.written < n:
            candidates.append(ready[sender.written])
        release = sender.nextSend()
        if release is not None and release > now:
            candidates.append(release)
        if not candidates:
            break
        now = min(candidates)
    return sender.arrive


def segmentSpread(
    rtts: Sequence[float],
    size: int,
    iw: int = DEFAULT_IW,
    mss: int = DEFAULT_MSS,
    rate: float | None = None,
    congestionControl: CongestionControl | str = CongestionControl.BBR,
) -> float:
    """
    From the answer's first byte reaching the client to its last, segment
    by segment: the server writes the whole answer at once to the last
    hop, and each proxy relays every segment to the next hop as it
    arrives (L{hopDeliveries}, every hop with this congestion control).

    @param rtts: Each hop's round trip, seconds, client side first.
    @return: Seconds.
    """
    lengths = segmentLengths(size, mss)
    if not lengths:
        return 0.0
    ready = [0.0] * len(lengths)
    for rtt in reversed(rtts):
        ready = hopDeliveries(ready, rtt, rate, iw, mss, lengths, congestionControl)
    return ready[-1] - ready[0]


def segmentLengths(size: int, mss: int = DEFAULT_MSS) -> list[int]:
    """
    The payloads of the segments that carry C{size} bytes.
    """
    full, rest = divmod(size, mss)
    return [mss] * full + ([rest] if rest else [])


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
    congestionControl: CongestionControl | str = CongestionControl.RENO,
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
    @param congestionControl: The senders' congestion control (a
        L{CongestionControl} or its value): C{reno} and C{cubic} send each
        slow-start round at once; C{bbr} paces them (L{segmentSpread}).
        It changes only the TTC: the first window is never paced.
    """
    first = ttfb(rtts, mode, rate, mss=mss)
    rounds = slowStartRounds(size, iw, mss)
    if CongestionControl(congestionControl) is CongestionControl.BBR:
        return Prediction(ttfb=first, ttc=first + segmentSpread(rtts, size, iw, mss, rate),
                          rounds=rounds)
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
