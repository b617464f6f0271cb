"""
Tests for L{miniproxy.config}.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from miniproxy.address import HostPort, NextHop
from miniproxy.config import (
    DEFAULT_LISTEN,
    buildConfig,
    isTransparentEndpoint,
    loadConfig,
)
from miniproxy.errors import ConfigError
from miniproxy.flow import ConnectMode
from miniproxy.limits import Limits


class BuildConfigTests(unittest.TestCase):
    """
    L{buildConfig} validates a document and command-line overrides.
    """

    def test_defaults(self) -> None:
        """
        With nothing configured, the service listens on loopback only, in
        early mode, with the default limits and no functions.
        """
        config = buildConfig({})
        [listener] = config.listeners
        self.assertEqual(listener.endpoint, DEFAULT_LISTEN)
        self.assertIn("interface=127.0.0.1", listener.endpoint)
        self.assertEqual(listener.mode, ConnectMode.EARLY)
        self.assertIsNone(listener.to)
        self.assertFalse(listener.transparent)
        self.assertEqual(config.limits, Limits())
        self.assertEqual(config.functions, ())

    def test_full(self) -> None:
        document = {
            "mode": "accept",
            "to": "tcp:host=10.0.0.1:port=80",
            "functions": ["split-tcp", "policy"],
            "limits": {"max-buffer": 65536, "connect-timeout": 2.5, "max-flows": 7},
            "listeners": [
                {"endpoint": "tcp:8080:interface=127.0.0.1"},
                {"endpoint": "tcp:8081", "mode": "first-data",
                 "to": "tls:host=example.com:port=443"},
                {"endpoint": "tproxy:port=8082"},
            ],
            "function": {"policy": {"default": "allow"}},
        }
        config = buildConfig(document)
        first, second, third = config.listeners
        self.assertEqual(first.mode, ConnectMode.ACCEPT)
        self.assertEqual(first.to, NextHop(HostPort("10.0.0.1", 80)))
        self.assertEqual(second.mode, ConnectMode.FIRST_DATA)
        self.assertTrue(second.to.tls)
        self.assertTrue(third.transparent)
        self.assertIsNone(third.to)
        self.assertEqual(
            config.functions,
            (("split-tcp", {}), ("policy", {"default": "allow"})),
        )
        self.assertEqual(config.limits.maxBuffer, 65536)
        self.assertEqual(config.limits.connectTimeout, 2.5)
        self.assertEqual(config.limits.maxFlows, 7)

    def test_commandLineOverrides(self) -> None:
        """
        C{listen} replaces the file's listeners, C{to}/C{mode} override, and
        C{functions} add to the file's list after it.
        """
        document = {
            "mode": "accept",
            "to": "tcp:host=10.0.0.1:port=80",
            "listen": ["tcp:1"],
            "functions": ["policy"],
        }
        config = buildConfig(
            document,
            listen=["tcp:2", "tcp:3"],
            to="tcp:host=10.0.0.2:port=81",
            mode="first-data",
            functions=["split-tcp", "policy"],
            limits={"idle-timeout": "0"},
        )
        self.assertEqual([l.endpoint for l in config.listeners], ["tcp:2", "tcp:3"])
        self.assertEqual(
            {l.to.address for l in config.listeners}, {HostPort("10.0.0.2", 81)}
        )
        self.assertEqual(
            {l.mode for l in config.listeners}, {ConnectMode.FIRST_DATA}
        )
        self.assertEqual([n for n, _ in config.functions], ["policy", "split-tcp"])
        self.assertEqual(config.limits.idleTimeout, 0)

    def test_listenString(self) -> None:
        config = buildConfig({"listen": "tcp:9"})
        self.assertEqual([l.endpoint for l in config.listeners], ["tcp:9"])

    def assertBad(self, document: dict, key: str, **overrides: object) -> None:
        with self.assertRaises(ConfigError) as raised:
            buildConfig(document, **overrides)  # type: ignore[arg-type]
        self.assertTrue(
            str(raised.exception).startswith(key),
            f"{str(raised.exception)!r} does not start with {key!r}",
        )

    def test_errorsNameTheKey(self) -> None:
        self.assertBad({"colour": 1}, "colour: unknown key")
        self.assertBad({"mode": "eager"}, "mode: must be one of early, accept, first-data")
        self.assertBad({"to": 5}, "to: must be an endpoint string")
        self.assertBad({"to": "tcp:host=a"}, "to: bad next hop")
        self.assertBad({"limits": {"max-bufer": 1}}, "limits.max-bufer: unknown limit")
        self.assertBad({"limits": {"max-flows": -1}}, "limits.max-flows: must not be negative")
        self.assertBad({"limits": {"max-flows": True}}, "limits.max-flows: must be a number")
        self.assertBad({"limits": {"max-flows": 1.5}}, "limits.max-flows: must be a whole number")
        self.assertBad({"limits": {"max-buffer": 100}}, "limits.max-buffer: must be at least 4096")
        self.assertBad({"limits": []}, "limits: must be a table")
        self.assertBad({"functions": "policy"}, "functions: must be a list")
        self.assertBad({"functions": ["a", "a"]}, "functions: a function is listed twice")
        self.assertBad({"function": {"policy": {}}}, "function.policy: settings for a function that is not enabled")
        self.assertBad({"functions": ["policy"], "function": {"policy": 3}}, "function.policy: must be a table")
        self.assertBad({"listeners": []}, "listeners: must be a non-empty list")
        self.assertBad({"listeners": [{"endpoint": "tcp:1", "port": 2}]}, "listeners[0].port: unknown key")
        self.assertBad({"listeners": [{"to": "tcp:a:1"}]}, "listeners[0].endpoint: must be an endpoint string")
        self.assertBad({"listeners": [{"endpoint": "tcp:1", "mode": "x"}]}, "listeners[0].mode")
        self.assertBad({"listeners": [{"endpoint": "tcp:1", "transparent": "yes"}]}, "listeners[0].transparent")
        self.assertBad({"listeners": [{"endpoint": "tproxy:port=1", "to": "tcp:a:1"}]}, "listeners[0].to: a transparent listener")
        self.assertBad({"listen": ["tcp:1"], "listeners": [{"endpoint": "tcp:2"}]}, "listen: give either")
        self.assertBad({"listen": 5}, "listen: must be a list")
        self.assertBad({}, "limits.connect-timeout: must be a number", limits={"connect-timeout": "soon"})

    def test_transparentKinds(self) -> None:
        self.assertTrue(isTransparentEndpoint("tproxy:port=1"))
        self.assertFalse(isTransparentEndpoint("tcp:1"))


class LoadConfigTests(unittest.TestCase):
    """
    L{loadConfig} reads TOML files and names the file in every error.
    """

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_load(self) -> None:
        path = self.write(
            'to = "tcp:host=127.0.0.1:port=8000"\n'
            'functions = ["policy"]\n'
            "[function.policy]\n"
            'default = "deny"\n'
            "[[function.policy.rules]]\n"
            'action = "allow"\n'
            'sources = ["127.0.0.0/8"]\n'
        )
        config = loadConfig(path)
        self.assertEqual(config.listeners[0].to.address, HostPort("127.0.0.1", 8000))
        self.assertEqual(config.functions[0][1]["rules"][0]["action"], "allow")

    def test_badValueNamesFileAndKey(self) -> None:
        path = self.write('mode = "sometimes"\n')
        with self.assertRaises(ConfigError) as raised:
            loadConfig(path)
        self.assertTrue(str(raised.exception).startswith(f"{path}: mode: "))

    def test_badToml(self) -> None:
        path = self.write("mode = \n")
        with self.assertRaises(ConfigError) as raised:
            loadConfig(path)
        self.assertIn(f"{path}: not valid TOML", str(raised.exception))

    def test_missingFile(self) -> None:
        path = os.path.join(self.mktemp(), "nope.toml")
        with self.assertRaises(ConfigError) as raised:
            loadConfig(path)
        self.assertIn(f"{path}: cannot read", str(raised.exception))

    def test_overrides(self) -> None:
        path = self.write('mode = "accept"\n')
        config = loadConfig(path, mode="early")
        self.assertEqual(config.listeners[0].mode, ConnectMode.EARLY)
