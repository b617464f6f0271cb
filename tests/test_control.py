"""
Tests for L{miniproxy.control} (the control socket of a running service)
and L{miniproxy.ctl} (its client and command): the protocol on in-memory
transports, the peer check, the socket's mode, and the real command
adding, listing and removing a listener of a service in this process.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from miniproxy import control, ctl
from miniproxy.config import buildConfig, parseListener
from miniproxy.errors import ConfigError
from miniproxy.flow import ConnectMode
from miniproxy.service import ProxyService
from tests import test_twistd
from tests.support import withTimeout


def makeService(reactor: Any = None, document: dict[str, Any] | None = None,
                functions: Any = None) -> ProxyService:
    """
    A service with one configured accept-mode listener on a free port of
    127.0.0.1 and no SYN tap, over C{reactor} (a memory one by default).
    """
    document = dict(
        {"listen": "tcp:0:interface=127.0.0.1", "mode": "accept",
         "to": "tcp:host=127.0.0.1:port=7"},
        **(document or {}),
    )
    return ProxyService(buildConfig(document), reactor or MemoryReactorClock(),
                        functions=functions)


def result(d: defer.Deferred) -> Any:
    """
    The result a L{defer.Deferred} already has.
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


class _Failing(MemoryReactorClock):
    """
    A memory reactor whose ports are all taken.
    """

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


class _Factory:
    """
    A stand-in for a configured function's handler factory.
    """


