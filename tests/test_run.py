"""
Tests for L{miniproxy.run}, C{python -m miniproxy}: its import blocker and
lazy modules, how it tells whether TLS is configured, and the command
itself run as a subprocess on loopback (relaying, stopping on signals,
rejecting bad options, and what it has imported by the first flow).
"""

from __future__ import annotations

import configparser
import os
import re
import sys
import textwrap
from typing import Any

from hypothesis import given, strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from miniproxy import run
from tests.support import CertificateAuthority, Network, listenTLS, waitUntil
from tests.test_twistd import LISTENING, REPO, TwistdTestCase


def _writeModules(testCase: unittest.TestCase, files: dict[str, str]) -> str:
    """
    Write C{files} (relative path: source) under a new directory put on
    C{sys.path}; the modules they make are forgotten at cleanup.

    @return: The directory.
    """
    root = os.path.abspath(testCase.mktemp())
    for relative, source in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(source))
    sys.path.insert(0, root)
    names = {relative.split("/")[0].removesuffix(".py") for relative in files}

    def forget() -> None:
        sys.path.remove(root)
        for name in list(sys.modules):
            if name.partition(".")[0] in names:
                del sys.modules[name]

    testCase.addCleanup(forget)
    return root


class ImportBlockerTests(unittest.TestCase):
    """
    L{run.ImportBlocker} refuses its packages while installed, and only
    them.
    """

    def test_refuses(self) -> None:
        """
        A refused package and its submodules raise L{ImportError} naming
        them; another module is left to the next finders.
        """
        blocker = run.ImportBlocker(["refusedpkg"])
        for name in ("refusedpkg", "refusedpkg.sub"):
            with self.assertRaises(ImportError) as caught:
                blocker.find_spec(name)
            self.assertEqual(caught.exception.name, name)
        self.assertIsNone(blocker.find_spec("refusedpkgother"))
        self.assertEqual(blocker.refused, ["refusedpkg", "refusedpkg.sub"])

    def test_temporary(self) -> None:
        """
        While installed, an import of a refused package fails as if it
        were not installed; once removed, the same import succeeds (the
        failure is not remembered).
        """
        _writeModules(self, {"blockprobe/__init__.py": "VALUE = 7\n"})
        with run.ImportBlocker(["blockprobe"]) as blocker:
            self.assertIn(blocker, sys.meta_path)
            with self.assertRaises(ImportError):
                import blockprobe  # noqa: F401
        self.assertNotIn(blocker, sys.meta_path)
        import blockprobe

        self.assertEqual(blockprobe.VALUE, 7)

    def test_nothing(self) -> None:
        """
        A blocker with no names does not install itself.
        """
        before = list(sys.meta_path)
        with run.ImportBlocker(()):
            self.assertEqual(sys.meta_path, before)
        self.assertEqual(sys.meta_path, before)


class DeferImportsTests(unittest.TestCase):
    """
    L{run.deferImports} makes modules load on their first use.
    """

    def test_lazy(self) -> None:
        """
        A deferred module is bound by C{from package import module}
        without running; its first attribute access runs it, once.
        """
        _writeModules(self, {
            "lazyprobe/__init__.py": "executed = []\n",
            "lazyprobe/child.py": """
                from lazyprobe import executed
                executed.append(__name__)
                VALUE = 42
            """,
        })
        self.assertEqual(run.deferImports(["lazyprobe.child"]), ["lazyprobe.child"])
        import lazyprobe
        from lazyprobe import child

        self.assertIs(lazyprobe.child, child)
        self.assertEqual(lazyprobe.executed, [])
        self.assertEqual(child.VALUE, 42)
        self.assertEqual(child.VALUE, 42)
        self.assertEqual(lazyprobe.executed, ["lazyprobe.child"])

    def test_skipped(self) -> None:
        """
        A module already imported, or not installed, is left alone.
        """
        self.assertEqual(run.deferImports(["os", "no_such_module_for_miniproxy"]), [])


