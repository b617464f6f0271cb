"""
Tests for L{miniproxy.model}: the analytical model reproduces the paper's
first-principles figures, and its BBR variant follows Linux's STARTUP.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from miniproxy.model import (
    BBR_HIGH_GAIN,
    BBR_PACING_MARGIN,
    WIRE_OVERHEAD,
    CongestionControl,
    Mode,
    evenRTTs,
    hopDeliveries,
    predict,
    segmentLengths,
    segmentSpread,
    slowStartRounds,
    ttfb,
)

RTT = 0.100
KB = 1000


class SlowStartTests(unittest.TestCase):
    def test_rounds(self) -> None:
        self.assertEqual(slowStartRounds(0), 0)
        self.assertEqual(slowStartRounds(10 * KB), 1)  # 7 segments
        self.assertEqual(slowStartRounds(25 * KB), 2)  # 18: 10 + 8
        self.assertEqual(slowStartRounds(500 * KB), 6)  # 346: 10+20+40+80+160+36

    @given(st.integers(1, 10**7), st.integers(1, 20))
    def test_roundsCoverSize(self, size: int, iw: int) -> None:
        rounds = slowStartRounds(size, iw)
        segments = -(-size // 1448)
        self.assertGreaterEqual(iw * (2**rounds - 1), segments)
        self.assertLess(iw * (2 ** (rounds - 1) - 1), segments)


class PaperFiguresTests(unittest.TestCase):
    """
    At 100 ms RTT with evenly spaced proxies and no rate limit, the model
    gives the issue's first-principles predictions.
    """

    def assertMs(self, seconds: float, ms: float, places: int = 1) -> None:
        self.assertAlmostEqual(seconds * 1000, ms, places=places)

    def test_ttfb(self) -> None:
        for proxies, expected in zip(range(4), (200, 150, 133.3, 125)):
            self.assertMs(ttfb(evenRTTs(RTT, proxies), Mode.ESF), expected)

    def test_acceptGainsNothing(self) -> None:
        for proxies in range(4):
            self.assertMs(ttfb(evenRTTs(RTT, proxies), Mode.ACCEPT), 200)

    def test_reductions(self) -> None:
        """
        ESF cuts TTFB by 25 %, 33.3 % and 37.5 %; TTC of 25 KB by 33 %,
        44 % and 49 % (the paper's numbers).
        """
        base = predict(evenRTTs(RTT, 0), 25 * KB)
        for proxies, cutTTFB, cutTTC in ((1, 25, 33.3), (2, 33.3, 44.4), (3, 37.5, 50)):
            p = predict(evenRTTs(RTT, proxies), 25 * KB)
            self.assertAlmostEqual((1 - p.ttfb / base.ttfb) * 100, cutTTFB, places=1)
            self.assertAlmostEqual((1 - p.ttc / base.ttc) * 100, cutTTC, places=1)

    def test_ttc(self) -> None:
        for proxies, small, large in zip(range(4), (300, 200, 166.7, 150), (700, 400, 300, 250)):
            self.assertMs(predict(evenRTTs(RTT, proxies), 25 * KB).ttc, small)
            self.assertMs(predict(evenRTTs(RTT, proxies), 500 * KB).ttc, large)

    def test_fastOpenEverywhere(self) -> None:
        """
        With Fast Open on every hop TTFB is one RTT whatever the number of
        proxies, and 25 KB completes in about 151, 135 and 126 ms at
        100 Mb/s.
        """
        for proxies in range(1, 4):
            self.assertMs(ttfb(evenRTTs(RTT, proxies), Mode.TFO_ALL), 100)
        for proxies, expected in ((1, 151), (2, 135), (3, 126)):
            p = predict(evenRTTs(RTT, proxies), 25 * KB, Mode.TFO_ALL, rate=100e6)
            self.assertLessEqual(abs(p.ttc * 1000 - expected), 2.5)

    def test_lastRoundTail(self) -> None:
        """
        At a finite rate the last round adds the serialization of the
        segments left for it, not of a full window: 500 KB is 346
        segments, 310 in five full rounds and 36 in the sixth.
        """
        rate = 100e6
        rtts = evenRTTs(RTT, 0)
        p = predict(rtts, 500 * KB, rate=rate)
        self.assertAlmostEqual(
            p.ttc - ttfb(rtts, rate=rate), 5 * RTT + 35 * (1448 + 52) * 8 / rate, places=9
        )

    def test_fastOpenFirstHop(self) -> None:
        """
        Fast Open on the client's hop saves the client's handshake: one
        client-side RTT off ESF's TTFB when that hop is the bottleneck.
        """
        rtts = evenRTTs(RTT, 1)
        self.assertMs(ttfb(rtts, Mode.ESF) - ttfb(rtts, Mode.TFO_FIRST), 0)
        rtts = [0.080, 0.020]
        self.assertLess(ttfb(rtts, Mode.TFO_FIRST), ttfb(rtts, Mode.ESF))

    def test_offPath(self) -> None:
        """
        Figure 5: a proxy that lengthens both links from 25 to 37.5 ms one
        way still beats the direct path for flows of two rounds or more.
        """
        direct = predict(evenRTTs(RTT, 0), 25 * KB).ttc
        for extra in (0, 0.005, 0.010, 0.015, 0.020, 0.025):
            p = predict([0.050 + extra, 0.050 + extra], 25 * KB)
            self.assertLessEqual(p.ttc, direct)

    @given(st.lists(st.floats(0.001, 0.2), min_size=1, max_size=5),
           st.integers(1, 2_000_000))
    def test_ordering(self, rtts: list[float], size: int) -> None:
        """
        For any chain: accept >= ESF >= TFO first hop >= TFO everywhere,
        and TTC >= TTFB.
        """
        values = [predict(rtts, size, m) for m in Mode]
        ttfbs = [v.ttfb for v in values]
        self.assertEqual(ttfbs, sorted(ttfbs, reverse=True))
        for v in values:
            self.assertGreaterEqual(v.ttc, v.ttfb)


RATE = 100e6
BBR = CongestionControl.BBR


def ser(nbytes: int, rate: float = RATE) -> float:
    """
    Seconds to serialize C{nbytes} at C{rate}.
    """
    return nbytes * 8 / rate


def initialPacingRate(rtt: float, iw: int = 10, mss: int = 1448) -> float:
    """
    BBR's first pacing rate, bytes per second: C{high_gain * cwnd * mss /
    srtt}, less the 1 % margin, C{srtt} being the handshake's round trip
    (two header-only packets at L{RATE}).
    """
    return BBR_HIGH_GAIN * iw * mss / (rtt + 2 * ser(WIRE_OVERHEAD)) * BBR_PACING_MARGIN


class CongestionControlTests(unittest.TestCase):
    """
    The congestion control parameter: Reno and CUBIC are the closed form;
    BBR paces the rounds after the first.
    """

    def test_renoAndCubicAreTheClosedForm(self) -> None:
        """
        C{reno} (the default) and C{cubic} give the same numbers, the
        paper's first-principles ones (L{PaperFiguresTests}).
        """
        for proxies in range(4):
            for size in (10 * KB, 25 * KB, 500 * KB):
                rtts = evenRTTs(RTT, proxies)
                default = predict(rtts, size, rate=RATE)
                self.assertEqual(predict(rtts, size, rate=RATE, congestionControl="reno"), default)
                self.assertEqual(
                    predict(rtts, size, rate=RATE, congestionControl=CongestionControl.CUBIC), default)

    def test_firstWindowUnpaced(self) -> None:
        """
        Linux paces nothing before a socket has sent 10 data segments, so a
        flow that fits in the initial window (10 KB: 7 segments) completes
        as with Reno (but for the closed form charging its last, short
        segment a full segment's serialization), and BBR changes no TTFB.
        """
        for proxies in range(4):
            rtts = evenRTTs(RTT, proxies)
            reno = predict(rtts, 10 * KB, rate=RATE)
            bbr = predict(rtts, 10 * KB, rate=RATE, congestionControl=BBR)
            self.assertEqual(bbr.ttfb, reno.ttfb)
            self.assertAlmostEqual(
                bbr.ttc - bbr.ttfb,
                segmentSpread(rtts, 10 * KB, rate=RATE, congestionControl="reno"), places=12)
            self.assertLessEqual(abs(bbr.ttc - reno.ttc), ser(1448))

    def test_direct25KB(self) -> None:
        """
        25 KB direct at 100 ms and 100 Mb/s, by hand.  It is 18 segments
        (17 of 1448 bytes and one of 384), written at once, so in TSO
        units of 2 (at about 414 KB/s, C{rate >> 10} is less than one
        segment).  The first 10 leave at once.  The first ACK comes back
        one round trip and a data and an ACK serialization after the first
        one left; each ACK then opens the window by one, so the window is
        not the limit: the pacing rate is.  It is still the initial
        C{2.887 * 10 * 1448 B / 100 ms * 0.99 = 413.8 KB/s} (the
        round-1 delivery rates, at most 10 segments in a round trip and a
        bit, do not raise it), so a pair takes C{2896 / 413782 = 7.0 ms};
        the first pair after the idle round trip leaves at once and earns
        half of that as credit, so the four pairs of round 2 leave 0, 3.5,
        10.5 and 17.5 ms after the first ACK.  The last one's second
        segment (384 bytes) arrives one serialization after its first; the
        first byte arrived one full-segment serialization after it left:
        TTC = TTFB + 100 ms + ser(data) + ser(ACK) + 2.5 pairs +
        ser(384 + 52) = 200.1 + 117.7 = 317.8 ms (measured: 319.2 ms; the
        burst model: 301.0 ms).
        """
        pair = 2 * 1448 / initialPacingRate(RTT)
        spread = RTT + ser(1448 + WIRE_OVERHEAD) + ser(WIRE_OVERHEAD) + 2.5 * pair + ser(384 + WIRE_OVERHEAD)
        p = predict([RTT], 25 * KB, rate=RATE, congestionControl=BBR)
        self.assertAlmostEqual(p.ttc, ttfb([RTT], rate=RATE) + spread, places=7)
        self.assertAlmostEqual(p.ttc * 1000, 317.8, places=1)

    def test_oneProxy25KB(self) -> None:
        """
        25 KB through one proxy, by hand.  Each hop is 50 ms, so the
        initial pacing rate is twice the direct path's and a pair takes
        3.5 ms.  The server's hop alone is the direct case at 50 ms: its
        second round's four pairs leave 0, 1.75, 5.25 and 8.75 ms after its
        first ACK.  The proxy's own first window ended just as its ACKs
        come back, so its window is open and it relays each segment as it
        arrives; but the second segment of a pair arrives a serialization
        after the first, so the proxy sends the first alone, after its
        idle round trip, with half a segment's pacing time (0.875 ms) as
        credit, and the second waits for that.  From then on it paces a
        segment per 1.75 ms, as fast as they arrive: everything after
        leaves 0.875 ms later than it would have, so TTC = TTFB + the
        server's hop's spread + 0.875 ms = 150.3 + 58.9 + 0.9 = 210.0 ms
        (measured: 212.3 ms; the burst model: 201.1 ms).
        """
        rtts = evenRTTs(RTT, 1)
        hop = rtts[0]
        rate0 = initialPacingRate(hop)
        alone = hop + ser(1448 + WIRE_OVERHEAD) + ser(WIRE_OVERHEAD) + 2.5 * 2 * 1448 / rate0 + ser(
            384 + WIRE_OVERHEAD)
        self.assertAlmostEqual(segmentSpread([hop], 25 * KB, rate=RATE), alone, places=7)
        p = predict(rtts, 25 * KB, rate=RATE, congestionControl=BBR)
        self.assertAlmostEqual(p.ttc, ttfb(rtts, rate=RATE) + alone + 1448 / rate0 / 2, places=7)
        self.assertAlmostEqual(p.ttc * 1000, 210.0, places=1)

    def test_direct100KBNeedsAnotherRoundTrip(self) -> None:
        """
        100 KB direct: 70 segments, exactly 10 + 20 + 40, so the burst
        model needs two round trips after the first byte (404.8 ms).  With
        BBR the second round's 20 segments leave at the initial rate, as
        10 pairs over 3.5 + 8 x 7 = 59.5 ms.  Each is acknowledged a round
        trip after it left, so its delivery-rate sample spreads what was
        delivered meanwhile over a round trip plus its place in those
        59.5 ms: at most about 12.5 segments per round trip (the first
        round's: 10).  The third round is paced at 2.887 times that, 32
        to 36 segments per round trip, so its 40 segments take about 105
        ms instead of leaving at once: after the first byte the flow needs
        more than three round trips, not two (model 508.9 ms, measured
        510.5 ms).
        """
        spread = segmentSpread([RTT], 100 * KB, rate=RATE)
        self.assertGreater(spread, 3 * RTT)
        self.assertLess(spread, 3.5 * RTT)
        reno = predict([RTT], 100 * KB, rate=RATE)
        self.assertLess(reno.ttc - reno.ttfb, 2.1 * RTT)

    def test_unpacedSegmentsAreTheClosedForm(self) -> None:
        """
        Without pacing (C{reno}), the segment-by-segment chain of
        L{segmentSpread}, each proxy relaying as segments arrive, is the
        closed form's slow start on even hops: with equal hops, each
        hop's next round's data arrives as its ACKs do.
        """
        for proxies in range(4):
            for size in (10 * KB, 25 * KB, 100 * KB, 500 * KB):
                rtts = evenRTTs(RTT, proxies)
                closed = predict(rtts, size).ttc - ttfb(rtts)
                self.assertAlmostEqual(segmentSpread(rtts, size, congestionControl="reno"), closed,
                                       places=9)

    @given(st.lists(st.floats(0.002, 0.2), min_size=1, max_size=4),
           st.integers(1, 400_000), st.integers(4, 40),
           st.sampled_from([None, 10e6, 100e6, 1e9]))
    def test_bbrNeverFasterThanBursts(self, rtts: list[float], size: int, iw: int,
                                      rate: float | None) -> None:
        """
        Pacing only holds segments back: BBR is never faster than the same
        chain sending each round at once (with an initial window of at
        least BBR's smallest window, 4: below it BBR opens the window to 4
        at the first ACK, and is faster).  On even hops without a rate
        limit, that is the closed form.
        """
        bursts = segmentSpread(rtts, size, iw, rate=rate, congestionControl="reno")
        paced = segmentSpread(rtts, size, iw, rate=rate, congestionControl=BBR)
        self.assertGreaterEqual(paced, bursts - 1e-9)

    @given(st.lists(st.floats(0.002, 0.2), min_size=1, max_size=4),
           st.integers(1, 300_000), st.integers(1, 5000), st.integers(4, 20),
           st.sampled_from(list(CongestionControl)), st.sampled_from([None, 100e6]))
    def test_monotoneInSize(self, rtts: list[float], size: int, more: int, iw: int,
                            cc: CongestionControl, rate: float | None) -> None:
        """
        More bytes never complete sooner.
        """
        smaller = predict(rtts, size, iw=iw, rate=rate, congestionControl=cc)
        larger = predict(rtts, size + more, iw=iw, rate=rate, congestionControl=cc)
        self.assertGreaterEqual(larger.ttc, smaller.ttc - 1e-9)

    @given(st.floats(0.01, 0.3), st.integers(0, 3), st.integers(1, 300_000),
           st.integers(4, 20), st.integers(1, 20), st.sampled_from(list(CongestionControl)))
    def test_fewerRoundsNeverSlower(self, rtt: float, proxies: int, size: int, iw: int,
                                    moreIW: int, cc: CongestionControl) -> None:
        """
        Fewer or shorter rounds never make a flow slower: a larger initial
        window, or one more proxy splitting the same round trip (ESF).
        """
        base = predict(evenRTTs(rtt, proxies), size, iw=iw, rate=RATE, congestionControl=cc)
        wider = predict(evenRTTs(rtt, proxies), size, iw=iw + moreIW, rate=RATE,
                        congestionControl=cc)
        split = predict(evenRTTs(rtt, proxies + 1), size, iw=iw, rate=RATE, congestionControl=cc)
        self.assertLessEqual(wider.ttc, base.ttc + 1e-9)
        self.assertLessEqual(split.ttc, base.ttc + 1e-9)

    @given(st.floats(0.002, 0.3), st.integers(1, 400), st.sampled_from([None, 100e6]))
    def test_deliveriesInOrder(self, rtt: float, segments: int, rate: float | None) -> None:
        """
        A hop delivers every segment, in order, no sooner than half its
        round trip after it was written.
        """
        ready = [i * 0.0005 for i in range(segments)]
        arrive = hopDeliveries(ready, rtt, rate)
        self.assertEqual(len(arrive), segments)
        self.assertEqual(arrive, sorted(arrive))
        for r, a in zip(ready, arrive):
            self.assertGreaterEqual(a, r + rtt / 2)

    def test_segmentLengths(self) -> None:
        self.assertEqual(segmentLengths(0), [])
        self.assertEqual(segmentLengths(25 * KB), [1448] * 17 + [384])
        self.assertEqual(sum(segmentLengths(500 * KB)), 500 * KB)