class CommandTests(unittest.TestCase):
    """
    L{control.ControlChannel}: each command on a running service over a
    memory reactor.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.service = makeService(self.reactor)
        self.service.startService()
        self.channel = control.ControlChannel(self.service)

    def ask(self, message: Any) -> dict[str, Any]:
        line = message if isinstance(message, bytes) else json.dumps(message).encode()
        return result(self.channel.handle(line))

    def test_add(self) -> None:
        """
        C{add} starts a listener with the settings of a C{[[listeners]]}
        table, and replies once it listens, with its name and address.
        """
        reply = self.ask({"command": "add", "name": "web", "listener": {
            "endpoint": "tcp:9000:interface=127.0.0.1", "to": "tcp:host=127.0.0.1:port=8000",
            "mode": "first-data"}})
        self.assertEqual(reply["ok"], True)
        self.assertEqual(reply["name"], "web")
        self.assertEqual(len(reply["listening"]), 1)
        added = self.service.listenerNamed("web")
        settings = added.listenerContext.settings
        self.assertEqual(settings.mode, ConnectMode.FIRST_DATA)
        self.assertEqual(str(settings.to), "tcp:127.0.0.1:8000")
        self.assertEqual(self.reactor.tcpServers[-1][:1], (9000,))
        self.assertEqual(self.reactor.tcpServers[-1][3], "127.0.0.1")

    def test_addDefaults(self) -> None:
        """
        An added listener with no C{mode} or C{to} takes the service's
        top-level ones, and a name of its own (C{listener-N}).
        """
        reply = self.ask({"command": "add", "listener": {"endpoint": "tcp:9001"}})
        self.assertEqual(reply["name"], "listener-2")
        settings = self.service.listenerNamed("listener-2").listenerContext.settings
        self.assertEqual(settings.mode, ConnectMode.ACCEPT)
        self.assertEqual(str(settings.to), "tcp:127.0.0.1:7")

    def test_addRefused(self) -> None:
        """
        A listener the configuration would refuse is refused with the
        configuration's message, under C{listener}: unknown keys, bad
        values, and an explicit destination without trusted peers (no open
        relay); so are a taken or malformed name and a missing listener.
        Nothing is added.
        """
        cases = [
            ({"endpoint": "tcp:9002", "bogus": 1}, "listener.bogus: unknown key"),
            ({"endpoint": "tcp:9002", "mode": "fast"}, "listener.mode: must be one of"),
            ({"endpoint": "tcp:9002", "explicit": ["proxy-v2"]},
             "listener.trusted: a listener reading explicit destinations"),
            ({"to": "tcp:host=h:port=1"}, "listener.endpoint: must be an endpoint string"),
            ({"endpoint": "tcp:9002", "functions": ["nope"]},
             "listener.functions: 'nope' is not enabled (enabled: none)"),
            ("tcp:9002", "listener: must be a table"),
        ]
        for listener, error in cases:
            reply = self.ask({"command": "add", "listener": listener})
            self.assertEqual(reply["ok"], False)
            self.assertIn(error, reply["error"])
        self.assertIn("exists already", self.ask(
            {"command": "add", "name": "listener-1", "listener": {"endpoint": "tcp:9"}})["error"])
        self.assertIn("name must be", self.ask(
            {"command": "add", "name": "a b", "listener": {"endpoint": "tcp:9"}})["error"])
        self.assertIn('no "listener"', self.ask({"command": "add"})["error"])
        self.assertIn("unknown key 'x'", self.ask(
            {"command": "add", "x": 1, "listener": {"endpoint": "tcp:9"}})["error"])
        self.assertEqual([s.name for s in self.service.listeners], ["listener-1"])

    def test_addCannotListen(self) -> None:
        """
        A port that cannot be bound is refused with the socket's error, and
        the listener is forgotten (its name is free again).
        """
        service = ProxyService(buildConfig({"listen": "unix:/nonexistent/x",
                                            "mode": "accept"}), _Failing())
        service.running = True
        lone = ProxyService(buildConfig({"listen": "unix:/nonexistent/x"}), _Failing())
        lone.removeListener("listener-1")
        lone.running = True
        reply = result(control.ControlChannel(lone).handle(
            b'{"command": "add", "listener": {"endpoint": "tcp:9003"}}'))
        self.assertIn("Address already in use", reply["error"])
        channel = control.ControlChannel(service)
        reply = result(channel.handle(json.dumps(
            {"command": "add", "name": "web", "listener": {"endpoint": "tcp:9003"}}).encode()))
        self.assertEqual(reply["ok"], False)
        self.assertIn("cannot listen on", reply["error"])
        self.assertIn("Address already in use", reply["error"])
        self.assertNotIn("web", service.namedServices)
        self.assertEqual(len(service.listeners), 1)

    def test_functions(self) -> None:
        """
        An added listener runs the service's functions, or only those its
        C{functions} names, in that order.
        """
        first, second = _Factory(), _Factory()
        service = makeService(document={"functions": ["one", "two"]},
                              functions=(("one", first), ("two", second)))
        service.startService()
        channel = control.ControlChannel(service)
        result(channel.handle(b'{"command": "add", "name": "all", "listener": '
                              b'{"endpoint": "tcp:9004"}}'))
        result(channel.handle(b'{"command": "add", "name": "some", "listener": '
                              b'{"endpoint": "tcp:9005", "functions": ["two", "one"]}}'))
        self.assertEqual(service.listenerNamed("all").listenerContext.functions,
                         (("one", first), ("two", second)))
        self.assertEqual(service.listenerNamed("some").listenerContext.functions,
                         (("two", second), ("one", first)))
        listed = result(channel.handle(b'{"command": "list"}'))["listeners"]
        self.assertEqual([x["functions"] for x in listed],
                         [["one", "two"], ["one", "two"], ["two", "one"]])

    def test_remove(self) -> None:
        """
        C{remove} stops the listener listening and forgets it; its name is
        free again; an unknown name is an error.
        """
        self.ask({"command": "add", "name": "web", "listener": {"endpoint": "tcp:9006"}})
        port = result(self.service.listenerPort("web"))
        stopped: list[bool] = []
        port.stopListening = lambda: stopped.append(True)
        reply = self.ask({"command": "remove", "name": "web"})
        self.assertEqual(reply, {"ok": True, "name": "web", "flows": 0})
        self.assertEqual(stopped, [True])
        self.assertRaises(KeyError, self.service.listenerNamed, "web")
        self.assertEqual(self.ask({"command": "remove", "name": "web"}),
                         {"ok": False, "error": "remove: no listener named 'web'"})
        self.assertIn("no listener named", self.ask({"command": "remove", "name": []})["error"])
        self.assertIn("close-flows must be", self.ask(
            {"command": "remove", "name": "listener-1", "close-flows": 1})["error"])
        self.assertEqual(self.ask({"command": "add", "name": "web",
                                   "listener": {"endpoint": "tcp:9006"}})["ok"], True)

    def test_removeFlows(self) -> None:
        """
        The flows of a removed listener run to their end (the reply counts
        them), or are reset with C{close-flows}; other listeners' flows are
        left alone.
        """
        self.ask({"command": "add", "name": "web", "listener": {"endpoint": "tcp:9007"}})
        mine, other = _FakeFlow(self.service, "web"), _FakeFlow(self.service, "listener-1")
        self.assertEqual(len(self.service.flowsOf("web")), 1)
        listed = self.ask({"command": "list"})["listeners"]
        self.assertEqual([x["flows"] for x in listed], [1, 1])
        self.assertEqual(self.ask({"command": "remove", "name": "web"})["flows"], 1)
        self.assertEqual(mine.aborted, [])
        self.ask({"command": "add", "name": "web", "listener": {"endpoint": "tcp:9007"}})
        again = _FakeFlow(self.service, "web")
        self.assertEqual(self.ask({"command": "remove", "name": "web", "close-flows": True}),
                         {"ok": True, "name": "web", "flows": 0})
        self.assertEqual(again.aborted, ["listener removed"])
        self.assertEqual(other.aborted, [])

    def test_list(self) -> None:
        """
        C{list} gives every listener, configured or added, with its
        endpoint, addresses, mode, next hop and open flows.
        """
        self.ask({"command": "add", "name": "web", "listener": {
            "endpoint": "tcp:9008:interface=127.0.0.1", "to": "tcp:host=127.0.0.1:port=80"}})
        reply = self.ask({"command": "list"})
        self.assertEqual(reply["ok"], True)
        web = reply["listeners"][1]
        self.assertEqual(web["name"], "web")
        self.assertEqual(web["endpoint"], "tcp:9008:interface=127.0.0.1")
        self.assertEqual(web["mode"], "accept")
        self.assertEqual(web["to"], "tcp:127.0.0.1:80")
        self.assertEqual(web["flows"], 0)
        self.assertEqual(len(web["listening"]), 1)
        self.assertIn("takes no other key", self.ask({"command": "list", "x": 1})["error"])

    def test_malformed(self) -> None:
        """
        What is not a JSON object with a string C{command} naming a
        command is answered with an error.
        """
        for line, error in [
            (b"not json", "not JSON"),
            (b"\xff\xfe\x00", "not JSON"),
            (b"[" * 50000, "not JSON"),
            (b"", "empty line"),
            (b"[1]", "not a JSON object"),
            (b'{"cmd": "list"}', 'no "command"'),
            (b'{"command": 1}', 'no "command"'),
            (b'{"command": "stop"}', "unknown command 'stop'"),
        ]:
            reply = self.ask(line)
            self.assertEqual(reply["ok"], False)
            self.assertIn(error, reply["error"])


class _FakeFlow:
    """
    An open flow of a listener, as the service's flow table holds it.
    """

    def __init__(self, service: ProxyService, name: str) -> None:
        self._context = service.listenerNamed(name).listenerContext
        self.aborted: list[str] = []
        self.table = service.table
        self.table.flows.add(self)  # type: ignore[arg-type]

    def abort(self, reason: str) -> None:
        self.aborted.append(reason)
        self.table.flows.discard(self)  # type: ignore[arg-type]


def connect(factory: control.ControlFactory,
            credentials: tuple[int, int, int] | None = None) -> tuple[Any, StringTransport]:
    """
    A connection of C{factory} on a L{StringTransport}, from a peer with
    C{credentials} (this process's by default).
    """
    if credentials is None:
        credentials = (os.getpid(), os.getuid(), os.getgid())
    factory.credentials = lambda transport: credentials  # type: ignore[assignment]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def replies(transport: StringTransport) -> list[dict[str, Any]]:
    """
    The reply lines written so far.
    """
    return [json.loads(line) for line in transport.value().splitlines()]


class ProtocolTests(unittest.TestCase):
    """
    L{control.ControlProtocol}: lines and replies, their bound, and who
    may connect.
    """

    def setUp(self) -> None:
        self.service = makeService()
        self.service.startService()
        self.factory = control.ControlFactory(control.ControlChannel(self.service))

    def test_lines(self) -> None:
        """
        Each line, however the bytes arrive, is answered by one line, in
        order; a carriage return before the newline is allowed.
        """
        protocol, transport = connect(self.factory)
        protocol.dataReceived(b'{"command": "li')
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b'st"}\r\n{"command": "x"}\n{"command": "remove", "name": "y"}\n')
        answers = replies(transport)
        self.assertEqual([a["ok"] for a in answers], [True, False, False])
        self.assertIn("unknown command", answers[1]["error"])
        self.assertFalse(transport.disconnecting)

    def test_tooLong(self) -> None:
        """
        A line longer than L{ctl.MAX_LINE}, with its newline or without, is
        answered with an error and the connection is closed; what follows
        is ignored.
        """
        for data in (b"x" * (ctl.MAX_LINE + 1) + b"\n", b"y" * (ctl.MAX_LINE + 10)):
            protocol, transport = connect(self.factory)
            protocol.dataReceived(data)
            protocol.dataReceived(b'{"command": "list"}\n')
            self.assertEqual(replies(transport), [
                {"ok": False, "error": f"request longer than {ctl.MAX_LINE} bytes"}])
            self.assertTrue(transport.disconnecting)

    def test_halfClose(self) -> None:
        """
        A client that shuts down its side after its requests gets every
        reply (a last line without its newline too), then the connection
        closes.
        """
        protocol, transport = connect(self.factory)
        protocol.dataReceived(b'{"command": "list"}\n{"command": "list"}')
        self.assertEqual(len(replies(transport)), 1)
        protocol.readConnectionLost()
        self.assertEqual(len(replies(transport)), 2)
        self.assertTrue(transport.disconnecting)

    def test_oneAtATime(self) -> None:
        """
        A request waits for the reply to the one before it.
        """
        waiting: defer.Deferred = defer.Deferred()
        self.factory.channel.command_slow = lambda message: waiting  # type: ignore[attr-defined]
        protocol, transport = connect(self.factory)
        protocol.dataReceived(b'{"command": "slow"}\n{"command": "list"}\n')
        self.assertEqual(transport.value(), b"")
        waiting.callback({"ok": True, "slow": True})
        self.assertEqual([a.get("slow") for a in replies(transport)], [True, None])

    def test_lostWhileBusy(self) -> None:
        """
        A reply due after the connection was lost is dropped.
        """
        waiting: defer.Deferred = defer.Deferred()
        self.factory.channel.command_slow = lambda message: waiting  # type: ignore[attr-defined]
        protocol, transport = connect(self.factory)
        protocol.dataReceived(b'{"command": "slow"}\n')
        protocol.connectionLost(None)  # type: ignore[arg-type]
        waiting.callback({"ok": True})
        self.assertEqual(transport.value(), b"")
        self.assertNotIn(protocol, self.factory.connections)

    def test_otherUser(self) -> None:
        """
        A peer that is neither root nor the service's user gets one error
        line, and the connection is closed before any request is read.
        """
        self.factory.allowedUids = frozenset({0, 1000})
        protocol, transport = connect(self.factory, (4242, 1001, 1001))
        protocol.dataReceived(b'{"command": "list"}\n')
        self.assertEqual(replies(transport), [
            {"ok": False, "error": "permission denied: uid 1001 may not use this control socket"}
        ])
        self.assertTrue(transport.disconnecting)
        for uid in (0, 1000):
            protocol, transport = connect(self.factory, (4242, uid, 0))
            protocol.dataReceived(b'{"command": "list"}\n')
            self.assertEqual(replies(transport)[0]["ok"], True)

    def test_unknownPeer(self) -> None:
        """
        A peer whose credentials cannot be read is refused.
        """
        def broken(transport: Any) -> tuple[int, int, int]:
            raise OSError(95, "Operation not supported")

        self.factory.credentials = broken  # type: ignore[assignment]
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIn("cannot tell who is connecting", replies(transport)[0]["error"])
        self.assertTrue(transport.disconnecting)

    def test_defaultUids(self) -> None:
        """
        By default root and the service's own user may connect.
        """
        self.assertEqual(self.factory.allowedUids, frozenset({0, os.getuid()}))

    @given(st.lists(st.binary(max_size=300), max_size=8))
    def test_anyBytes(self, chunks: list[bytes]) -> None:
        """
        Whatever bytes arrive, nothing raises, and each complete line is
        answered by exactly one reply line (a JSON object with C{ok}),
        unless the connection was closed.
        """
        protocol, transport = connect(self.factory)
        for chunk in chunks:
            protocol.dataReceived(chunk)
        data = b"".join(chunks)
        answers = replies(transport)
        self.assertTrue(all(isinstance(a, dict) and "ok" in a for a in answers))
        if not transport.disconnecting:
            self.assertEqual(len(answers), data.count(b"\n"))


class CredentialTests(unittest.TestCase):
    """
    L{control.peerCredentials} on a real UNIX socket pair.
    """

    def test_peerCredentials(self) -> None:
        """
        The peer of a socket pair is this process.
        """
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(a.close)
        self.addCleanup(b.close)

        class Transport:
            def getHandle(self) -> socket.socket:
                return a

        self.assertEqual(control.peerCredentials(Transport()),
                         (os.getpid(), os.getuid(), os.getgid()))


class _UmaskReactor(MemoryReactorClock):
    """
    A memory reactor that records the umask its UNIX ports are made under.
    """

    def listenUNIX(self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666,
                   wantPID: int = 0) -> Any:
        umask = os.umask(0o022)
        os.umask(umask)
        self.umasks = getattr(self, "umasks", []) + [umask]
        return super().listenUNIX(address, factory, backlog, mode, wantPID)


class ServerTests(unittest.TestCase):
    """
    L{control.ControlServer}: how the socket is made, and what it accepts
    as an endpoint.
    """

    def test_socket(self) -> None:
        """
        The socket is made at start-up with mode 0600 under a umask of 0177
        and with a lock file (a stale socket is replaced); the umask is
        restored.
        """
        reactor = _UmaskReactor()
        service = makeService(reactor)
        server = control.ControlServer(service, "unix:/run/m.sock", reactor)
        server.setServiceParent(service)
        before = os.umask(0o022)
        os.umask(before)
        service.privilegedStartService()
        service.startService()
        self.assertEqual(len(reactor.unixServers), 1)
        path, factory, backlog, mode, wantPID = reactor.unixServers[0]
        self.assertEqual((path, mode, bool(wantPID)), ("/run/m.sock", 0o600, True))
        self.assertIsInstance(factory, control.ControlFactory)
        self.assertEqual(reactor.umasks, [0o177])
        after = os.umask(0o022)
        os.umask(after)
        self.assertEqual(after, before)
        result(service.stopService())
        self.assertIsNone(server.port)

    def test_notUnix(self) -> None:
        """
        Only a C{unix:} endpoint with a path is a control socket: a TCP one
        is refused, by the configuration and by the server.
        """
        for description in ("tcp:9000", "tcp:9000:interface=127.0.0.1", "unix:",
                            "unix:/a:mode=666", "ssl:9000"):
            self.assertRaises(ValueError, ctl.socketPath, description)
            self.assertRaises(ConfigError, control.ControlServer, makeService(),
                              description, MemoryReactorClock())
            e = self.assertRaises(ConfigError, buildConfig,
                                  {"control": {"listen": description}})
            self.assertIn("control.listen: must be", str(e))
        self.assertEqual(ctl.socketPath("unix:/run/m.sock"), "/run/m.sock")
        self.assertEqual(ctl.socketPath("unix:address=/run/m.sock"), "/run/m.sock")
        self.assertEqual(ctl.socketPath("unix:/run/a\\:b"), "/run/a:b")
        longest = "/" + "s" * (ctl.MAX_SOCKET_PATH - 1)
        self.assertEqual(ctl.socketPath(f"unix:{longest}"), longest)
        with self.assertRaises(ValueError) as caught:
            ctl.socketPath(f"unix:{longest}s")
        self.assertIn("too long for a UNIX socket (108 bytes, at most 107)",
                      str(caught.exception))
        e = self.assertRaises(ConfigError, buildConfig,
                              {"control": {"listen": f"unix:{longest}s"}})
        self.assertIn("control.listen: the socket's path is too long", str(e))


class ConfigTests(unittest.TestCase):
    """
    The control socket and per-listener functions in the configuration.
    """

    def test_control(self) -> None:
        """
        C{[control] listen} sets the socket; C{--control} (the C{control}
        override) replaces it; there is none by default.
        """
        self.assertIsNone(buildConfig({}).control)
        self.assertEqual(buildConfig({"control": {"listen": "unix:/a"}}).control, "unix:/a")
        self.assertEqual(
            buildConfig({"control": {"listen": "unix:/a"}}, control="unix:/b").control,
            "unix:/b")
        self.assertRaises(ConfigError, buildConfig, {"control": {"socket": "unix:/a"}})
        self.assertRaises(ConfigError, buildConfig, {"control": "unix:/a"})
        e = self.assertRaises(ConfigError, buildConfig, {"workers": 2},
                              control="unix:/a")
        self.assertIn("not available with workers", str(e))

    def test_tapOption(self) -> None:
        """
        C{twistd miniproxy --control unix:PATH} sets it, and makes the
        service with a L{control.ControlServer} child; a TCP one is a usage
        error.
        """
        from twisted.python import usage

        from miniproxy.tap import Options, makeService as tapService

        options = Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--control",
                              "unix:/run/m.sock"])
        self.assertEqual(options.config.control, "unix:/run/m.sock")
        service = tapService(options, MemoryReactorClock())
        servers = [s for s in service if isinstance(s, control.ControlServer)]
        self.assertEqual([s.path for s in servers], ["/run/m.sock"])
        self.assertRaises(usage.UsageError, Options().parseOptions,
                          ["--control", "tcp:9000"])

    def test_listenerFunctions(self) -> None:
        """
        A C{[[listeners]]} table's C{functions} picks some of the enabled
        functions; they must be enabled, listed once, and at least one.
        """
        config = buildConfig({"functions": ["a", "b"], "listeners": [
            {"endpoint": "tcp:1", "functions": ["b"]}, {"endpoint": "tcp:2"}]})
        self.assertEqual([x.functionNames for x in config.listeners], [("b",), ()])
        for functions, error in [(["c"], "'c' is not enabled (enabled: a, b)"),
                                 ([], "must name at least one"),
                                 (["a", "a"], "a function is listed twice")]:
            e = self.assertRaises(ConfigError, buildConfig, {"functions": ["a", "b"],
                                  "listeners": [{"endpoint": "tcp:1", "functions": functions}]})
            self.assertIn(f"listeners[0].functions: {error}", str(e))
        settings = parseListener({"endpoint": "tcp:3", "functions": ["a"]}, config)
        self.assertEqual(settings.functionNames, ("a",))


class ClientTests(unittest.TestCase):
    """
    L{ctl}: the requests the command makes, what it prints, and its exit
    status without a service.
    """

    def parse(self, *argv: str) -> dict[str, Any]:
        return ctl.buildRequest(ctl._parser().parse_args(["--socket", "/s", *argv]))

    def test_requests(self) -> None:
        """
        Each command's options become its request; C{--set} adds any other
        key of a listener table, in JSON.
        """
        self.assertEqual(self.parse("list"), {"command": "list"})
        self.assertEqual(self.parse("remove", "web", "--close-flows"),
                         {"command": "remove", "name": "web", "close-flows": True})
        self.assertEqual(self.parse(
            "add", "--listen", "tcp:9000", "--to", "tcp:h:1", "--mode", "accept", "-f", "a",
            "-f", "b", "--name", "web", "--set", 'trusted=["10.0.0.0/8"]',
            "--set", 'explicit=["proxy-v2"]'),
            {"command": "add", "name": "web", "listener": {
                "endpoint": "tcp:9000", "to": "tcp:h:1", "mode": "accept",
                "functions": ["a", "b"], "trusted": ["10.0.0.0/8"],
                "explicit": ["proxy-v2"]}})
        self.assertRaises(ValueError, self.parse, "add", "--listen", "tcp:1", "--set", "x")
        self.assertRaises(ValueError, self.parse, "add", "--listen", "tcp:1", "--set", "x=[")

    def test_describe(self) -> None:
        """
        Replies are printed for people, a listing as a table.
        """
        self.assertEqual(ctl.describe("add", {"name": "web", "listening": ["127.0.0.1:1"]}),
                         "web listening on 127.0.0.1:1\n")
        self.assertEqual(ctl.describe("remove", {"name": "web", "flows": 2}),
                         "web removed (2 flows left open)\n")
        table = ctl.describe("list", {"listeners": [
            {"name": "web", "listening": ["127.0.0.1:1"], "flows": 3, "endpoint": "tcp:1"}]})
        self.assertEqual(table.splitlines()[1].split(), ["web", "127.0.0.1:1", "3", "tcp:1"])

    def test_exitStatus(self) -> None:
        """
        No socket given, no service at the socket, or bad options: status
        2 and one line on standard error.
        """
        missing = os.path.abspath(self.mktemp())
        for argv in (["list"], ["--socket", missing, "list"],
                     ["--socket", missing, "add", "--listen", "tcp:1", "--set", "x"]):
            stderr = io.StringIO()
            self.patch(os, "environ", {})
            self.assertEqual(ctl.main(argv, io.StringIO(), stderr), 2)
            self.assertEqual(len(stderr.getvalue().splitlines()), 1)
            self.assertTrue(stderr.getvalue().startswith("miniproxy-ctl: "))


    def test_waitForService(self) -> None:
        """
        With C{--wait}, the client tries again while no service listens at
        the socket yet, and gets its reply once one does.
        """
        directory = tempfile.mkdtemp(prefix="mpctl-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "c.sock")
        pauses: list[float] = []
        served: list[bytes] = []

        def serve(listener: socket.socket) -> None:
            connection, _ = listener.accept()
            with connection, listener:
                served.append(connection.recv(1024))
                connection.sendall(ctl.encode({"ok": True, "listeners": []}))

        def startService(seconds: float) -> None:
            # The client's first pause: only now does a service listen.
            pauses.append(seconds)
            if len(pauses) == 1:
                listener = socket.socket(socket.AF_UNIX)
                listener.bind(path)
                listener.listen(1)
                thread = threading.Thread(target=serve, args=(listener,))
                thread.start()
                self.addCleanup(thread.join, 10)

        self.patch(ctl, "_pause", startService)
        stdout = io.StringIO()
        self.assertEqual(ctl.main(["--socket", path, "--wait", "30", "list"], stdout,
                                  io.StringIO()), 0)
        self.assertEqual(pauses, [ctl.RETRY_INTERVAL])
        self.assertEqual(served, [b'{"command":"list"}\n'])
        self.assertEqual(stdout.getvalue().split(), ["NAME", "LISTENING", "FLOWS", "ENDPOINT"])

    def test_waitGivesUp(self) -> None:
        """
        With C{--wait}, a service that never listens is an error (status 2)
        once the time is up; without it, the client does not try again.
        """
        missing = os.path.abspath(self.mktemp())
        pauses: list[float] = []
        clock = [0.0]

        def pause(seconds: float) -> None:
            pauses.append(seconds)
            clock[0] += seconds

        self.patch(ctl, "_pause", pause)
        self.patch(ctl.time, "monotonic", lambda: clock[0])
        stderr = io.StringIO()
        self.assertEqual(ctl.main(["--socket", missing, "--wait", "1", "list"],
                                  io.StringIO(), stderr), 2)
        self.assertEqual(len(pauses), round(1 / ctl.RETRY_INTERVAL))
        self.assertIn("No such file or directory", stderr.getvalue())
        del pauses[:]
        self.assertEqual(ctl.main(["--socket", missing, "list"], io.StringIO(),
                                  io.StringIO()), 2)
        self.assertEqual(pauses, [])


class _Greeter(Protocol):
    """
    A backend that says hello and closes.
    """

    def connectionMade(self) -> None:
        self.transport.write(b"hello")
        self.transport.loseConnection()


class _Reader(Protocol):
    """
    A client that collects what it receives until the connection closes.
    """

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.data)


class EndToEndTests(test_twistd.TwistdTestCase):
    """
    The real command, run as a subprocess, controls a service with a
    control socket in this process.
    """

    def setUp(self) -> None:
        super().setUp()
        # A UNIX socket's path has at most 107 bytes: the test's own
        # directory, under the checkout's _trial_temp, can be longer.
        short = tempfile.mkdtemp(prefix="mpctl-")
        self.addCleanup(shutil.rmtree, short, True)
        self.path = os.path.join(short, "control.sock")
        backend = Factory.forProtocol(_Greeter)
        self.backend = self.reactor.listenTCP(0, backend, interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        self.service = makeService(self.reactor)
        control.ControlServer(self.service, f"unix:{self.path}",
                              self.reactor).setServiceParent(self.service)
        self.addCleanup(self.stopService)
        self.service.privilegedStartService()
        self.service.startService()

    def stopService(self) -> Any:
        # Stopping listeners bound by privilegedStartService also when
        # startService never ran.
        return self.service.stopService()

    @defer.inlineCallbacks
    def ctl(self, *argv: str, path: str | None = None) -> Any:
        """
        Run C{python -m miniproxy.ctl --socket PATH --json ARGV} to its end.

        @return: Its exit code, its reply (or L{None}) and its output.
        """
        child = yield self.runToEnd([sys.executable, "-m", "miniproxy.ctl", "--socket",
                                     path or self.path, "--json", *argv])
        lines = child.stdout.decode().splitlines()
        return child.exitCode, json.loads(lines[0]) if lines else None, child.output.decode()

    def fetch(self, port: int) -> defer.Deferred:
        """
        Connect to C{port} on 127.0.0.1 and read until the close.
        """
        reader = _Reader()
        connected = connectProtocol(TCP4ClientEndpoint(self.reactor, "127.0.0.1", port), reader)
        return connected.addCallback(lambda _: withTimeout(reader.done, 10, "the reply"))

    @defer.inlineCallbacks
    def test_addListRemove(self) -> Any:
        """
        C{add} starts a listener that relays; C{list} shows it; C{remove}
        closes its port; refused requests exit 1 with the error; the
        socket file is 0600 while the service runs and gone once it stops.
        """
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        backendPort = self.backend.getHost().port
        code, reply, output = yield self.ctl(
            "add", "--listen", "tcp:0:interface=127.0.0.1", "--name", "web",
            "--to", f"tcp:host=127.0.0.1:port={backendPort}")
        self.assertEqual((code, reply["ok"], reply["name"]), (0, True, "web"), output)
        port = int(reply["listening"][0].rsplit(":", 1)[1])
        data = yield self.fetch(port)
        self.assertEqual(data, b"hello")

        code, reply, output = yield self.ctl("list")
        self.assertEqual(code, 0, output)
        self.assertEqual([x["name"] for x in reply["listeners"]], ["listener-1", "web"])
        self.assertEqual(reply["listeners"][1]["listening"], [f"127.0.0.1:{port}"])

        code, reply, output = yield self.ctl(
            "add", "--listen", f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual((code, reply["ok"]), (1, False), output)
        self.assertIn("Address already in use", output)
        code, reply, output = yield self.ctl("add", "--listen", "tcp:0", "--name", "web")
        self.assertEqual(code, 1)
        self.assertIn("a listener named 'web' exists already", output)

        code, reply, output = yield self.ctl("remove", "web")
        self.assertEqual((code, reply), (0, {"ok": True, "name": "web", "flows": 0}), output)
        yield self.assertFailure(self.fetch(port), ConnectionRefusedError)
        code, reply, output = yield self.ctl("remove", "web")
        self.assertEqual(code, 1, output)

        yield self.service.stopService()
        self.assertFalse(os.path.exists(self.path))
        self.assertFalse(os.path.lexists(self.path + ".lock"))
        code, reply, output = yield self.ctl("list")
        self.assertEqual((code, reply), (2, None), output)

    @defer.inlineCallbacks
    def test_staleSocket(self) -> Any:
        """
        A socket file left by a process that died (its lock names a pid
        that is gone) is replaced by a new service's.
        """
        yield self.service.stopService()
        stale = os.path.join(os.path.dirname(self.path), "stale.sock")
        left = socket.socket(socket.AF_UNIX)
        left.bind(stale)
        left.close()
        os.symlink("999999999", stale + ".lock")
        service = makeService(self.reactor)
        control.ControlServer(service, f"unix:{stale}", self.reactor).setServiceParent(service)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        code, reply, output = yield self.ctl("list", path=stale)
        self.assertEqual(code, 0, output)
        yield service.stopService()
        self.assertFalse(os.path.exists(stale))
