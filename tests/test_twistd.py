"""
End-to-end tests of the real C{twistd miniproxy} command, run as a
subprocess: C{curl} and C{iperf3} through it, C{--list-functions}, a
third-party function dropped in on C{PYTHONPATH}, and bad configurations.

Each test starts C{twistd -n --pidfile= miniproxy --listen
tcp:0:interface=127.0.0.1 ...} and learns its port from the line the
service logs once it listens (no port is guessed for the proxy).  Every
subprocess is stopped in the test's cleanup.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.support import TEST_TIMEOUT, Network, waitUntil, withTimeout

_log = Logger()

#: The repository's root, which a twistd subprocess needs on PYTHONPATH.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The line the service logs for each listener once it listens.
LISTENING = re.compile(rb"miniproxy listening on 127\.0\.0\.1:(\d+)")

#: An access-log line.
ACCESS = re.compile(
    rb"\[miniproxy\.access#info\] .* up=(?P<up>\d+) down=(?P<down>\d+) "
    rb"outcome=(?P<outcome>\S+)"
)


def twistdCommand() -> list[str]:
    """
    How to run twistd with this interpreter: its C{twistd} script, or
    C{python -m twisted} (the same program) if there is none beside it.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [sys.executable, script]
    return [sys.executable, "-m", "twisted"]


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago, for programs that
    cannot report the port they bound (iperf3).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Child(ProcessProtocol):
    """
    A subprocess of a test: its output, its end, and waiting for a line.

    @ivar output: Everything it wrote, stdout and stderr interleaved.
    @ivar stdout: What it wrote on stdout.
    @ivar ended: Fires with the child once the process ended.
    @ivar exitCode: Its exit code (L{None} if killed by a signal).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.output = b""
        self.stdout = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.exitCode: int | None = None
        self.signal: int | None = None
        self.running = False
        self._waiters: list[tuple[re.Pattern[bytes], int, defer.Deferred]] = []

    def connectionMade(self) -> None:
        self.running = True
        self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        self._received(data)

    def errReceived(self, data: bytes) -> None:
        self._received(data)

    def _received(self, data: bytes) -> None:
        self.output += data
        waiting, self._waiters = self._waiters, []
        for pattern, count, d in waiting:
            found = list(pattern.finditer(self.output))
            if len(found) >= count:
                d.callback(found[:count])
            else:
                self._waiters.append((pattern, count, d))

    def waitFor(self, pattern: re.Pattern[bytes], count: int = 1,
                timeout: float = 20) -> defer.Deferred:
        """
        @return: A L{defer.Deferred} firing with the first C{count} matches
            of C{pattern} in the output once there are that many; failing
            if the process ends first, or after C{timeout} seconds.
        """
        d: defer.Deferred = defer.Deferred()
        found = list(pattern.finditer(self.output))
        if len(found) >= count:
            d.callback(found[:count])
        elif not self.running and self.ended.called:
            d.errback(AssertionError(f"{self.name} ended:\n{self.output.decode()}"))
        else:
            self._waiters.append((pattern, count, d))
        return withTimeout(d, timeout, f"{pattern.pattern!r} from {self.name}")

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        self.exitCode = reason.value.exitCode
        self.signal = reason.value.signal
        waiting, self._waiters = self._waiters, []
        for pattern, count, d in waiting:
            d.errback(
                AssertionError(
                    f"{self.name} ended (exit {self.exitCode}) before printing "
                    f"{pattern.pattern!r}:\n{self.output.decode(errors='replace')}"
                )
            )
        self.ended.callback(self)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """
        End the process (SIGTERM, then SIGKILL if it lingers) and wait for
        its end.
        """
        if self.ended.called:
            return
        for sig, patience in (("TERM", 10), ("KILL", 10)):
            try:
                self.transport.signalProcess(sig)  # type: ignore[union-attr]
            except Exception:
                pass
            ended = defer.Deferred()
            self.ended.addBoth(lambda r: (ended.called or ended.callback(None), r)[1])
            try:
                yield withTimeout(ended, patience, f"{self.name} to end on SIG{sig}")
                return
            except AssertionError:
                continue


class TwistdTestCase(unittest.TestCase):
    """
    Starting subprocesses, and twistd in particular.
    """

    timeout = TEST_TIMEOUT

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.env = dict(os.environ, PYTHONPATH=REPO)

    def spawn(self, args: list[str], name: str | None = None,
              env: dict[str, str] | None = None) -> Child:
        """
        Start C{args}; it is stopped at cleanup.
        """
        child = Child(name or os.path.basename(args[0]))
        self.reactor.spawnProcess(
            child, args[0], args, env=env or self.env, path=self.workdir
        )
        self.addCleanup(child.stop)
        return child

    def runToEnd(self, args: list[str], env: dict[str, str] | None = None,
            timeout: float = 30) -> defer.Deferred:
        """
        Run C{args} to its end.

        @return: A L{defer.Deferred} firing with the ended L{Child}.
        """
        child = self.spawn(args, env=env)
        return withTimeout(child.ended, timeout, f"{args[:3]} to end")

    def twistd(self, *args: str, env: dict[str, str] | None = None) -> Child:
        """
        Start C{twistd -n --pidfile= miniproxy ARGS}.
        """
        return self.spawn(
            twistdCommand() + ["-n", "--pidfile=", "miniproxy", *args],
            name="twistd", env=env,
        )

    @defer.inlineCallbacks
    def startProxy(self, to: str, *args: str, env: dict[str, str] | None = None) -> Any:
        """
        Start twistd miniproxy relaying to C{to} and wait until it listens.

        @return: A L{defer.Deferred} firing with the L{Child} and its port.
        """
        child = self.twistd(
            "--listen", "tcp:0:interface=127.0.0.1", "--to", to, *args, env=env
        )
        [match] = yield child.waitFor(LISTENING)
        return child, int(match.group(1))

    def needs(self, program: str) -> str:
        """
        The path of C{program}; skip the test if it is not installed.
        """
        path = shutil.which(program)
        if path is None:
            raise unittest.SkipTest(f"{program} is not installed")
        return path


class CurlTests(TwistdTestCase):
    """
    curl fetches a file through twistd miniproxy.
    """

    @defer.inlineCallbacks
    def test_fetch(self) -> Any:
        """
        A few MB of random bytes from a local HTTP server reach curl through
        the proxy exactly (same SHA-256), and the proxy logs the flow.
        """
        from twisted.web.server import Site
        from twisted.web.static import File

        curl = self.needs("curl")
        docroot = os.path.join(self.workdir, "docroot")
        os.makedirs(docroot)
        blob = os.urandom(5 * 1024 * 1024 + 17)
        with open(os.path.join(docroot, "blob.bin"), "wb") as f:
            f.write(blob)
        net = Network(self)
        site = Site(File(docroot))
        site.noisy = False
        httpPort = net.listen(site)
        proxy, port = yield self.startProxy(f"tcp:host=127.0.0.1:port={httpPort}")
        target = os.path.join(self.workdir, "fetched.bin")
        fetched = yield self.runToEnd(
            [curl, "--silent", "--show-error", "--fail", "--max-time", "20",
             "--output", target, f"http://127.0.0.1:{port}/blob.bin"]
        )
        self.assertEqual(fetched.exitCode, 0, fetched.output)
        with open(target, "rb") as f:
            self.assertEqual(
                hashlib.sha256(f.read()).hexdigest(), hashlib.sha256(blob).hexdigest()
            )
        [line] = yield proxy.waitFor(ACCESS)
        # The response is the file and the HTTP headers.
        self.assertGreater(int(line.group("down")), len(blob))
        self.assertEqual(line.group("outcome"), b"ok")


class IPerfTests(TwistdTestCase):
    """
    iperf3 through twistd miniproxy, both directions.
    """

    @defer.inlineCallbacks
    def measure(self, *clientArgs: str) -> Any:
        iperf3 = self.needs("iperf3")
        serverPort = freePort()
        server = self.spawn(
            [iperf3, "--server", "--one-off", "--bind", "127.0.0.1",
             "--port", str(serverPort), "--forceflush"],
            name="iperf3 server",
        )
        yield server.waitFor(re.compile(rb"Server listening on %d" % serverPort))
        proxy, port = yield self.startProxy(
            f"tcp:host=127.0.0.1:port={serverPort}", "--function", "split-tcp"
        )
        client = yield self.runToEnd(
            [iperf3, "--client", "127.0.0.1", "--port", str(port), "--time", "1",
             "--json", *clientArgs]
        )
        self.assertEqual(client.exitCode, 0, client.output)
        report = json.loads(client.stdout)
        self.assertNotIn("error", report)
        end = report["end"]
        self.assertGreater(end["sum_sent"]["bytes"], 0)
        self.assertGreater(end["sum_received"]["bytes"], 0)
        yield withTimeout(server.ended, 10, "the iperf3 server to finish")
        self.assertEqual(server.exitCode, 0, server.output)
        # The control and the data connection crossed the proxy.  The
        # control connection ends cleanly; the data connection may end with
        # a reset (the iperf3 server closes it with data unread, as it does
        # without a proxy).
        lines = yield proxy.waitFor(ACCESS, count=2)
        self.assertIn(b"ok", [line.group("outcome") for line in lines])
        relayed = max(
            int(line.group("down" if "--reverse" in clientArgs else "up"))
            for line in lines
        )
        self.assertGreaterEqual(relayed, end["sum_received"]["bytes"])
        gbps = end["sum_received"]["bits_per_second"] / 1e9
        _log.info(
            "iperf3 {args} through twistd miniproxy: {gbps:.2f} Gbit/s, {bytes} bytes",
            args=" ".join(clientArgs) or "(client to server)", gbps=gbps,
            bytes=end["sum_received"]["bytes"],
        )
        return end

    def test_clientToServer(self) -> Any:
        """
        iperf3 client -> proxy -> iperf3 server for a second succeeds and
        moves bytes.
        """
        return self.measure()

    def test_serverToClient(self) -> Any:
        """
        The same with C{-R}: the server sends through the proxy.
        """
        return self.measure("--reverse")


#: A third-party dropin: a function that writes each hook it runs, in
#: order, to the file named by $MINIPROXY_HOOK_LOG (data hooks once each).
THIRD_PARTY = '''
import os

from twisted.plugin import IPlugin
from zope.interface import implementer

from miniproxy.functions.base import FlowHandler
from miniproxy.interfaces import IFlowHandlerFactory, IProxyFunction
from miniproxy.verdict import CONTINUE


class _Recorder(FlowHandler):
    wantsData = True

    def __init__(self):
        self.seen = set()

    def _note(self, hook, once=False):
        if once and hook in self.seen:
            return CONTINUE
        self.seen.add(hook)
        with open(os.environ["MINIPROXY_HOOK_LOG"], "a") as f:
            f.write(hook + "\\n")
        return CONTINUE

    def earlySyn(self, flow):
        return self._note("earlySyn")

    def accepted(self, flow):
        return self._note("accepted")

    def outgoingConnected(self, flow):
        return self._note("outgoingConnected")

    def outgoingFailed(self, flow, reason):
        return self._note("outgoingFailed")

    def dataFromClient(self, flow, chunk):
        return self._note("dataFromClient", once=True)

    def dataFromServer(self, flow, chunk):
        return self._note("dataFromServer", once=True)

    def clientHalfClosed(self, flow):
        return self._note("clientHalfClosed")

    def serverHalfClosed(self, flow):
        return self._note("serverHalfClosed")

    def closed(self, flow):
        return self._note("closed")


@implementer(IFlowHandlerFactory)
class _Factory:
    name = "hook-recorder"

    def handlerForFlow(self, flow):
        return _Recorder()


@implementer(IPlugin, IProxyFunction)
class _HookRecorder:
    name = "hook-recorder"
    description = "Third-party test function: records the hooks it runs."

    def configure(self, settings, reactor):
        return _Factory()


hookRecorder = _HookRecorder()
'''


class FunctionTests(TwistdTestCase):
    """
    C{--list-functions}, and a third-party function found on
    C{PYTHONPATH}.
    """

    def installThirdParty(self) -> dict[str, str]:
        """
        Write the third-party dropin as C{TMP/miniproxy/plugins/
        thirdparty.py} (no C{__init__.py} in those directories).

        @return: The environment that puts it on C{PYTHONPATH}.
        """
        top = os.path.join(self.workdir, "thirdparty")
        plugins = os.path.join(top, "miniproxy", "plugins")
        os.makedirs(plugins)
        with open(os.path.join(plugins, "thirdparty.py"), "w") as f:
            f.write(THIRD_PARTY)
        return dict(self.env, PYTHONPATH=os.pathsep.join([REPO, top]))

    @defer.inlineCallbacks
    def test_listFunctions(self) -> Any:
        """
        C{--list-functions} lists the built-in functions with their
        descriptions and exits 0.
        """
        child = yield self.runToEnd(twistdCommand() + ["miniproxy", "--list-functions"])
        self.assertEqual(child.exitCode, 0, child.output)
        listing = child.stdout.decode()
        self.assertRegex(listing, r"(?m)^policy\s+Per-flow policy: allow or deny")
        self.assertRegex(listing, r"(?m)^split-tcp\s+Split-TCP relay tuning")
        self.assertNotIn("hook-recorder", listing)

    @defer.inlineCallbacks
    def test_listThirdParty(self) -> Any:
        """
        A dropin in a C{miniproxy/plugins/} directory on C{PYTHONPATH} is
        listed beside the built-in functions.
        """
        env = self.installThirdParty()
        child = yield self.runToEnd(
            twistdCommand() + ["miniproxy", "--list-functions"], env=env
        )
        self.assertEqual(child.exitCode, 0, child.output)
        listing = child.stdout.decode()
        self.assertRegex(
            listing, r"(?m)^hook-recorder\s+Third-party test function: records"
        )
        self.assertRegex(listing, r"(?m)^policy\s")
        self.assertRegex(listing, r"(?m)^split-tcp\s")

    @defer.inlineCallbacks
    def test_thirdPartyHooksRun(self) -> Any:
        """
        Enabled with C{--function}, the third-party function's hooks run on
        a real flow, in the flow's order.
        """
        env = self.installThirdParty()
        hookLog = os.path.join(self.workdir, "hooks.log")
        env["MINIPROXY_HOOK_LOG"] = hookLog
        net = Network(self)
        serverPort, servers = net.server(echo=True)
        servers.onConnect = lambda peer: peer.transport.write(b"hello\r\n")
        _, port = yield self.startProxy(
            f"tcp:host=127.0.0.1:port={serverPort}",
            "--mode", "accept", "--function", "hook-recorder",
            env=env,
        )
        client = yield net.connect(port)
        # The server speaks first: the client answers once the outgoing
        # leg surely connected, so the hooks' order is the flow's.
        yield withTimeout(client.waitForBytes(7), 10, "the server's greeting")
        client.transport.write(b"ping")
        client.transport.loseWriteConnection()
        yield withTimeout(client.lost, 10, "the flow to end")
        self.assertEqual(client.received, b"hello\r\nping")

        def hooks() -> list[str]:
            try:
                with open(hookLog) as f:
                    return f.read().split()
            except FileNotFoundError:
                return []

        yield waitUntil(lambda: "closed" in hooks(), "the closed hook")
        self.assertEqual(
            hooks(),
            ["earlySyn", "accepted", "outgoingConnected", "dataFromServer",
             "dataFromClient", "clientHalfClosed", "serverHalfClosed", "closed"],
        )


class BadConfigTests(TwistdTestCase):
    """
    A bad configuration makes twistd exit non-zero with one message naming
    the key and the file, and no traceback.
    """

    @defer.inlineCallbacks
    def assertRefused(self, toml: str, *expected: str) -> Any:
        path = os.path.join(self.workdir, "miniproxy.toml")
        with open(path, "w") as f:
            f.write(toml)
        child = twistdCommand() + [
            "-n", "--pidfile=", "miniproxy", "--listen", "tcp:0:interface=127.0.0.1",
            "--config", path,
        ]
        ended = yield self.runToEnd(child)
        output = ended.output.decode(errors="replace")
        self.assertNotEqual(ended.exitCode, 0, output)
        self.assertIsNotNone(ended.exitCode, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("miniproxy listening", output)
        for text in (path,) + expected:
            self.assertIn(text, output)
        return output

    def test_unknownKey(self) -> Any:
        """
        An unknown top-level key.
        """
        return self.assertRefused(
            'to = "tcp:host=127.0.0.1:port=9"\nbogus-key = 1\n',
            "bogus-key: unknown key",
        )

    def test_badCIDR(self) -> Any:
        """
        A bad CIDR in a policy rule names the rule's key.
        """
        return self.assertRefused(
            'to = "tcp:host=127.0.0.1:port=9"\n'
            'functions = ["policy"]\n'
            "[function.policy]\n"
            'rules = [{action = "allow", sources = ["10.0.0.0/33"]}]\n',
            "function.policy.rules[0].sources[0]",
            "10.0.0.0/33",
        )

    def test_unknownFunction(self) -> Any:
        """
        A function that is not installed is named, with the installed ones.
        """
        return self.assertRefused(
            'to = "tcp:host=127.0.0.1:port=9"\nfunctions = ["nonexistent"]\n',
            "functions: no proxy function named 'nonexistent'",
            "split-tcp",
        )

