"""
Measurements of how fast miniproxy starts and takes connections: the cold
start of C{twistd miniproxy} and of C{python -m miniproxy} (exec to the
first relayed byte), what the service imports before its first listener is
up, a listener added to a running service, and a burst of simultaneous
connects.

Each test prints its numbers (and keeps them in C{_trial_temp/startup.json})
and asserts only generous sanity bounds: the targets (100 ms to the first
byte, 2 ms per new listener) are for the benchmark report, on an idle
machine.  Run them alone to see the numbers::

    python -m twisted.trial tests.test_startup
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.support import TEST_TIMEOUT, Network, withTimeout

#: The repository's root, which a subprocess needs on PYTHONPATH.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The line the service logs once a listener listens.
LISTENING = re.compile(rb"miniproxy listening on 127\.0\.0\.1:(\d+)")


def record(name: str, value: Any) -> None:
    """
    Keep a measurement in C{startup.json} (in trial's working directory)
    and print it.
    """
    path = "startup.json"
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError):
        found = {}
    found[name] = value
    with open(path, "w") as f:
        json.dump(found, f, indent=2)
    sys.stdout.write(f"\n{name}: {json.dumps(value)}\n")


def cpuSeconds(pid: int) -> float:
    """
    The CPU time (user and system) process C{pid} has used.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def twistdCommand() -> list[str]:
    """
    This interpreter's C{twistd}.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class _Twistd(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.listening: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        match = LISTENING.search(self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))

    def processEnded(self, reason: Failure) -> None:
        if not self.listening.called:
            self.listening.errback(AssertionError(self.output.decode(errors="replace")))
        self.ended.callback(None)


class ColdStartTests(unittest.TestCase):
    """
    C{twistd -n miniproxy} and C{python -m miniproxy} (L{miniproxy.run}),
    from exec to the first byte relayed.
    """

    timeout = TEST_TIMEOUT * 4

    @defer.inlineCallbacks
    def test_firstByte(self) -> Any:
        """
        Start C{twistd -n miniproxy} and C{python -m miniproxy} three times
        each, in turn; each time, connect as soon as it listens and time
        the round trip of one byte through it to an echo server: wall time
        from exec, and the CPU time the proxy used.
        """
        from twisted.internet import reactor

        net = Network(self)
        serverPort, _ = net.server(echo=True)
        options = [
            "--listen", "tcp:0:interface=127.0.0.1", "--to",
            f"tcp:host=127.0.0.1:port={serverPort}",
        ]
        commands = {
            "coldStart": twistdCommand() + ["-n", "--pidfile=", "miniproxy"],
            "coldStartLean": [sys.executable, "-m", "miniproxy"],
        }
        walls: dict[str, list[float]] = {name: [] for name in commands}
        cpus: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(3):
            for name, command in commands.items():
                child = _Twistd()
                start = time.monotonic()
                process = reactor.spawnProcess(
                    child,
                    command[0],
                    command + options,
                    env=dict(os.environ, PYTHONPATH=REPO),
                    path=os.path.abspath("."),
                )
                self.addCleanup(lambda c=child, p=process: (
                    p.signalProcess("KILL") if not c.ended.called else None, c.ended)[1])
                port = yield withTimeout(child.listening, 30, f"{name} to listen")
                client = yield net.connect(port)
                client.transport.write(b"x")
                yield withTimeout(client.waitForBytes(1), 10, "the byte back")
                walls[name].append(time.monotonic() - start)
                cpus[name].append(cpuSeconds(process.pid))
                client.transport.loseConnection()
                process.signalProcess("TERM")
                yield withTimeout(child.ended, 20, f"{name} to stop")
        for name in commands:
            record(name, {
                "wallMs": sorted(round(w * 1000) for w in walls[name]),
                "cpuMs": sorted(round(c * 1000) for c in cpus[name]),
            })
            self.assertLess(min(walls[name]), 30)


class ImportTests(unittest.TestCase):
    """
    Nothing heavy that a plain TCP relay does not need is imported before
    the first listener is up and the first flow relayed.
    """

    def test_notImported(self) -> None:
        """
        A service with a plain TCP listener and next hop, once listening,
        has not imported Twisted's endpoints module (and its TLS
        verification), the function discovery (the plugin system's scan),
        the PROXY v2 carriers, nor hypothesis.
        """
        script = (
            "import sys\n"
            "from twisted.internet import reactor\n"
            "from miniproxy.config import buildConfig\n"
            "from miniproxy.service import ProxyService\n"
            "config = buildConfig({}, listen=['tcp:0:interface=127.0.0.1'],"
            " to='tcp:host=127.0.0.1:port=9')\n"
            "service = ProxyService(config, reactor)\n"
            "service.startService()\n"
            "ports = []\n"
            "service.whenListening().addCallback(ports.append)\n"
            "assert ports, 'not listening'\n"
            "heavy = ['twisted.internet.endpoints', 'miniproxy.functions.discovery',"
            " 'miniproxy.carriers', 'hypothesis', 'twisted.trial']\n"
            "print(' '.join(m for m in heavy if m in sys.modules))\n"
            "service.stopService()\n"
        )
        found = subprocess.run(
            [sys.executable, "-c", script],
            env=dict(os.environ, PYTHONPATH=REPO),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(found.returncode, 0, found.stderr)
        self.assertEqual(found.stdout.strip(), "")


class AddListenerTests(unittest.TestCase):
    """
    A listener added to a running service.
    """

    def test_time(self) -> None:
        """
        L{ProxyService.addListener} of a plain TCP listener returns a port
        already listening; 50 of them, timed one by one.
        """
        from twisted.internet import reactor

        from miniproxy.address import NextHop
        from miniproxy.config import buildConfig
        from miniproxy.flow import ConnectMode
        from miniproxy.listener import ListenerSettings
        from miniproxy.service import ProxyService

        config = buildConfig(
            {}, listen=["tcp:0:interface=127.0.0.1"], to="tcp:host=127.0.0.1:port=9"
        )
        service = ProxyService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        hop = NextHop.fromString("tcp:host=127.0.0.1:port=9")
        times = []
        for _ in range(50):
            settings = ListenerSettings(
                endpoint="tcp:0:interface=127.0.0.1", mode=ConnectMode.EARLY, to=hop
            )
            start = time.perf_counter()
            port = self.successResultOf(service.addListener(settings))
            times.append(time.perf_counter() - start)
            self.assertGreater(port.getHost().port, 0)
        times.sort()
        result = {
            "minMs": round(times[0] * 1000, 3),
            "medianMs": round(statistics.median(times) * 1000, 3),
            "p90Ms": round(times[int(len(times) * 0.9)] * 1000, 3),
        }
        record("addListener", result)
        self.assertLess(statistics.median(times), 0.1)


class BurstTests(unittest.TestCase):
    """
    230 connects at once to a proxy in a child process (after one lone
    connection, so that an adaptive accept batch would be at its
    smallest), measured by C{mpbench burst} (see L{benchmarks.native}).
    """

    timeout = TEST_TIMEOUT * 3

    def test_burst(self) -> None:
        """
        Every connect of 12 bursts of 230 gets the backend's byte; print
        the mean and 99th percentile time to it, and the listener's
        wake-ups per burst.
        """
        try:
            from benchmarks.native import build

            mpbench = str(build())
        except (ImportError, RuntimeError) as e:
            raise unittest.SkipTest(f"no mpbench: {e}")
        proxyScript = (
            "import sys\n"
            "from twisted.internet import reactor, tcp\n"
            "from twisted.internet.stdio import StandardIO\n"
            "from twisted.protocols.basic import LineReceiver\n"
            "from miniproxy.config import buildConfig\n"
            "from miniproxy.service import ProxyService\n"
            "wakeups = [0]\n"
            "doRead = tcp.Port.doRead\n"
            "def counted(self):\n"
            "    wakeups[0] += 1\n"
            "    return doRead(self)\n"
            "tcp.Port.doRead = counted\n"
            "config = buildConfig({}, listen=['tcp:0:interface=127.0.0.1'],"
            " to=f'tcp:host=127.0.0.1:port={sys.argv[1]}',"
            " limits={'max-flows-per-source': 100000,"
            " 'max-pending-syns-per-source': 100000, 'max-pending-syns': 100000})\n"
            "service = ProxyService(config, reactor)\n"
            "class Commands(LineReceiver):\n"
            "    delimiter = b'\\n'\n"
            "    def lineReceived(self, line):\n"
            "        self.sendLine(str(wakeups[0]).encode())\n"
            "        wakeups[0] = 0\n"
            "    def connectionLost(self, reason):\n"
            "        reactor.stop()\n"
            "def listening(ports):\n"
            "    StandardIO(Commands())\n"
            "    sys.stdout.write(f'{ports[0].getHost().port}\\n')\n"
            "    sys.stdout.flush()\n"
            "service.startService()\n"
            "service.whenListening().addCallback(listening)\n"
            "reactor.run()\n"
        )
        backend = subprocess.Popen(
            [mpbench, "server", "0", "1", "0", "0"], stdout=subprocess.PIPE, text=True
        )
        self.addCleanup(lambda: (backend.kill(), backend.wait(), backend.stdout.close()))
        backendPort = backend.stdout.readline().split()[1]  # type: ignore[union-attr]
        proxy = subprocess.Popen(
            [sys.executable, "-c", proxyScript, backendPort],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=REPO),
        )

        def stopProxy() -> None:
            proxy.stdin.close()  # type: ignore[union-attr]
            try:
                proxy.wait(20)
            except subprocess.TimeoutExpired:
                proxy.kill()
                proxy.wait()
            proxy.stdout.close()  # type: ignore[union-attr]

        self.addCleanup(stopProxy)
        port = proxy.stdout.readline().strip()  # type: ignore[union-attr]

        def ask() -> int:
            proxy.stdin.write("wakeups\n")  # type: ignore[union-attr]
            proxy.stdin.flush()  # type: ignore[union-attr]
            return int(proxy.stdout.readline())  # type: ignore[union-attr]

        def burst(n: int) -> str:
            return subprocess.run(
                [mpbench, "burst", "127.0.0.1", port, str(n), "5000"],
                capture_output=True, text=True, timeout=60,
            ).stdout

        burst(5)
        firstBytes, wakeups, failures = [], [], 0
        for _ in range(12):
            burst(1)
            ask()
            for line in burst(230).splitlines():
                fields = line.split()
                if fields and fields[0] == "conn":
                    if fields[4] == "ok":
                        firstBytes.append(int(fields[3]) / 1000)
                    else:
                        failures += 1
            wakeups.append(ask())
        firstBytes.sort()
        result = {
            "connects": len(firstBytes) + failures,
            "failures": failures,
            "firstByteMeanMs": round(statistics.mean(firstBytes), 2),
            "firstByteP99Ms": round(firstBytes[int(len(firstBytes) * 0.99)], 2),
            "acceptWakeupsPerBurst": statistics.mean(wakeups),
        }
        record("burst230", result)
        self.assertEqual(failures, 0)
        self.assertEqual(len(firstBytes), 12 * 230)
