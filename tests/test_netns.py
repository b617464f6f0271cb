"""
Tests for L{miniproxy.testbed.netns}: test hosts as network namespaces.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest

from miniproxy.testbed import netns
from miniproxy.testbed.netns import (
    PREFIX_PATTERN,
    CommandError,
    NetnsError,
    Testbed,
    cleanupStale,
    listNamespaces,
    namespacesUnavailable,
    pollUntil,
    uniquePrefix,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def netnsInode() -> int:
    """
    The network namespace of the calling thread, as an inode number.
    """
    return os.stat("/proc/thread-self/ns/net").st_ino


class AvailabilityTests(unittest.TestCase):
    """
    L{namespacesUnavailable} tells why tests must skip.
    """

    def test_notRoot(self) -> None:
        """
        Without root there is a reason that says root is needed.
        """
        reason = namespacesUnavailable(
            geteuid=lambda: 1000, which=lambda t: "/bin/" + t, probe=lambda: None
        )
        self.assertIn("need root", reason or "")

    def test_missingTool(self) -> None:
        """
        A missing program is named; C{ip} is always needed.
        """
        reason = namespacesUnavailable(
            tools=("nft",),
            geteuid=lambda: 0,
            which=lambda t: None if t in ("ip", "nft") else "/bin/" + t,
            probe=lambda: None,
        )
        self.assertEqual(reason, "not installed: ip, nft")

    def test_probe(self) -> None:
        """
        When all is there, the probe decides: its reason, or L{None}.
        """
        ok = dict(geteuid=lambda: 0, which=lambda t: "/bin/" + t)
        self.assertIsNone(namespacesUnavailable(probe=lambda: None, **ok))
        self.assertEqual(
            namespacesUnavailable(probe=lambda: "cannot create", **ok), "cannot create"
        )

    @settings(derandomize=True, deadline=None, max_examples=50)
    @given(st.integers(1, 2**22))
    def test_uniquePrefix(self, pid: int) -> None:
        """
        A prefix is C{mp<pid>-<6 hex>-}, matched by L{PREFIX_PATTERN}, and
        two are different.
        """
        first, second = uniquePrefix(pid), uniquePrefix(pid)
        match = PREFIX_PATTERN.match(first + "client")
        self.assertIsNotNone(match)
        self.assertEqual(int(match.group(1)), pid)  # type: ignore[union-attr]
        self.assertNotEqual(first, second)

    def test_uniquePrefixOwnPid(self) -> None:
        """
        By default the prefix names this process.
        """
        self.assertTrue(uniquePrefix().startswith(f"mp{os.getpid()}-"))


class RunTests(unittest.TestCase):
    """
    L{netns.run}: argument lists, checked return codes, clear errors.
    """

    failing = [sys.executable, "-c", "import sys; sys.stderr.write('it broke'); sys.exit(3)"]

    def test_failure(self) -> None:
        """
        A non-zero status raises L{CommandError} with the command, the status
        and what it wrote.
        """
        e = self.assertRaises(CommandError, netns.run, self.failing)
        self.assertEqual(e.returncode, 3)
        self.assertEqual(e.stderr, "it broke")
        self.assertIn("exited with status 3: it broke", str(e))
        self.assertIn(sys.executable, str(e))

    def test_unchecked(self) -> None:
        """
        With C{check=False} the status is returned.
        """
        self.assertEqual(netns.run(self.failing, check=False).returncode, 3)

    def test_input(self) -> None:
        """
        C{input} is the command's standard input; no shell is involved.
        """
        result = netns.run(
            [sys.executable, "-c", "import sys; print(sys.stdin.read()[::-1])"],
            input="$HOME;x",
        )
        self.assertEqual(result.stdout, "x;EMOH$\n")

    def test_notInstalled(self) -> None:
        """
        A missing program is a L{NetnsError} naming it.
        """
        e = self.assertRaises(NetnsError, netns.run, ["no-such-program-mp", "x"])
        self.assertIn("'no-such-program-mp' is not installed", str(e))

    def test_timeout(self) -> None:
        """
        A command that runs too long is killed and reported.
        """
        e = self.assertRaises(
            NetnsError,
            netns.run,
            [sys.executable, "-c", "import signal; signal.pause()"],
            timeout=0.2,
        )
        self.assertIn("did not finish in 0.2s", str(e))

    def test_mainUsage(self) -> None:
        """
        The command line wants C{--cleanup}, and a prefix only if it is one
        of ours.
        """
        from io import StringIO

        for argv in ([], ["--cleanup", "mp1-", "y"], ["--delete"]):
            err = StringIO()
            self.assertEqual(netns.main(argv, err=err), 2)
            self.assertIn("usage: python -m miniproxy.testbed.netns --cleanup [PREFIX]", err.getvalue())
        err = StringIO()
        self.assertEqual(netns.main(["--cleanup", "docker"], err=err), 2)
        self.assertIn("refusing prefix 'docker': it must start with 'mp'", err.getvalue())


class PollUntilTests(unittest.TestCase):
    """
    L{pollUntil} waits on the reactor's clock.
    """

    def test_eventually(self) -> None:
        """
        It fires once the predicate holds, checking every C{interval}.
        """
        clock = Clock()
        calls = []

        def predicate() -> bool:
            calls.append(clock.seconds())
            return len(calls) == 4

        d = pollUntil(clock, predicate, timeout=1.0, interval=0.1)
        self.assertNoResult(d)
        clock.advance(0.1)
        clock.advance(0.1)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(calls), 4)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        """
        It fails with L{NetnsError} naming what it waited for.
        """
        clock = Clock()
        d = pollUntil(clock, lambda: False, timeout=0.5, interval=0.1, what="the server")
        clock.pump([0.1] * 6)
        f = self.failureResultOf(d, NetnsError)
        self.assertIn("waiting for the server", str(f.value))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_predicateFails(self) -> None:
        """
        An exception from the predicate fails the wait.
        """

        def predicate() -> bool:
            raise ZeroDivisionError()

        self.failureResultOf(pollUntil(Clock(), predicate, 1.0), ZeroDivisionError)


class _Greeter(Protocol):
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.transport.write(f"hello {peer.host}".encode())  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]


class _Reader(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(b"".join(self.chunks))


class NamespaceTestCase(unittest.TestCase):
    """
    Tests that make namespaces: skipped, with the reason, where they cannot
    run.
    """

    timeout = 60

    def setUp(self) -> None:
        reason = namespacesUnavailable(tools=("ip", "nft"))
        if reason is not None:
            raise unittest.SkipTest(reason)

    def makeTestbed(self) -> Testbed:
        bed = Testbed()
        self.addCleanup(bed.teardown)
        return bed

    def assertNoNamespaces(self, prefix: str) -> None:
        left = [n for n in listNamespaces() if n.startswith(prefix)]
        self.assertEqual(left, [])


class TestbedTests(NamespaceTestCase):
    """
    L{Testbed}: namespaces, links, processes, and teardown.
    """

    def test_teardownIdempotent(self) -> None:
        """
        Teardown stops the processes and deletes the namespaces; doing it
        again does nothing and raises nothing.
        """
        bed = self.makeTestbed()
        a, b = bed.addNamespace("a"), bed.addNamespace("b")
        bed.connect(a, b, ["10.77.0.1/24"], ["10.77.0.2/24"])
        process = a.spawnPython(["-c", "import signal; signal.pause()"])
        self.assertEqual(
            sorted(n for n in listNamespaces() if n.startswith(bed.prefix)),
            [bed.prefix + "a", bed.prefix + "b"],
        )
        self.assertIn(bed, netns._live)
        bed.teardown()
        self.assertIsNotNone(process.poll())
        self.assertNoNamespaces(bed.prefix)
        self.assertEqual((bed.namespaces, bed.links, bed.processes), ({}, [], []))
        self.assertNotIn(bed, netns._live)
        self.assertFalse(a.exists())
        bed.teardown()
        self.assertNoNamespaces(bed.prefix)

    def test_teardownAfterPartialSetUp(self) -> None:
        """
        A set-up that failed half way is torn down too, including
        namespaces made with the prefix behind the testbed's back, and the
        processes in them.
        """
        bed = self.makeTestbed()
        a = bed.addNamespace("a")
        self.assertRaises(NetnsError, bed.addNamespace, "a")
        self.assertRaises(NetnsError, bed.addNamespace, "no/slash")
        self.assertRaises(NetnsError, bed.connect, a, a, aName="x" * 16)
        self.assertRaises(CommandError, a.addAddress, "nosuchdev", "10.0.0.1/24")
        netns.run(["ip", "netns", "add", bed.prefix + "stray"])
        stray = subprocess.Popen(
            ["ip", "netns", "exec", bed.prefix + "stray", sys.executable, "-c",
             "import signal; signal.pause()"],
            stdin=subprocess.DEVNULL,
        )
        self.addCleanup(stray.wait)
        bed.teardown()
        self.assertEqual(stray.wait(10), -signal.SIGKILL)
        self.assertNoNamespaces(bed.prefix)

    def test_stopProcess(self) -> None:
        """
        L{Testbed.stopProcess} stops a process with C{SIGTERM}, or
        C{SIGKILL} when it ignores that, and forgets it.
        """
        bed = self.makeTestbed()
        a = bed.addNamespace("a")
        polite = a.spawnPython(["-c", "import signal; signal.pause()"])
        stubborn = a.spawnPython(
            [
                "-c",
                "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); signal.pause()",
            ],
            stdout=subprocess.PIPE,
        )
        self.assertEqual(stubborn.stdout.readline(), b"ready\n")  # type: ignore[union-attr]
        stubborn.stdout.close()  # type: ignore[union-attr]
        self.assertEqual(bed.stopProcess(polite), -signal.SIGTERM)
        self.assertEqual(bed.stopProcess(stubborn, timeout=0.2), -signal.SIGKILL)
        self.assertEqual(bed.processes, [])

    def test_connectAndConfigure(self) -> None:
        """
        A veth pair joins two namespaces with the addresses given; routes,
        rules, sysctls and nftables rulesets are set in a namespace only.
        """
        bed = self.makeTestbed()
        a, b = bed.addNamespace("a"), bed.addNamespace("b")
        pair = bed.connect(a, b, ["10.77.1.1/24", "fd77::1/64"], ["10.77.1.2/24"])
        self.assertEqual((pair.aName, pair.bName), ("b", "a"))
        addresses = a.ip("-br", "address", "show", "dev", "b").stdout
        self.assertIn("10.77.1.1/24", addresses)
        self.assertIn("fd77::1/64", addresses)
        self.assertIn("UP", addresses)
        a.addRoute("10.99.0.0/16", via="10.77.1.2")
        a.addRoute("0.0.0.0/0", device="lo", table=100, kind="local")
        a.addRule("fwmark", "1", table=100)
        self.assertIn("10.99.0.0/16 via 10.77.1.2", a.ip("route").stdout)
        self.assertIn("local default dev lo", a.ip("route", "show", "table", "100").stdout)
        self.assertIn("fwmark 0x1 lookup 100", a.ip("rule").stdout)
        self.assertNotIn("10.99.0.0/16", b.ip("route").stdout)
        a.sysctl("net.ipv4.ip_forward", 1)
        self.assertEqual(
            a.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip(), "1"
        )
        self.assertEqual(
            b.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip(), "0"
        )
        a.nft("table ip t {\n chain c { type filter hook input priority 0; }\n}\n")
        self.assertIn("table ip t", a.run(["nft", "list", "ruleset"]).stdout)
        self.assertNotIn("table ip t", b.run(["nft", "list", "ruleset"]).stdout)
        e = self.assertRaises(CommandError, a.nft, "table ip t { chain c { nonsense } }")
        self.assertIn("syntax error", str(e))

    def test_entered(self) -> None:
        """
        In L{Namespace.entered} the thread is in the namespace, and back
        where it was afterwards, also after an exception.
        """
        bed = self.makeTestbed()
        a = bed.addNamespace("a")
        home = netnsInode()
        with a.entered():
            inside = netnsInode()
        self.assertNotEqual(inside, home)
        self.assertEqual(netnsInode(), home)
        self.assertEqual(os.stat(a.path).st_ino, inside)
        with self.assertRaises(ZeroDivisionError):
            with a.entered():
                1 / 0
        self.assertEqual(netnsInode(), home)

    def test_socket(self) -> None:
        """
        A socket made by L{Namespace.socket} can bind an address that only
        exists in the namespace.
        """
        bed = self.makeTestbed()
        a, b = bed.addNamespace("a"), bed.addNamespace("b")
        bed.connect(a, b, ["10.77.2.1/24"], ["10.77.2.2/24"])
        inside = a.socket()
        self.addCleanup(inside.close)
        inside.bind(("10.77.2.1", 0))
        outside = socket.socket()
        self.addCleanup(outside.close)
        self.assertRaises(OSError, outside.bind, ("10.77.2.1", 0))

    @defer.inlineCallbacks
    def test_reactorInNamespaces(self) -> Any:
        """
        The reactor's sockets made in L{Namespace.entered} live there: a
        server in one namespace answers a client in another over the veth
        link, and L{Namespace.listeningTCPPorts} sees the server's port in
        its namespace only.
        """
        from twisted.internet import reactor

        bed = self.makeTestbed()
        a, b = bed.addNamespace("a"), bed.addNamespace("b")
        bed.connect(a, b, ["10.77.3.1/24"], ["10.77.3.2/24"])
        with b.entered():
            port = reactor.listenTCP(8123, Factory.forProtocol(_Greeter), interface="10.77.3.2")
        self.addCleanup(port.stopListening)
        self.assertIn(8123, b.listeningTCPPorts())
        self.assertNotIn(8123, a.listeningTCPPorts())
        reader = _Reader()
        with a.entered():
            d = connectProtocol(TCP4ClientEndpoint(reactor, "10.77.3.2", 8123, timeout=5), reader)
        yield d
        received = yield reader.done
        self.assertEqual(received, b"hello 10.77.3.1")


class CleanupTests(NamespaceTestCase):
    """
    Namespaces left behind by runs that did not tear down are found and
    deleted.
    """

    def childScript(self, ending: str) -> str:
        return (
            "import os, signal, sys\n"
            "from miniproxy.testbed.netns import Testbed\n"
            "bed = Testbed()\n"
            "bed.addNamespace('x')\n"
            "bed.namespaces['x'].spawnPython(['-c', 'import signal; signal.pause()'])\n"
            "print(bed.prefix, flush=True)\n" + ending
        )

    def runChild(self, ending: str) -> tuple[str, int]:
        result = netns.run(
            [sys.executable, "-c", self.childScript(ending)],
            check=False,
        )
        prefix = result.stdout.strip()
        self.assertTrue(PREFIX_PATTERN.match(prefix), result.stdout + result.stderr)
        self.addCleanup(cleanupStale, prefix)
        return prefix, result.returncode

    def test_atexit(self) -> None:
        """
        A run that ends without tearing down is cleaned up at exit.
        """
        prefix, code = self.runChild("sys.exit(0)\n")
        self.assertEqual(code, 0)
        self.assertNoNamespaces(prefix)

    def test_crashedRunReclaimed(self) -> None:
        """
        The namespaces of a run that was killed (no C{atexit}) are deleted
        by L{cleanupStale} with no prefix, which a new L{Testbed} calls;
        those of runs still going are left alone.
        """
        ours = self.makeTestbed()
        ours.addNamespace("mine")
        prefix, code = self.runChild("os.kill(os.getpid(), signal.SIGKILL)\n")
        self.assertEqual(code, -signal.SIGKILL)
        self.assertIn(prefix + "x", listNamespaces())
        self.makeTestbed()
        self.assertNoNamespaces(prefix)
        self.assertIn(ours.prefix + "mine", listNamespaces())

    def test_cleanupPrefix(self) -> None:
        """
        L{cleanupStale} with a prefix deletes every namespace named with it,
        and returns their names.
        """
        prefix = uniquePrefix()
        for name in ("p", "q"):
            netns.run(["ip", "netns", "add", prefix + name])
        self.addCleanup(cleanupStale, prefix)
        self.assertEqual(sorted(cleanupStale(prefix)), [prefix + "p", prefix + "q"])
        self.assertNoNamespaces(prefix)
        self.assertEqual(cleanupStale(prefix), [])

    def test_commandLine(self) -> None:
        """
        C{python -m miniproxy.testbed.netns --cleanup PREFIX} deletes and
        names them.
        """
        prefix = uniquePrefix()
        netns.run(["ip", "netns", "add", prefix + "cli"])
        self.addCleanup(cleanupStale, prefix)
        result = netns.run(
            [sys.executable, "-m", "miniproxy.testbed.netns", "--cleanup", prefix]
        )
        self.assertEqual(result.stdout, f"deleted {prefix}cli\n")
        self.assertNoNamespaces(prefix)

    def test_teardownAll(self) -> None:
        """
        The C{atexit} handler tears down every testbed still live.
        """
        bed = self.makeTestbed()
        bed.addNamespace("a")
        netns._teardownAll()
        self.assertNoNamespaces(bed.prefix)
        self.assertNotIn(bed, netns._live)
