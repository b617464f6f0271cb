"""
Tests for L{benchmarks}: the benchmark runs end to end at a tiny size and
writes well-formed results.  Nothing here checks how fast anything is.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import threading
from pathlib import Path

from twisted.trial import unittest

from benchmarks import measure, native, peers, profile, pyfloor, report, run


class ParsingTests(unittest.TestCase):
    """
    The pieces that turn tool output into figures.
    """

    def test_percentile(self) -> None:
        """
        L{measure.percentile} is the nearest-rank percentile: the p99 of
        1..100 is 99, the p50 of 1..4 is 2, and there is none of nothing.
        """
        self.assertEqual(measure.percentile(list(range(100, 0, -1)), 99), 99)
        self.assertEqual(measure.percentile([4, 1, 3, 2], 50), 2)
        self.assertIsNone(measure.percentile([], 50))

    def test_burst(self) -> None:
        """
        C{mpbench burst} lines become connections; only those that got
        their byte count in the times, the others are failures by kind.
        """
        connections = measure.parseBurst(
            "conn 0 100 2000 ok\nconn 1 300 4000 ok\nconn 2 -1 -1 refused\n"
            "conn 3 50 -1 timeout\nspread 10\ndone\n"
        )
        self.assertEqual(
            [c["status"] for c in connections], ["ok", "ok", "refused", "timeout"]
        )
        summary = measure.summarizeBurst(connections)
        self.assertEqual(summary["attempts"], 4)
        self.assertEqual(summary["failures"], 2)
        self.assertEqual(summary["failureKinds"], {"refused": 1, "timeout": 1})
        self.assertAlmostEqual(summary["connectMeanMs"], 0.2)
        self.assertAlmostEqual(summary["firstByteMeanMs"], 3.0)
        self.assertAlmostEqual(summary["firstByteP99Ms"], 4.0)

    def test_profileSummary(self) -> None:
        """
        Collapsed stacks are summed by innermost frame and by the package
        it lives in (self), and for the project's own functions by every
        frame they appear in (inclusive), as shares of all samples.
        """
        raw = (
            "process 1;thread (0x1);run (twisted/internet/base.py:10);"
            "doRead (twisted/internet/tcp.py:5) 3\n"
            "process 1;thread (0x1);run (twisted/internet/base.py:10);"
            "dataReceived (miniproxy/legs.py:9);send (socket.py:7) 1\n"
        )
        summary = profile.summarize(raw)
        self.assertEqual(summary["samples"], 4)
        self.assertEqual(summary["self"], [
            {"function": "doRead (internet/tcp.py)", "share": 0.75},
            {"function": "send (socket.py)", "share": 0.25},
        ])
        self.assertEqual(summary["selfByArea"], [
            {"area": "twisted/internet", "share": 0.75},
            {"area": "stdlib socket", "share": 0.25},
        ])
        self.assertEqual(summary["inclusive"], [
            {"function": "dataReceived (miniproxy/legs.py)", "share": 0.25},
        ])

    def test_haproxyConfig(self) -> None:
        """
        HAProxy runs one thread in TCP mode; the splice peer adds the three
        splice options, the plain one none.
        """
        plain = peers.haproxyConfig(1000, 2000, splice=False)
        spliced = peers.haproxyConfig(1000, 2000, splice=True)
        for config in (plain, spliced):
            self.assertIn("nbthread 1\n", config)
            self.assertIn("mode tcp\n", config)
            self.assertIn("bind 127.0.0.1:1000\n", config)
            self.assertIn("server backend 127.0.0.1:2000\n", config)
        for option in ("splice-auto", "splice-request", "splice-response"):
            self.assertNotIn(option, plain)
            self.assertIn(f"option {option}\n", spliced)


class RoundsTests(unittest.TestCase):
    """
    L{run.runMeasurements} runs measurement by measurement, in rounds over
    every peer, and keeps each peer's best round.
    """

    def test_bestRound(self) -> None:
        """
        Throughput runs in rounds over all peers in order; the highest
        rate counts and every round's is kept; a measurement without
        rounds runs once per peer; a peer that fails keeps its error.
        """
        calls: list[tuple[str, str]] = []
        rates = {"direct": iter([3.0, 5.0]), "haproxy": iter([2.0, 1.0])}

        def measureOne(bench: object, peer: peers.Peer, name: str, sizes: object) -> object:
            calls.append((name, peer.name))
            if name == "throughput":
                return {"gbps": next(rates[peer.name])}
            if peer.name == "haproxy":
                raise RuntimeError("no memory")
            return {"rss": 1}

        self.patch(run, "measureOne", measureOne)
        results: dict = {"direct": {"label": "d"}, "haproxy": {"label": "h"}}
        run.runMeasurements(
            None, (peers.DIRECT, peers.HAPROXY), run.Sizes(rounds=2),  # type: ignore[arg-type]
            ("throughput", "idleMemory"), results, lambda line: None)
        self.assertEqual(calls, [
            ("throughput", "direct"), ("throughput", "haproxy"),
            ("throughput", "direct"), ("throughput", "haproxy"),
            ("idleMemory", "direct"), ("idleMemory", "haproxy"),
        ])
        self.assertEqual(results["direct"]["throughput"], {"gbps": 5.0, "rounds": [3.0, 5.0]})
        self.assertEqual(results["haproxy"]["throughput"], {"gbps": 2.0, "rounds": [2.0, 1.0]})
        self.assertEqual(results["direct"]["idleMemory"], {"rss": 1})
        self.assertEqual(results["haproxy"]["idleMemory"],
                         {"error": "RuntimeError: no memory"})


TINY = run.Sizes(
    throughputSeconds=1.0,
    burstSizes=(5, 10),
    burstRepeats=1,
    shortClients=4,
    shortSeconds=0.5,
    idlePairs=20,
    coldRuns=1,
    listenerRuns=2,
    hookFlows=20,
    hookChunks=100,
    hookRounds=1,
    rounds=1,
)


class SmokeTests(unittest.TestCase):
    """
    The whole benchmark at a tiny size, against direct, HAProxy and
    miniproxy.
    """

    def setUp(self) -> None:
        missing = [n for n in ("haproxy", "iperf3") if shutil.which(n) is None]
        if native.compiler() is None:
            missing.append("a C compiler")
        if missing:
            raise unittest.SkipTest(f"not installed: {', '.join(missing)}")

    def test_runAll(self) -> None:
        """
        L{run.runAll} measures every figure of every peer, without errors,
        and writes JSON, CSV and markdown that agree with what it returned;
        the document's results section is replaced, the rest kept.
        """
        out = Path(self.mktemp())
        doc = out / "doc.md"
        out.mkdir()
        doc.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n")
        chosen = (peers.DIRECT, peers.HAPROXY, peers.MINIPROXY_ACCEPT)
        results = run.runAll(out, TINY, chosen, command="smoke", doc=doc, plots=False,
                             log=lambda line: None, pin=False)

        self.assertEqual(json.loads((out / "results.json").read_text()), results)
        self.assertEqual(results["command"], "smoke")
        self.assertEqual(list(results["peers"]), [p.name for p in chosen])
        errors = {
            (name, key): value["error"]
            for name, peer in results["peers"].items()
            for key, value in peer.items()
            if isinstance(value, dict) and "error" in value
        }
        self.assertEqual(errors, {})

        for name in ("direct", "haproxy", "miniproxy-accept"):
            peer = results["peers"][name]
            self.assertGreater(peer["throughput"]["gbps"], 0)
            self.assertEqual(sorted(peer["simultaneous"], key=int), ["5", "10"])
            for size, burst in peer["simultaneous"].items():
                self.assertEqual(burst["attempts"], int(size))
                self.assertEqual(burst["failures"], 0)
                self.assertGreater(burst["firstByteMeanMs"], 0)
                self.assertGreaterEqual(burst["firstByteP99Ms"], burst["firstByteMeanMs"])
            self.assertGreater(peer["shortFlows"]["flows"], 0)
            self.assertEqual(peer["shortFlows"]["errors"], 0)
        for name in ("haproxy", "miniproxy-accept"):
            peer = results["peers"][name]
            self.assertEqual(peer["idleMemory"]["held"], TINY.idlePairs)
            self.assertGreater(peer["idleMemory"]["during"]["rss"], 0)
            self.assertEqual(len(peer["coldStart"]["runsMs"]), TINY.coldRuns)
            self.assertGreater(peer["coldStart"]["medianMs"], 0)
        self.assertIsNone(results["peers"]["direct"]["idleMemory"])

        mine = results["peers"]["miniproxy-accept"]
        for mode in ("accept", "early"):
            self.assertEqual(len(mine["newListener"][mode]["firstByteRunsMs"]),
                             TINY.listenerRuns)
        self.assertEqual(len(mine["controlAdd"]["runsMs"]), TINY.listenerRuns)
        self.assertGreater(mine["controlAdd"]["medianMs"], 0)
        if shutil.which("socat"):
            self.assertEqual(len(mine["controlAdd"]["socat"]["runsMs"]), TINY.listenerRuns)
        self.assertEqual(mine["hookMicro"]["flows"], TINY.hookFlows)
        self.assertEqual(mine["pythonMemory"]["flowsHeld"], TINY.idlePairs)
        self.assertIn("miniproxy.tap", mine["startupImports"]["importTimeMs"])
        self.assertGreater(mine["pythonMemory"]["tracedPerPair"], 0)
        comparison = mine["hookComparison"]
        self.assertEqual(len(comparison["shortFlowsNoop"]), TINY.hookRounds)
        self.assertGreater(comparison["noopCounts"]["chunks"], 0)
        for key in ("perFlowUs", "perChunkNs", "dispatchFlowUs", "dispatchChunkNs"):
            self.assertIn(key, results["hookOverhead"])

        with open(out / "results.csv", newline="") as f:
            rows = list(csv.reader(f))
        self.assertEqual(rows[0], ["peer", "measurement", "figure", "value",
                                   "ratio_to_haproxy"])
        haproxyRate = [r for r in rows if r[:3] == ["haproxy", "shortFlows", "flowsPerSecond"]]
        self.assertEqual(len(haproxyRate), 1)
        self.assertAlmostEqual(float(haproxyRate[0][4]), 1.0)

        table = (out / "results.md").read_text()
        for peer in chosen:
            self.assertIn(f"| {peer.label} |", table)
        self.assertIn("Table 1", table)
        text = doc.read_text()
        self.assertTrue(text.startswith(f"intro\n{report.BEGIN}\n"))
        self.assertTrue(text.endswith(f"{report.END}\noutro\n"))
        self.assertNotIn("\nold\n", text)
        self.assertIn("| HAProxy (1 thread) |", text)


def _readAll(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


class FloorRelayTests(unittest.TestCase):
    """
    L{pyfloor.FloorRelay}, the CPython floor peer, relays exactly, with
    backpressure and half-close, on real loopback sockets.
    """

    def _listener(self) -> socket.socket:
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.settimeout(30)
        return sock

    def _relay(self) -> tuple[pyfloor.FloorRelay, int, socket.socket]:
        backend = self._listener()
        relay = pyfloor.FloorRelay(self._listener(), backend.getsockname())
        thread = threading.Thread(target=relay.run)
        thread.start()

        def stop() -> None:
            relay.stop()
            thread.join(30)

        self.addCleanup(stop)
        return relay, relay.listener.getsockname()[1], backend

    def test_bothWaysWithHalfClose(self) -> None:
        """
        Several megabytes go each way, byte-exact; the client's FIN reaches
        the backend after the last byte, the backend's reply follows it, and
        the backend's close ends the client's stream.  Afterwards the relay
        holds no socket of the flow.
        """
        relay, port, backend = self._relay()
        request, reply = os.urandom(3_000_001), os.urandom(2_000_003)
        received: dict[str, bytes] = {}

        def serve() -> None:
            conn, _ = backend.accept()
            with conn:
                conn.settimeout(30)
                received["request"] = _readAll(conn)
                conn.sendall(reply)

        server = threading.Thread(target=serve)
        server.start()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.sendall(request)
            client.shutdown(socket.SHUT_WR)
            answer = _readAll(client)
        server.join(30)
        self.assertEqual(received["request"], request)
        self.assertEqual(answer, reply)
        self.assertEqual(relay.ends, {})

    def test_refusedBackend(self) -> None:
        """
        A flow whose backend refuses the connection is closed at once, and
        both of its sockets are let go.
        """
        relay, port, backend = self._relay()
        backend.close()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            self.assertEqual(_readAll(client), b"")
        self.assertEqual(relay.ends, {})
