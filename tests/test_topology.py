"""
Tests for L{miniproxy.testbed.topology}: a line of namespaces joined by
delay lines.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from miniproxy.testbed import topology
from miniproxy.testbed.delayline import DEFAULT_QUEUE, DelayLine, Direction, readLine
from miniproxy.testbed.netns import (
    NetnsError,
    VethPair,
    listNamespaces,
    namespacePids,
    namespacesUnavailable,
)
from miniproxy.testbed.topology import (
    CLIENT_SIDE,
    SERVER_SIDE,
    LineTopology,
    Link,
    _waitForExit,
)
from tests.test_delayline import SINK, pingTimes, startHelper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 15.0

#: A transparent TCP listener, run in a proxy: it tells each client the
#: local address it was accepted on (the flow's real destination) and the
#: client's address.
TRANSPARENT = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    local = c.getsockname()
    c.sendall(f"{local[0]}:{local[1]} {peer[0]}:{peer[1]}".encode())
    c.close()
"""


def needNamespaces() -> None:
    reason = namespacesUnavailable(tools=("ip", "nft"))
    if reason is not None:
        raise unittest.SkipTest(reason)


class DescriptionTests(unittest.TestCase):
    """
    What a line is before it is built: links, names, addresses.
    """

    def test_rttSplitEvenly(self) -> None:
        """
        A round trip time is split evenly over the links and both ways.
        """
        line = LineTopology(proxies=3, rtt=40, rate=10**8, loss=0.01, queue=3000)
        self.assertEqual(line.specs, [Link(Direction(5.0, 10**8, 3000, 0.01))] * 4)
        self.assertEqual(line.oneWayDelay("client", "server"), 20.0)
        self.assertEqual(line.oneWayDelay("server", "p1"), 15.0)

    def test_delaysAndLinks(self) -> None:
        """
        Delays give each link's one-way delay; links give everything,
        including a different delay each way and veth links.
        """
        line = LineTopology(proxies=1, delays=[3, 7])
        self.assertEqual([s.toServer.delay for s in line.specs], [3, 7])
        self.assertEqual(line.specs[0].directions, (Direction(3), Direction(3)))
        links = [Link(Direction(1), Direction(2)), Link(veth=True)]
        line = LineTopology(proxies=1, links=links)
        self.assertEqual(line.specs, links)
        self.assertEqual(line.oneWayDelay(0, 2), 1.0)
        self.assertEqual(line.oneWayDelay(2, 0), 2.0)
        self.assertEqual(LineTopology(proxies=0).specs, [Link(Direction(0, None, DEFAULT_QUEUE))])

    def test_badDescriptions(self) -> None:
        """
        Conflicting or miscounted descriptions are refused.
        """
        self.assertRaises(ValueError, LineTopology, proxies=1, rtt=10, delays=[1, 2])
        self.assertRaises(ValueError, LineTopology, proxies=1, delays=[1])
        self.assertRaises(ValueError, LineTopology, proxies=2, links=[Link()])
        self.assertRaises(ValueError, LineTopology, proxies=-1)
        self.assertRaises(ValueError, LineTopology, proxies=1, delays=[1, -1])

    @given(st.integers(0, 12))
    def test_addresses(self, proxies: int) -> None:
        """
        Neighbours share a /24 with distinct addresses; each device is named
        after the neighbour it faces; the client and the server have one
        side only.
        """
        line = LineTopology(proxies=proxies)
        names = line.names
        self.assertEqual(names[0], "client")
        self.assertEqual(names[-1], "server")
        self.assertEqual(len(names), proxies + 2)
        for j in range(len(names) - 1):
            for family in (4, 6):
                mine = line.address(j, SERVER_SIDE, family)
                theirs = line.address(j + 1, CLIENT_SIDE, family)
                self.assertNotEqual(mine, theirs)
                separator = "." if family == 4 else "::"
                self.assertEqual(mine.rsplit(separator, 1)[0], theirs.rsplit(separator, 1)[0])
            self.assertEqual(line.interface(j, SERVER_SIDE), names[j + 1])
            self.assertEqual(line.interface(names[j + 1], CLIENT_SIDE), names[j])
        self.assertEqual(line.clientAddress, "10.0.0.1")
        self.assertEqual(line.serverAddress, f"10.0.{proxies}.2")
        self.assertRaises(ValueError, line.address, "client", CLIENT_SIDE)
        self.assertRaises(ValueError, line.address, "server", SERVER_SIDE)
        self.assertRaises(ValueError, line.interface, 0, CLIENT_SIDE)
        self.assertRaises(ValueError, line.address, "nobody")
        self.assertRaises(ValueError, line.address, 1, "sideways")

    def test_notBuilt(self) -> None:
        """
        The hosts of a line not built are not there; tearing it down does
        nothing.
        """
        line = LineTopology()
        self.assertRaises(NetnsError, lambda: line.client)
        self.assertRaises(NetnsError, lambda: line.prefix)
        line.teardown()

    def test_downRefusesForeignPrefix(self) -> None:
        """
        C{down} deletes only namespaces named by this testbed.
        """
        out = io.StringIO()
        self.assertEqual(topology.main(["down", "other-"], out=out), 2)
        self.assertIn("refusing prefix 'other-'", out.getvalue())