class AllowLaterTLSTests(unittest.TestCase):
    """
    L{run.allowLaterTLS} leaves a reactor imported with TLS alone.
    """

    def test_complete(self) -> None:
        """
        In this process the reactor was imported with its TLS support:
        nothing is missing, nothing replaced.
        """
        from twisted.internet import posixbase

        tls, ssl = posixbase.tls, posixbase.ssl
        self.assertFalse(run.allowLaterTLS())
        self.assertIs(posixbase.tls, tls)
        self.assertIs(posixbase.ssl, ssl)


#: Endpoint strings, some of them TLS ones.
_endpoints = st.sampled_from([
    "tcp:host=10.0.0.1:port=80", "tls:host=example.com:port=443", "ssl:8443",
    "TLS:example.com:443", "tcp:8080", "unix:/tmp/x", "plain text", "10.0.0.0/8", "",
])


class NeedsTLSTests(unittest.TestCase):
    """
    L{run.needsTLS} and L{run.configNeedsTLS}: whether anything
    configured may need TLS, decided without building the configuration.
    """

    def needs(self, *argv: str) -> bool:
        return run.needsTLS(run.peekOptions(argv))

    def writeConfig(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def test_commandLine(self) -> None:
        """
        A C{tls:} next hop, or a listen endpoint that is not plain, needs
        TLS; plain TCP, unix and tproxy listeners and a TCP next hop do
        not.
        """
        self.assertFalse(self.needs())
        self.assertFalse(self.needs(
            "--listen", "tcp:8080", "-l", "tcp6:8081", "--listen", "unix:/tmp/s",
            "--listen", "tproxy:port=9", "--to", "tcp:host=127.0.0.1:port=9"))
        self.assertTrue(self.needs("--to", "tls:host=example.com:port=443"))
        self.assertTrue(self.needs("--to=tls:example.com:443"))
        self.assertTrue(self.needs("-ttls:example.com:443"))
        self.assertTrue(self.needs("--listen", "ssl:8443:privateKey=k.pem"))
        self.assertTrue(self.needs("--listen", "someplugin:1"))

    def test_unparsable(self) -> None:
        """
        Options that do not parse count as needing TLS (nothing is
        refused; the real parse reports the error).
        """
        self.assertIsNone(run.peekOptions(["--no-such-option"]))
        self.assertTrue(self.needs("--no-such-option"))

    def test_peekActsOnNothing(self) -> None:
        """
        Peeking at C{--help}, C{--version} or C{--list-functions} neither
        prints nor exits; C{--list-functions} counts as needing TLS (the
        discovery imports every function's plugin).
        """
        for flag in ("--help", "--version"):
            self.assertIsNotNone(run.peekOptions([flag]))
        self.assertTrue(self.needs("--list-functions"))

    def test_configFile(self) -> None:
        """
        A config file with a C{tls:} or C{ssl:} string anywhere (here in a
        function's settings) or a listener that is not plain needs TLS; a
        plain one does not.
        """
        plain = self.writeConfig("""
            listen = ["tcp:8080", "unix:/tmp/s"]
            to = "tcp:host=127.0.0.1:port=9"
            [[listeners]]
            endpoint = "tproxy:port=9"
            to = "tcp:127.0.0.1:80"
            [limits]
            max-buffer = 1000
        """)
        self.assertFalse(self.needs("--config", plain))
        self.assertFalse(run.configNeedsTLS(plain))
        inFunction = self.writeConfig("""
            [function.policy]
            routes = [["10.0.0.0/8", "tls:host=upstream:port=443"]]
        """)
        self.assertTrue(self.needs("-c", inFunction))
        listener = self.writeConfig("""
            [[listeners]]
            endpoint = "ssl:8443:privateKey=k.pem"
        """)
        self.assertTrue(run.configNeedsTLS(listener))
        self.assertTrue(run.configNeedsTLS(self.writeConfig('listen = "ssl:1"\n')))

    def test_badConfigFile(self) -> None:
        """
        A config file that is missing or not TOML counts as needing TLS.
        """
        self.assertTrue(run.configNeedsTLS(os.path.abspath(self.mktemp())))
        self.assertTrue(run.configNeedsTLS(self.writeConfig("not = [toml")))

    @given(st.dictionaries(
        st.sampled_from(["to", "hop", "upstream", "note"]),
        st.one_of(_endpoints, st.lists(_endpoints, max_size=3)),
        max_size=4,
    ), st.sampled_from(["", "function.x", "limits"]))
    def test_anyTLSString(self, values: dict[str, Any], table: str) -> None:
        """
        A config file needs TLS exactly when one of its strings (outside
        the listen keys) names a C{tls:} or C{ssl:} endpoint.
        """
        lines = [f"[{table}]"] if table else []
        for key, value in values.items():
            items = value if isinstance(value, list) else [value]
            rendered = ", ".join(f'"{item}"' for item in items)
            lines.append(f"{key} = [{rendered}]" if isinstance(value, list)
                         else f"{key} = {rendered}")
        path = os.path.join(self.mktemp())
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        strings = [s for v in values.values() for s in (v if isinstance(v, list) else [v])]
        expected = any(s.split(":", 1)[0].lower() in ("tls", "ssl") for s in strings)
        self.assertEqual(run.configNeedsTLS(path), expected)


class ConsoleScriptTests(unittest.TestCase):
    """
    The C{miniproxy} console script.
    """

    def test_entryPoint(self) -> None:
        """
        setup.cfg names L{run.main} as the C{miniproxy} script, and
        C{python -m miniproxy} runs the same function.
        """
        parser = configparser.ConfigParser()
        parser.read(os.path.join(REPO, "setup.cfg"))
        scripts = parser["options.entry_points"]["console_scripts"].strip().splitlines()
        self.assertIn("miniproxy = miniproxy.run:main", [s.strip() for s in scripts])
        with open(os.path.join(REPO, "miniproxy", "__main__.py")) as f:
            self.assertIn("from miniproxy.run import main", f.read())


#: Run C{python -m miniproxy} with the arguments given, printing on
#: standard output, once it listens and at the end of each flow, which of
#: the modules C{WATCHED_MODULES} (see L{_watching}) were imported by then.
_WATCHED = """
import sys
from miniproxy.run import deferImports, main

# As main does first, before the observer's own import of twisted.logger.
deferImports()
from twisted.logger import globalLogPublisher

HEAVY = WATCHED_MODULES

def watch(event):
    moment = None
    if event.get("log_namespace") == "miniproxy.access":
        moment = "flow closed"
    elif event.get("log_format", "").startswith("miniproxy listening"):
        moment = "listening"
    if moment is not None:
        imported = " ".join(m for m in HEAVY if m in sys.modules)
        sys.stdout.write(f"{moment}: imported: [{imported}]\\n")
        sys.stdout.flush()

globalLogPublisher.addObserver(watch)
sys.exit(main(sys.argv[1:]))
"""

#: What L{_WATCHED} prints: the moment, and the modules imported by then.
_IMPORTED = re.compile(rb"(.+): imported: \[(.*)\]")

#: The modules a plain TCP relay does without: the TLS stack, Twisted's
#: endpoint parser, C{urllib.request} and the function discovery.
_TLS_MODULES = ("OpenSSL", "cryptography", "service_identity", "twisted.internet.ssl",
                "twisted.internet.endpoints", "urllib.request",
                "miniproxy.functions.discovery")

#: The modules an C{accept}-mode relay with no config file and no function
#: does without: the SYN tap, the option emitter (and its netfilter
#: queue), the workers, the explicit destination carriers, the config
#: file's parser, Twisted's client services and C{automat}.
_ACCEPT_MODULES = ("miniproxy.syntap", "miniproxy.earlysyn", "miniproxy.optionemitter",
                   "miniproxy.nfqueue", "miniproxy.wire.packet", "miniproxy.wire.proxyv2",
                   "miniproxy.workers", "miniproxy.carriers", "tomllib",
                   "twisted.application.internet", "automat")


def _watching(modules: tuple[str, ...]) -> str:
    """
    L{_WATCHED}, watching C{modules}.
    """
    return _WATCHED.replace("WATCHED_MODULES", repr(modules))

#: Import the reactor as C{python -m miniproxy} does with no TLS
#: configured, then check that TCP works, that TLS fails with an
#: L{ImportError} while C{OpenSSL} is refused, and that it works once it
#: is not.  Arguments: a server key and certificate, and its CA's
#: certificate, in PEM files.
_LATER_TLS = """
import sys
from miniproxy import run

with run.ImportBlocker(run.TLS_PACKAGES):
    reactor = run.installReactor()
print("OpenSSL after the reactor:", "OpenSSL" in sys.modules)
print("restored:", run.allowLaterTLS())

from twisted.internet.protocol import ClientFactory, Factory, Protocol

class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)

class Ask(Protocol):
    def connectionMade(self):
        self.transport.write(b"ping")
    def dataReceived(self, data):
        self.factory.answers.append(data)
        self.transport.loseConnection()
        self.factory.done()

def ask(connect, then):
    factory = ClientFactory.forProtocol(Ask)
    factory.answers = []
    def done():
        print(connect.__name__, factory.answers)
        then()
    factory.done = done
    return factory

def tls():
    try:
        with run.ImportBlocker(run.TLS_PACKAGES):
            reactor.listenSSL(0, Factory.forProtocol(Echo), None, interface="127.0.0.1")
    except ImportError as e:
        print("refused:", e.name)
    from twisted.internet import ssl
    server = ssl.PrivateCertificate.loadPEM(open(sys.argv[1], "rb").read())
    port = reactor.listenSSL(0, Factory.forProtocol(Echo), server.options(),
                             interface="127.0.0.1")
    trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(open(sys.argv[2], "rb").read())])
    client = ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust)
    reactor.connectSSL("127.0.0.1", port.getHost().port, ask(reactor.connectSSL, reactor.stop),
                       client)

port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
reactor.connectTCP("127.0.0.1", port.getHost().port, ask(reactor.connectTCP, tls))
reactor.run()
"""


class LeanCommandTests(TwistdTestCase):
    """
    C{python -m miniproxy} run as a subprocess on loopback.
    """

    def lean(self, *args: str, script: str | None = None) -> Any:
        """
        Start C{python -m miniproxy ARGS} (or C{python -c script ARGS});
        it is stopped at cleanup.
        """
        head = ["-m", "miniproxy"] if script is None else ["-c", script]
        return self.spawn([sys.executable, *head, *args], name="python -m miniproxy")

    @defer.inlineCallbacks
    def startLean(self, to: str, *args: str, script: str | None = None) -> Any:
        """
        Start C{python -m miniproxy} relaying to C{to}, and wait until it
        listens.

        @return: A L{defer.Deferred} firing with the L{Child} and its port.
        """
        child = self.lean("--listen", "tcp:0:interface=127.0.0.1", "--to", to, *args,
                          script=script)
        [match] = yield child.waitFor(LISTENING)
        return child, int(match.group(1))

    @defer.inlineCallbacks
    def echo(self, net: Network, port: int, payload: bytes) -> Any:
        """
        Send C{payload} through the proxy at C{port} to an echo server and
        check that it comes back, then close.
        """
        client = yield net.connect(port)
        client.transport.write(payload)
        yield client.waitForBytes(len(payload))
        self.assertEqual(client.received, payload)
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_relayAndSIGTERM(self) -> Any:
        """
        Bytes go through the proxy to an echo server and back exactly, the
        flow is logged on standard error, and C{SIGTERM} stops the proxy
        with exit status 0.
        """
        net = Network(self)
        serverPort, _ = net.server(echo=True)
        child, port = yield self.startLean(f"tcp:host=127.0.0.1:port={serverPort}")
        payload = os.urandom(256 * 1024)
        yield self.echo(net, port, payload)
        yield child.waitFor(re.compile(rb"\[miniproxy\.access#info\] .* up=262144 "))
        child.transport.signalProcess("TERM")
        yield child.ended
        self.assertEqual((child.exitCode, child.signal), (0, None), child.output)
        self.assertIn(b"Received SIGTERM", child.output)

    @defer.inlineCallbacks
    def test_SIGINT(self) -> Any:
        """
        C{SIGINT} stops the proxy too, with exit status 0.
        """
        child, port = yield self.startLean("tcp:host=127.0.0.1:port=9", "--mode", "accept")
        child.transport.signalProcess("INT")
        yield child.ended
        self.assertEqual((child.exitCode, child.signal), (0, None), child.output)

    @defer.inlineCallbacks
    def test_logfile(self) -> Any:
        """
        With C{--logfile}, the log goes to that file (appended), not to
        standard error.
        """
        path = os.path.join(self.workdir, "proxy.log")
        with open(path, "w") as f:
            f.write("earlier line\n")
        child = self.lean("--listen", "tcp:0:interface=127.0.0.1", "--logfile", path,
                          "--to", "tcp:host=127.0.0.1:port=9")

        def logged() -> bool:
            with open(path) as f:
                return LISTENING.search(f.read().encode()) is not None

        yield waitUntil(logged, "the log file's listening line", timeout=20)
        yield child.stop()
        with open(path) as f:
            self.assertTrue(f.read().startswith("earlier line\n"))
        self.assertNotIn(b"listening on", child.output)

    @defer.inlineCallbacks
    def assertRejected(self, status: int, message: bytes, *args: str) -> Any:
        """
        C{python -m miniproxy ARGS} ends at once with C{status} and one
        line containing C{message} on its standard error, no traceback.
        """
        child = self.lean(*args)
        yield child.ended
        self.assertEqual(child.exitCode, status, child.output)
        self.assertIn(message, child.output)
        self.assertTrue(child.output.startswith(b"miniproxy: "), child.output)
        self.assertNotIn(b"Traceback", child.output)

    def test_badOption(self) -> Any:
        """
        An unknown option is rejected with status 2.
        """
        return self.assertRejected(2, b"no-such-option", "--no-such-option")

    def test_badNextHop(self) -> Any:
        """
        A next hop of an unknown kind is rejected with status 2.
        """
        return self.assertRejected(2, b"kind must be tcp or tls", "--to", "udp:1.2.3.4:53")

    def test_missingConfig(self) -> Any:
        """
        A config file that does not exist is rejected with status 2.
        """
        return self.assertRejected(2, b"missing.toml", "--config", "missing.toml")

    def test_unknownFunction(self) -> Any:
        """
        A function that is not installed stops the start with status 1.
        """
        return self.assertRejected(1, b"no proxy function named 'nope'",
                                   "--to", "tcp:host=127.0.0.1:port=9", "--function", "nope")

    @defer.inlineCallbacks
    def test_cannotListen(self) -> Any:
        """
        A port already in use stops the start with status 1.
        """
        net = Network(self)
        taken, _ = net.server()
        yield self.assertRejected(1, str(taken).encode(), "--listen",
                                  f"tcp:{taken}:interface=127.0.0.1", "--to",
                                  "tcp:host=127.0.0.1:port=9")

    @defer.inlineCallbacks
    def test_help(self) -> Any:
        """
        C{--help} prints the options, the tap's and C{--logfile}, and exits
        with status 0.
        """
        child = self.lean("--help")
        yield child.ended
        self.assertEqual(child.exitCode, 0, child.output)
        for option in (b"--to", b"--listen", b"--mode", b"--logfile", b"--workers"):
            self.assertIn(option, child.stdout)

    @defer.inlineCallbacks
    def test_noOpenSSL(self) -> Any:
        """
        With nothing TLS configured, the first flow is relayed and closed
        without C{OpenSSL}, C{cryptography}, Twisted's TLS and endpoint
        modules, C{urllib.request} or the function discovery ever
        imported.
        """
        yield self.assertNeverImported(_TLS_MODULES)

    @defer.inlineCallbacks
    def assertNeverImported(self, modules: tuple[str, ...], *args: str) -> Any:
        """
        Relay a flow through C{python -m miniproxy ARGS} to an echo server,
        and check that none of C{modules} was imported once it listened,
        nor once the flow closed.
        """
        net = Network(self)
        serverPort, _ = net.server(echo=True)
        child, port = yield self.startLean(
            f"tcp:host=127.0.0.1:port={serverPort}", *args, script=_watching(modules))
        yield self.echo(net, port, b"x" * 1000)
        found = yield child.waitFor(_IMPORTED, 2)
        self.assertEqual([m.groups() for m in found],
                         [(b"listening", b""), (b"flow closed", b"")])

    @defer.inlineCallbacks
    def test_acceptModeImports(self) -> Any:
        """
        In C{accept} mode with no config file and no function, the first
        flow is relayed and closed without the SYN tap, the option
        emitter, the workers, the carriers, C{tomllib},
        C{twisted.application.internet} or C{automat} ever imported.
        """
        yield self.assertNeverImported(_ACCEPT_MODULES, "--mode", "accept")

    @defer.inlineCallbacks
    def test_earlyModeImportsTap(self) -> Any:
        """
        In C{early} mode, the SYN tap's modules are imported before the
        proxy listens (the watcher of L{test_acceptModeImports} sees them
        when they are there).
        """
        net = Network(self)
        serverPort, _ = net.server(echo=True)
        child, port = yield self.startLean(
            f"tcp:host=127.0.0.1:port={serverPort}", "--mode", "early",
            script=_watching(("miniproxy.earlysyn", "miniproxy.syntap", "automat")))
        [found] = yield child.waitFor(_IMPORTED)
        self.assertEqual(found.groups(),
                         (b"listening", b"miniproxy.earlysyn miniproxy.syntap"))

    @defer.inlineCallbacks
    def test_tlsNextHop(self) -> Any:
        """
        With a C{tls:} next hop configured, the flow is relayed over a
        verified TLS connection, and the TLS modules were imported before
        the proxy listened (the first flow does not wait for them).
        """
        from tests.support import PeerFactory

        net = Network(self)
        authority = CertificateAuthority()
        factory = PeerFactory(net, echo=True)
        serverPort = listenTLS(net, factory, authority.issue("127.0.0.1"))
        ca = authority.writeCertificate(os.path.join(self.workdir, "ca.pem"))
        child, port = yield self.startLean(
            f"tls:host=127.0.0.1:port={serverPort}:trustRoots={ca}",
            script=_watching(_TLS_MODULES))
        yield self.echo(net, port, b"y" * 1000)
        [match] = yield child.waitFor(_IMPORTED)
        self.assertEqual(match.group(1), b"listening")
        imported = set(match.group(2).split())
        self.assertLessEqual({b"OpenSSL", b"twisted.internet.ssl"}, imported)

    @defer.inlineCallbacks
    def test_laterTLS(self) -> Any:
        """
        A reactor imported without C{OpenSSL} relays TCP; its C{listenSSL}
        fails with an L{ImportError} naming C{OpenSSL} while it cannot be
        imported, and works (with C{connectSSL}) once it can.
        """
        authority = CertificateAuthority()
        server = os.path.join(self.workdir, "server.pem")
        with open(server, "wb") as f:
            f.write(authority.issue("127.0.0.1"))
        ca = authority.writeCertificate(os.path.join(self.workdir, "ca.pem"))
        child = self.spawn([sys.executable, "-c", _LATER_TLS, server, ca], name="later TLS")
        yield child.ended
        self.assertEqual(child.exitCode, 0, child.output)
        self.assertEqual(child.stdout.decode().splitlines(), [
            "OpenSSL after the reactor: False",
            "restored: True",
            "connectTCP [b'ping']",
            "refused: OpenSSL",
            "connectSSL [b'ping']",
        ])
