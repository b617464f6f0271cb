"""
Tests for L{miniproxy.model}: the analytical model reproduces the paper's
first-principles figures.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from miniproxy.model import Mode, evenRTTs, predict, slowStartRounds, ttfb

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
