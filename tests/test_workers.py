"""
Tests for L{miniproxy.workers}: listeners shared by worker processes,
steered by client port; the parent's supervision; and the real
C{twistd miniproxy --workers N}.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from typing import Any

from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest

from miniproxy.config import buildConfig
from miniproxy.errors import ConfigError
from miniproxy.syntap import workerOf
from miniproxy.workers import (
    STOP_GRACE,
    SharedListener,
    WorkerGroup,
    WorkerProcess,
    parseListenDescription,
    processStats,
)
from tests.support import TEST_TIMEOUT, Network, waitUntil, withTimeout
from tests.test_twistd import Child as TwistdChild

#: The repository's root, which a twistd subprocess needs on PYTHONPATH.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The line the parent logs for each listener once it is bound.
LISTENING = re.compile(rb"miniproxy listening on 127\.0\.0\.1:(\d+)")
#: The line the parent logs once every worker listens.
READY = re.compile(rb"miniproxy: (\d+) workers ready \(pids ([\d ]+)\)")
#: The parent's report.
REPORT = re.compile(
    rb"miniproxy group: (?P<workers>\d+) workers, rss (?P<rss>[\d.]+) MiB, pss "
    rb"(?P<pss>[\d.]+) MiB, cpu (?P<cpu>[\d.]+)s, flows open (?P<open>\d+) closed "
    rb"(?P<closed>\d+) \((?P<each>[^)]*)\) refused \d+, restarts (?P<restarts>\d+)"
)


class ParseTests(unittest.TestCase):
    """
    L{parseListenDescription} reads the endpoint kinds workers can share.
    """

    def test_kinds(self) -> None:
        """
        TCP over IPv4 and IPv6 and transparent listeners, the port given
        by position or by name, with their defaults.
        """
        self.assertEqual(
            parseListenDescription("tcp:8080:interface=127.0.0.1"),
            ("tcp", "127.0.0.1", 8080, None),
        )
        self.assertEqual(parseListenDescription("tcp:port=0"), ("tcp", "", 0, None))
        self.assertEqual(
            parseListenDescription("tcp6:8080:interface=\\:\\:1:backlog=7"),
            ("tcp6", "::1", 8080, 7),
        )
        self.assertEqual(
            parseListenDescription("tproxy:port=81"), ("tproxy", "0.0.0.0", 81, None)
        )

    def test_refused(self) -> None:
        """
        Other kinds, unknown parameters and bad ports are configuration
        errors that name the listener.
        """
        for description in (
            "ssl:443",
            "unix:/tmp/s",
            "tcp:80:reuse=1",
            "tcp:x",
            "tcp:interface=127.0.0.1",
            "tcp:80:port=81",
        ):
            with self.assertRaises(ConfigError) as caught:
                parseListenDescription(description)
            self.assertIn(repr(description), str(caught.exception))


class ConfigTests(unittest.TestCase):
    """
    C{workers} and C{stats-interval}, in the config file and on the
    command line; with more than one worker, C{twistd miniproxy} makes a
    L{WorkerGroup}.
    """

    def test_parse(self) -> None:
        """
        The file's values, overridden by the command line's; 1 worker and a
        60 s report by default.
        """
        default = buildConfig({})
        self.assertEqual((default.workers, default.statsInterval), (1, 60.0))
        config = buildConfig({"workers": 3, "stats-interval": 5})
        self.assertEqual((config.workers, config.statsInterval), (3, 5.0))
        config = buildConfig({"workers": 3}, workers="2", statsInterval="0")
        self.assertEqual((config.workers, config.statsInterval), (2, 0.0))

    def test_bad(self) -> None:
        """
        Fewer than one worker, or not a whole number, is an error naming
        the key.
        """
        for document in ({"workers": 0}, {"workers": -1}, {"workers": "x"},
                         {"workers": 1.5}, {"stats-interval": -1}):
            with self.assertRaises(ConfigError) as caught:
                buildConfig(document)
            self.assertIn(next(iter(document)), str(caught.exception))

    def test_makeService(self) -> None:
        """
        C{--workers 2} makes a worker group with the configuration; no
        C{--workers} makes the service itself.
        """
        from miniproxy import tap
        from miniproxy.service import ProxyService

        options = tap.Options()
        options.parseOptions(["--to", "tcp:host=127.0.0.1:port=9", "--workers", "2",
                              "--stats-interval", "7"])
        group = tap.makeService(options, MemoryReactorClock())
        self.assertIsInstance(group, WorkerGroup)
        self.assertEqual((group.workers, group.statsInterval), (2, 7.0))
        options = tap.Options()
        options.parseOptions(["--to", "tcp:host=127.0.0.1:port=9"])
        service = tap.makeService(options, MemoryReactorClock())
        self.addCleanup(service.optionEmitter.release)
        self.assertIsInstance(service, ProxyService)

    def test_unknownFunction(self) -> None:
        """
        The parent configures the functions once, so that a bad function
        stops twistd instead of every worker.
        """
        from miniproxy import tap

        options = tap.Options()
        options.parseOptions(["--workers", "2", "--function", "no-such-function"])
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options, MemoryReactorClock())
        self.assertIn("no-such-function", str(caught.exception))


class SteeringTests(unittest.TestCase):
    """
    The kernel sends each connection to the socket of the worker
    L{workerOf} names, for IPv4, IPv6 and IPv4 on a dual-stack socket.
    """

    def steered(self, description: str, host: str, family: int, workers: int) -> None:
        listener = SharedListener(description, 64, workers)
        self.addCleanup(listener.close)
        self.assertTrue(listener.steered)
        ports = {sock.getsockname()[1] for sock in listener.sockets}
        self.assertEqual(ports, {listener.port})
        for _ in range(24):
            client = socket.socket(family)
            self.addCleanup(client.close)
            client.connect((host, listener.port))
            clientPort = client.getsockname()[1]
            got = []
            for index, sock in enumerate(listener.sockets):
                try:
                    accepted, _ = sock.accept()
                except BlockingIOError:
                    continue
                accepted.close()
                got.append(index)
            self.assertEqual(got, [workerOf(clientPort, workers)])

    def test_ipv4(self) -> None:
        """
        IPv4, two and three workers.
        """
        self.steered("tcp:0:interface=127.0.0.1", "127.0.0.1", socket.AF_INET, 2)
        self.steered("tcp:0:interface=127.0.0.1", "127.0.0.1", socket.AF_INET, 3)

    def test_ipv6(self) -> None:
        """
        IPv6.
        """
        self.steered("tcp6:0:interface=\\:\\:1", "::1", socket.AF_INET6, 2)

    def test_dualStack(self) -> None:
        """
        IPv4 clients of a dual-stack IPv6 listener.
        """
        self.steered("tcp6:0:interface=\\:\\:", "127.0.0.1", socket.AF_INET, 2)

    def test_bindFails(self) -> None:
        """
        A port that is taken raises, and leaves no socket open.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        before = len(os.listdir("/proc/self/fd"))
        with self.assertRaises(OSError):
            SharedListener(f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1", 8, 2)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)


class ProcessStatsTests(unittest.TestCase):
    """
    L{processStats} reads a process's memory and CPU time from C{/proc}.
    """

    def test_self(self) -> None:
        """
        This process has resident memory, and spent CPU time.
        """
        found = processStats(os.getpid())
        self.assertGreater(found["rss"], 1 << 20)
        self.assertGreater(found["pss"], 0)
        self.assertGreater(found["cpu"], 0)

    def test_gone(self) -> None:
        """
        A process that does not exist has no numbers.
        """
        self.assertEqual(processStats(2**22 + 1), {})


class FakeProcessTransport:
    """
    What L{FakeSpawner} hands a worker's protocol: records writes and
    signals.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written = b""
        self.signals: list[Any] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def signalProcess(self, number: Any) -> None:
        self.signals.append(number)


class FakeSpawner:
    """
    A C{spawnProcess} that starts nothing, for the supervision tests.
    """

    def __init__(self) -> None:
        self.spawned: list[tuple[WorkerProcess, dict[int, Any]]] = []

    def __call__(self, protocol: WorkerProcess, executable: str, args: list[str],
                 env: dict[str, str], childFDs: dict[int, Any]) -> None:
        protocol.makeConnection(FakeProcessTransport(1000 + len(self.spawned)))
        self.spawned.append((protocol, childFDs))


def ended(code: int | None = 0, number: int | None = None) -> Failure:
    """
    The reason a process ended with.
    """
    from twisted.internet.error import ProcessTerminated

    return Failure(ProcessTerminated(exitCode=code, signal=number))


class SupervisionTests(unittest.TestCase):
    """
    The parent starts the workers with their sockets, restarts a worker
    that dies (within a bound), and stops them.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.stopped = 0

        def stop() -> None:
            self.stopped += 1

        self.reactor.stop = stop  # type: ignore[method-assign]
        self.spawner = FakeSpawner()
        config = buildConfig({}, listen=["tcp:0:interface=127.0.0.1"], to="tcp:host=127.0.0.1:port=9")
        self.group = WorkerGroup(
            config, self.reactor, 2, statsInterval=0, maxRestarts=2, restartWindow=60,
            spawn=self.spawner,
        )
        self.addCleanup(self.stopGroup)

    def stopGroup(self) -> None:
        if self.group.running:
            d = self.group.stopService()
            for process, _ in self.spawner.spawned:
                if not process.ended.called:
                    process.processEnded(ended(0))
            return d
        for listener in self.group.listeners:
            listener.close()
        return None

    def test_start(self) -> None:
        """
        Each worker gets its own socket of each listener, a control pipe,
        a pipe for its log events, the parent's standard error, and its
        settings first on its input.
        """
        self.group.startService()
        self.assertEqual(len(self.spawner.spawned), 2)
        [listener] = self.group.listeners
        for index, (process, childFDs) in enumerate(self.spawner.spawned):
            self.assertEqual(childFDs[4], listener.sockets[index].fileno())
            self.assertEqual(childFDs[0], "w")
            self.assertEqual(childFDs[3], "r")
            self.assertEqual((childFDs[1], childFDs[2]), ("r", 2))
            self.assertTrue(process.transport.written.startswith(b"\0\0"))

    def test_restart(self) -> None:
        """
        A worker that dies is started again, the first time at once, then
        with a growing delay; past the bound the group stops.
        """
        self.group.startService()
        first, _ = self.spawner.spawned[0]
        first.processEnded(ended(None, signal.SIGKILL))
        self.assertEqual(len(self.spawner.spawned), 2)
        self.reactor.advance(0)
        self.assertEqual(len(self.spawner.spawned), 3)
        second, childFDs = self.spawner.spawned[2]
        self.assertEqual(second.index, 0)
        self.assertEqual(childFDs[4], self.group.listeners[0].sockets[0].fileno())
        second.processEnded(ended(1))
        self.reactor.advance(0.1)
        self.assertEqual(len(self.spawner.spawned), 4)
        self.assertEqual(self.group.restarts, 2)
        self.spawner.spawned[3][0].processEnded(ended(1))
        self.assertTrue(self.group.failed)
        self.reactor.advance(0)
        self.assertEqual(self.stopped, 1)
        self.assertEqual(len(self.spawner.spawned), 4)

    def test_restartWindow(self) -> None:
        """
        Deaths older than the window do not count towards the bound.
        """
        self.group.startService()
        for _ in range(5):
            process = self.group.processes[1]
            process.processEnded(ended(1))
            self.reactor.advance(61)
        self.assertFalse(self.group.failed)
        self.assertEqual(self.group.restarts, 5)

    def test_stop(self) -> None:
        """
        Stopping sends SIGTERM to every worker and waits for their end;
        one that lingers past the grace period is killed; then the
        listeners close.
        """
        self.group.startService()
        done = self.group.stopService()
        processes = [p for p, _ in self.spawner.spawned]
        for process in processes:
            self.assertEqual(process.transport.signals, [signal.SIGTERM])
        processes[0].processEnded(ended(0))
        self.assertNoResult(done)
        self.reactor.advance(STOP_GRACE)
        self.assertEqual(processes[1].transport.signals, [signal.SIGTERM, signal.SIGKILL])
        processes[1].processEnded(ended(None, signal.SIGKILL))
        self.successResultOf(done)
        self.assertEqual(self.group.listeners, [])
        # Nothing is restarted while stopping.
        self.reactor.advance(10)
        self.assertEqual(len(self.spawner.spawned), 2)

    def test_logEvents(self) -> None:
        """
        The log events a worker writes (JSON records, however they are cut
        into reads) are emitted in the parent, marked with the worker.
        """
        from twisted.logger import Logger, eventAsJSON, globalLogPublisher

        self.group.startService()
        [_, (b, _)] = self.spawner.spawned
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        sent: list[dict[str, Any]] = []
        logger = Logger(namespace="miniproxy.access", observer=sent.append)
        logger.info("flow {n}", n=1)
        logger.info("flow {n}", n=2)
        data = b"".join(
            b"\x1e" + eventAsJSON(e).encode() + b"\n" for e in sent
        )
        cut = data.index(b"\n") + 5
        b.childDataReceived(1, data[:17])
        b.childDataReceived(1, data[17:cut])
        mine = [e for e in events if e.get("log_namespace") == "miniproxy.access"]
        self.assertEqual([(e["n"], e["worker"]) for e in mine], [(1, 1)])
        b.childDataReceived(1, data[cut:])
        mine = [e for e in events if e.get("log_namespace") == "miniproxy.access"]
        self.assertEqual([(e["n"], e["worker"]) for e in mine], [(1, 1), (2, 1)])

    def test_stats(self) -> None:
        """
        The report adds up the workers' answers, and goes on without a
        worker that does not answer.
        """
        self.group.startService()
        [(a, _), (b, _)] = self.spawner.spawned
        d = self.group.stats()
        self.assertTrue(a.transport.written.endswith(b"stats\n"))
        a.childDataReceived(3, b'{"stats": {"open": 2, "closed": 5, "refused": 1}}\n')
        self.assertNoResult(d)
        self.reactor.advance(10)
        totals = self.successResultOf(d)
        self.assertEqual((totals["open"], totals["closed"], totals["answered"]), (2, 5, 1))
        self.assertEqual(list(totals["perWorker"]), [0])
        self.assertGreater(totals["cpu"], 0)
        self.assertGreater(totals["rss"], 0)


class Child(TwistdChild):
    """
    A twistd subprocess running workers: its output, waiting for a line,
    its end (see L{TwistdChild}), the pids of its group, and signals.
    """

    def __init__(self) -> None:
        super().__init__("twistd")
        self.pids: list[int] = []

    def sendSignal(self, number: int) -> None:
        """
        Send a signal if it runs.
        """
        if not self.ended.called:
            os.kill(self.transport.pid, number)  # type: ignore[union-attr]


def alive(pid: int) -> bool:
    """
    Whether process C{pid} exists (and is not a zombie).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class TwistdWorkersTests(unittest.TestCase):
    """
    The real C{twistd -n miniproxy --workers 2}: one command, two workers
    sharing the listener, each flow begun once.
    """

    timeout = TEST_TIMEOUT * 2

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.net = Network(self)
        self.serverPort, self.servers = self.net.server(echo=True)

    @defer.inlineCallbacks
    def startGroup(self, *args: str, twistdArgs: tuple[str, ...] = ()) -> Any:
        """
        Start the group; wait until every worker listens.

        @return: The L{Child}, its port and its workers' pids.
        """
        script = os.path.join(os.path.dirname(sys.executable), "twistd")
        command = [sys.executable, script] if os.access(script, os.X_OK) else [
            sys.executable, "-m", "twisted.scripts.twistd"]
        child = Child()
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.reactor.spawnProcess(
            child, command[0],
            command + ["-n", "--pidfile=", *twistdArgs, "miniproxy", "--listen",
                       "tcp:0:interface=127.0.0.1", "--to",
                       f"tcp:host=127.0.0.1:port={self.serverPort}", "--stats-interval",
                       "0", "--workers", "2", *args],
            env=dict(os.environ, PYTHONPATH=REPO), path=workdir,
        )
        self.addCleanup(self.stopGroup, child)
        [listening] = yield child.waitFor(LISTENING)
        [ready] = yield child.waitFor(READY)
        pids = [int(p) for p in ready.group(2).split()]
        child.pids = pids
        return child, int(listening.group(1)), pids

    @defer.inlineCallbacks
    def stopGroup(self, child: Child) -> Any:
        """
        Stop the group, and wait until its workers are gone too.
        """
        if not child.ended.called:
            child.sendSignal(signal.SIGTERM)
            try:
                yield withTimeout(child.ended, 20, "twistd to stop")
            except AssertionError:
                child.sendSignal(signal.SIGKILL)
                yield child.ended
        yield self.noWorkersLeft(child.pids)

    def noWorkersLeft(self, pids: list[int]) -> defer.Deferred:
        """
        Wait until none of C{pids} runs.
        """
        return waitUntil(lambda: not any(alive(p) for p in pids), "the workers to end")

    @defer.inlineCallbacks
    def relay(self, port: int, n: int) -> Any:
        """
        Relay one byte each way through C{n} connections, then close them.

        @return: The client ports.
        """
        ports = []
        for _ in range(n):
            client = yield self.net.connect(port)
            ports.append(client.transport.getHost().port)
            client.transport.write(b"x")
            yield withTimeout(client.waitForBytes(1), 10, "the echo")
            client.transport.loseConnection()
            yield withTimeout(client.lost, 10, "the close")
        return ports

    @defer.inlineCallbacks
    def report(self, child: Child, closed: int) -> Any:
        """
        Ask for reports (SIGUSR1) until the group has closed C{closed}
        flows.

        @return: The last report's match.
        """
        seen = 0
        deadline = self.reactor.seconds() + 20
        while True:
            child.sendSignal(signal.SIGUSR1)
            seen += 1
            [*_, match] = yield child.waitFor(REPORT, seen)
            if int(match.group("closed")) >= closed or self.reactor.seconds() > deadline:
                return match
            yield task.deferLater(self.reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_eachFlowOnce(self) -> Any:
        """
        With two workers, each flow opens exactly one connection to the
        server, the flows are spread over both workers by client port, and
        no flow is left pending in the worker that did not accept it.  The
        report sums the group's memory and CPU time.
        """
        child, port, pids = yield self.startGroup()
        self.assertEqual(len(pids), 2)
        n = 24
        ports = yield self.relay(port, n)
        match = yield self.report(child, n)
        self.assertEqual(int(match.group("closed")), n)
        self.assertEqual(len(self.servers.peers), n)
        each = dict(part.split(b"=") for part in match.group("each").split())
        expected = [sum(1 for p in ports if workerOf(p, 2) == i) for i in range(2)]
        self.assertEqual([int(each[b"w0"]), int(each[b"w1"])], expected)
        self.assertTrue(all(expected))
        self.assertGreater(float(match.group("rss")), 10)
        self.assertGreater(float(match.group("cpu")), 0)
        if os.geteuid() == 0:
            started = re.findall(rb"started-by=(\w+)", child.output)
            self.assertEqual(len(started), n)
            self.assertIn(b"syn", started)
        # Nothing begun at a SYN waits in either worker.
        self.assertEqual(int(match.group("open")), 0)
        self.assertEqual(len(self.servers.peers), n)

    @defer.inlineCallbacks
    def test_logFile(self) -> Any:
        """
        With C{--logfile}, the workers' lines reach twistd's log file
        whole, through the parent, beside the parent's own.
        """
        path = os.path.abspath(self.mktemp())
        child = Child()
        script = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.reactor.spawnProcess(
            child, sys.executable,
            [sys.executable, script, "-n", "--pidfile=", "--logfile", path, "miniproxy",
             "--listen", "tcp:0:interface=127.0.0.1", "--to",
             f"tcp:host=127.0.0.1:port={self.serverPort}", "--stats-interval", "0",
             "--workers", "2"],
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        self.addCleanup(self.stopGroup, child)

        def log() -> bytes:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError:
                return b""

        yield waitUntil(lambda: READY.search(log()) is not None, "the workers to be ready")
        child.pids = [int(p) for p in READY.search(log()).group(2).split()]
        port = int(LISTENING.search(log()).group(1))
        yield self.relay(port, 6)
        yield waitUntil(lambda: log().count(b"[miniproxy.access#info]") >= 6, "6 access lines")
        lines = log().splitlines()
        self.assertTrue(all(re.match(rb"\d{4}-\d\d-\d\dT", line) for line in lines), lines)
        for index in (0, 1):
            self.assertIn(f"miniproxy worker {index} (pid".encode(), log())

    @defer.inlineCallbacks
    def test_restart(self) -> Any:
        """
        A worker killed is started again on its socket: the connections
        steered to it are relayed again, and the report counts the restart.
        """
        child, port, pids = yield self.startGroup()
        os.kill(pids[0], signal.SIGKILL)
        yield child.waitFor(re.compile(rb"worker 0 ended .*restarting"))
        yield child.waitFor(re.compile(rb"miniproxy worker 0 \(pid \d+\) ready"), 2)
        ports = yield self.relay(port, 8)
        # The client ports are the kernel's choice, and eight of them can
        # all be steered to worker 1: go on until one went to worker 0.
        while not any(workerOf(p, 2) == 0 for p in ports) and len(ports) < 64:
            ports += yield self.relay(port, 1)
        self.assertEqual(len(self.servers.peers), len(ports))
        self.assertTrue(any(workerOf(p, 2) == 0 for p in ports))
        match = yield self.report(child, len(ports))
        self.assertEqual(int(match.group("restarts")), 1)
        self.assertEqual(int(match.group("workers")), 2)

    @defer.inlineCallbacks
    def test_sigterm(self) -> Any:
        """
        SIGTERM to the parent stops the workers, then the parent.
        """
        child, port, pids = yield self.startGroup()
        child.sendSignal(signal.SIGTERM)
        yield withTimeout(child.ended, 20, "twistd to stop")
        self.assertEqual(child.output.count(b"Received SIGTERM"), 3)
        yield self.noWorkersLeft(pids)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

    @defer.inlineCallbacks
    def test_parentKilled(self) -> Any:
        """
        Workers whose parent was killed (no chance to stop them) see their
        input end, and stop.
        """
        child, port, pids = yield self.startGroup()
        child.sendSignal(signal.SIGKILL)
        yield child.ended
        yield self.noWorkersLeft(pids)

    @defer.inlineCallbacks
    def test_badListener(self) -> Any:
        """
        A listener workers cannot share stops twistd with one line.
        """
        child = Child()
        script = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.reactor.spawnProcess(
            child, sys.executable,
            [sys.executable, script, "-n", "--pidfile=", "miniproxy", "--listen",
             "unix:/nonexistent/x", "--workers", "2"],
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        yield withTimeout(child.ended, 20, "twistd to fail")
        self.assertIn(b"must be one of tcp, tcp6, tproxy", child.output)
        self.assertNotIn(b"Traceback", child.output)
        self.assertNotEqual(child.exitCode, 0)
