"""
Tests for L{miniproxy.tap}.
"""

from __future__ import annotations

import io
import sys

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial import unittest

from miniproxy.address import HostPort
from miniproxy.flow import ConnectMode
from miniproxy.service import ProxyService
from miniproxy.tap import Options, listFunctions, makeService


class OptionsTests(unittest.TestCase):
    """
    C{twistd miniproxy} options build a validated configuration.
    """

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        config = self.parse().config
        self.assertEqual(
            [l.endpoint for l in config.listeners], ["tcp:8080:interface=127.0.0.1"]
        )

    def test_everything(self) -> None:
        config = self.parse(
            "--listen", "tcp:1:interface=127.0.0.1",
            "-l", "tcp:2:interface=127.0.0.1",
            "--to", "tcp:host=127.0.0.1:port=9",
            "--mode", "accept",
            "--function", "split-tcp",
            "-f", "policy",
            "--connect-timeout", "3",
            "--idle-timeout", "4",
            "--max-flows", "5",
            "--max-flows-per-source", "6",
            "--max-buffer", "65536",
            "--listen-backlog", "77",
        ).config
        self.assertEqual(len(config.listeners), 2)
        self.assertEqual(config.listeners[1].to.address, HostPort("127.0.0.1", 9))
        self.assertEqual(config.listeners[0].mode, ConnectMode.ACCEPT)
        self.assertEqual([n for n, _ in config.functions], ["split-tcp", "policy"])
        limits = config.limits
        self.assertEqual(
            (limits.connectTimeout, limits.idleTimeout, limits.maxFlows,
             limits.maxFlowsPerSource, limits.maxBuffer, limits.listenBacklog),
            (3.0, 4.0, 5, 6, 65536, 77),
        )

    def test_configFile(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('to = "tcp:host=127.0.0.1:port=1"\nmode = "first-data"\n')
        config = self.parse("--config", path, "--mode", "accept").config
        self.assertEqual(config.listeners[0].mode, ConnectMode.ACCEPT)
        self.assertEqual(config.listeners[0].to.address.port, 1)

    def test_badValuesAreUsageErrors(self) -> None:
        for argv, message in [
            (["--mode", "later"], "mode: must be one of"),
            (["--to", "tcp:host=x"], "to: bad next hop"),
            (["--max-flows", "many"], "limits.max-flows: must be a number"),
        ]:
            with self.assertRaises(usage.UsageError) as raised:
                self.parse(*argv)
            self.assertIn(message, str(raised.exception))

    def test_badConfigFileNamesIt(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[limits]\nmax-flows = -3\n")
        with self.assertRaises(usage.UsageError) as raised:
            self.parse("--config", path)
        self.assertIn(f"{path}: limits.max-flows", str(raised.exception))

    def test_listFunctions(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as raised:
            self.parse("--list-functions")
        self.assertEqual(raised.exception.code, 0)
        lines = out.getvalue().splitlines()
        self.assertEqual(out.getvalue(), listFunctions())
        names = [line.split()[0] for line in lines]
        self.assertIn("policy", names)
        self.assertIn("split-tcp", names)
        self.assertTrue(all(len(line.split()) > 2 for line in lines))


class MakeServiceTests(unittest.TestCase):
    """
    L{makeService} makes a L{ProxyService} or fails with a clear message.
    """

    def test_service(self) -> None:
        options = Options()
        options.parseOptions(
            ["--listen", "tcp:0:interface=127.0.0.1", "--to", "tcp:host=127.0.0.1:port=9",
             "--function", "split-tcp", "--function", "policy"]
        )
        reactor = MemoryReactorClock()
        service = makeService(options, reactor)
        self.assertIsInstance(service, ProxyService)
        self.assertEqual([name for name, _ in service.functions], ["split-tcp", "policy"])
        service.startService()
        self.addCleanup(service.stopService)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual(interface, "127.0.0.1")
        self.assertEqual(backlog, 1024)

    def test_unknownFunction(self) -> None:
        options = Options()
        options.parseOptions(["--function", "nope"])
        with self.assertRaises(SystemExit) as raised:
            makeService(options, MemoryReactorClock())
        self.assertIn("no proxy function named 'nope'", str(raised.exception.code))

    def test_badFunctionSettings(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                'functions = ["policy"]\n[function.policy]\n'
                '[[function.policy.rules]]\naction = "allow"\nsources = ["10.0.0.0/99"]\n'
            )
        options = Options()
        options.parseOptions(["--config", path])
        with self.assertRaises(SystemExit) as raised:
            makeService(options, MemoryReactorClock())
        self.assertIn(
            "function.policy.rules[0].sources[0]: bad CIDR", str(raised.exception.code)
        )