class LineTests(unittest.TestCase):
    """
    Real lines (root).
    """

    timeout = 120

    def setUp(self) -> None:
        needNamespaces()

    def build(self, **kwargs: Any) -> LineTopology:
        line = LineTopology(**kwargs)
        self.addCleanup(line.teardown)
        return line.build()

    def test_endToEnd(self) -> None:
        """
        Through two proxies, the client reaches the server and every
        address on the way, over IPv4 and IPv6; a round trip takes at
        least the line's round trip time, and each forwarder carried the
        traffic.
        """
        line = self.build(proxies=2, rtt=12)
        self.assertEqual([n.shortName for n in line.nodes], ["client", "p1", "p2", "server"])
        self.assertTrue(all(n.name.startswith(line.prefix) for n in line.nodes))
        sink = startHelper(line.server, SINK, "9000")
        self.addCleanup(lambda: [s.close() for s in (sink.stdout,) if s])
        for host, family in ((line.serverAddress, socket.AF_INET),
                             (line.address("server", CLIENT_SIDE, 6), socket.AF_INET6)):
            with line.client.socket(family) as client:
                client.settimeout(WAIT)
                started = time.monotonic()
                client.connect((host, 9000))
                self.assertGreaterEqual(time.monotonic() - started, 0.012)
                client.sendall(b"x" * 100_000)
                client.shutdown(socket.SHUT_WR)
                self.assertEqual(client.recv(100), b"100000")
        for j, node in enumerate(line.nodes[1:], 1):
            times = pingTimes(line.client, line.address(j, CLIENT_SIDE), 3)
            self.assertGreaterEqual(min(times), 2 * line.oneWayDelay(0, j))
        times = pingTimes(line.server, line.clientAddress, 3)
        self.assertGreaterEqual(statistics.median(times), 12.0)
        for forwarder in line.forwarders():
            counters = forwarder.stats()
            self.assertGreater(counters["ab"]["bytes"], 200_000)
            self.assertGreater(counters["ba"]["delivered"], 0)
        for proxy in line.proxies:
            self.assertIn("= 1", proxy.run(["sysctl", "net.ipv4.ip_forward"]).stdout)

    def test_vethLink(self) -> None:
        """
        A link can be a plain veth pair.
        """
        line = self.build(proxies=1, links=[Link.symmetric(2), Link(veth=True)], ipv6=False)
        self.assertIsInstance(line.links[0], DelayLine)
        self.assertIsInstance(line.links[1], VethPair)
        self.assertEqual(len(line.forwarders()), 1)
        times = pingTimes(line.client, line.serverAddress, 3)
        self.assertGreaterEqual(min(times), 4.0)

    def test_transparentInterception(self) -> None:
        """
        A proxy intercepts flows to the server with TPROXY: a transparent
        listener in p1 accepts them as if it were the server (no server
        listens at all), and sees the client's own address.
        """
        line = self.build(proxies=1, rtt=4)
        line.interceptTCP("p1", [80, 443], 8080)
        listener = startHelper(line.proxies[0], TRANSPARENT, "8080")
        self.addCleanup(lambda: listener.stdout and listener.stdout.close())
        for port in (80, 443):
            with line.client.socket() as client:
                client.settimeout(WAIT)
                client.connect((line.serverAddress, port))
                answer = client.recv(200).decode()
                local, peer = answer.split()
                self.assertEqual(local, f"{line.serverAddress}:{port}")
                self.assertEqual(peer, f"{line.clientAddress}:{client.getsockname()[1]}")
        self.assertRaises(ValueError, line.interceptTCP, "client", [80], 8080)

    def test_teardown(self) -> None:
        """
        Teardown removes the namespaces, the forwarders and their devices,
        and may run again.
        """
        line = self.build(proxies=1, rtt=4)
        pids = [f.process.pid for f in line.forwarders() if f.process]
        self.assertEqual(len(pids), 2)
        line.teardown()
        self.assertEqual([n for n in listNamespaces() if n.startswith(line.prefix)], [])
        self.assertTrue(all(not os.path.exists(f"/proc/{pid}") for pid in pids))
        line.teardown()

    def test_contextManager(self) -> None:
        """
        As a context manager, a line is built on entry and removed on exit,
        also when the block fails.
        """
        def fail() -> None:
            with LineTopology(proxies=0, rtt=2, ipv6=False) as line:
                self.prefix = line.prefix
                self.assertTrue(line.client.exists())
                raise KeyError("boom")

        self.assertRaises(KeyError, fail)
        self.assertEqual([n for n in listNamespaces() if n.startswith(self.prefix)], [])

    def test_failedBuild(self) -> None:
        """
        A build that fails half-way removes what it made.
        """
        started: list[DelayLine] = []
        original = DelayLine.start

        def failSecond(self: DelayLine, *args: Any, **kwargs: Any) -> DelayLine:
            if started:
                raise NetnsError("no second link today")
            started.append(self)
            return original(self, *args, **kwargs)

        self.patch(DelayLine, "start", failSecond)
        line = LineTopology(proxies=1)
        self.addCleanup(line.teardown)
        self.assertRaises(NetnsError, line.build)
        self.assertEqual([n for n in listNamespaces() if n.startswith(line.prefix)], [])
        [first] = started
        self.assertFalse(first.running)

    def test_atExit(self) -> None:
        """
        A process that builds a line and exits without tearing it down
        leaves nothing behind.
        """
        code = (
            "from miniproxy.testbed.topology import LineTopology\n"
            "line = LineTopology(proxies=1, rtt=4).build()\n"
            "print(line.prefix, flush=True)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        prefix = result.stdout.strip()
        self.assertRegex(prefix, r"^mp\d+-[0-9a-f]{6}-$")
        self.assertEqual([n for n in listNamespaces() if n.startswith(prefix)], [])

    def test_crashAndDown(self) -> None:
        """
        When the process that built a line is killed, the forwarders notice
        (their standard input closes) and exit, taking the devices; C{down}
        removes the namespaces left.
        """
        code = (
            "import sys\n"
            "from miniproxy.testbed.topology import LineTopology\n"
            "line = LineTopology(proxies=1, rtt=4).build()\n"
            "print(line.prefix, flush=True)\n"
            "sys.stdin.read()\n"
        )
        process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        assert process.stdout is not None and process.stdin is not None
        self.addCleanup(process.stdout.close)
        self.addCleanup(process.stdin.close)
        prefix = readLine(process.stdout, time.monotonic() + 60).decode().strip()
        self.addCleanup(topology.cleanupStale, prefix)
        forwarders = namespacePids(prefix + "client") + namespacePids(prefix + "p1")
        self.assertEqual(len(forwarders), 2)
        process.kill()
        process.wait()
        self.assertTrue(all(_waitForExit(pid, WAIT) for pid in forwarders))
        out = io.StringIO()
        self.assertEqual(topology.main(["down", prefix], out=out), 0)
        self.assertEqual(
            sorted(re.findall(r"deleted (\S+)", out.getvalue())),
            sorted(prefix + name for name in ("client", "p1", "server")),
        )
        self.assertEqual([n for n in listNamespaces() if n.startswith(prefix)], [])

    def test_upDown(self) -> None:
        """
        C{up} builds a line, prints it and keeps it until C{down PREFIX},
        then exits.
        """
        process = subprocess.Popen(
            [sys.executable, "-m", "miniproxy.testbed.topology", "up", "--proxies", "2",
             "--delays", "1,2,3", "--rate", "100000000", "--no-ipv6", "--watch-stdin"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        self.addCleanup(process.wait)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        assert process.stdout is not None and process.stderr is not None
        assert process.stdin is not None
        for stream in (process.stdin, process.stdout, process.stderr):
            self.addCleanup(stream.close)
        first = readLine(process.stdout, time.monotonic() + 60).decode()
        if not first.startswith("up "):
            process.kill()
            self.fail(f"up failed: {first!r} {process.stderr.read().decode()}")
        prefix = first.split()[1]
        self.addCleanup(topology.cleanupStale, prefix)
        description = [
            readLine(process.stdout, time.monotonic() + WAIT).decode() for _ in range(7)
        ]
        self.assertIn(f"{prefix}p2", description[2])
        self.assertIn("client: 10.0.0.2; p2: 10.0.1.1", description[1])
        self.assertIn("link 2: p2 -- server: toServer=Direction(delay=3.0", description[6])
        self.assertEqual(
            sorted(n for n in listNamespaces() if n.startswith(prefix)),
            sorted(prefix + n for n in ("client", "p1", "p2", "server")),
        )
        down = subprocess.run(
            [sys.executable, "-m", "miniproxy.testbed.topology", "down", prefix],
            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": REPO},
        )
        self.assertEqual(down.returncode, 0, down.stderr)
        self.assertEqual(process.wait(WAIT), 0)
        self.assertIn(f"down {prefix}", process.stdout.read().decode())
        self.assertEqual([n for n in listNamespaces() if n.startswith(prefix)], [])

    def test_upStopsWhenLinkDies(self) -> None:
        """
        C{up} also tears down and exits when a forwarder dies, on
        C{SIGTERM}, and (with C{--watch-stdin}) when its standard input
        ends.
        """
        for how in ("forwarder", "sigterm", "stdin"):
            process = subprocess.Popen(
                [sys.executable, "-m", "miniproxy.testbed.topology", "up", "--proxies", "0",
                 "--rtt", "2", "--no-ipv6", "--watch-stdin"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": REPO},
            )
            self.addCleanup(process.wait)
            self.addCleanup(lambda p=process: p.poll() is None and p.kill())
            assert process.stdout is not None and process.stdin is not None
            self.addCleanup(process.stdout.close)
            self.addCleanup(process.stdin.close)
            prefix = readLine(process.stdout, time.monotonic() + 60).decode().split()[1]
            self.addCleanup(topology.cleanupStale, prefix)
            if how == "forwarder":
                [pid] = namespacePids(prefix + "client")
                os.kill(pid, signal.SIGKILL)
            elif how == "sigterm":
                process.terminate()
            else:
                process.stdin.close()
            self.assertEqual(process.wait(WAIT), 0)
            self.assertEqual([n for n in listNamespaces() if n.startswith(prefix)], [])
