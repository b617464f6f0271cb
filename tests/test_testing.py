"""
Tests for L{miniproxy.testing}, the kit for testing proxy functions
without sockets.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from miniproxy.address import HostPort, NextHop
from miniproxy.errors import ConfigError
from miniproxy.flow import ConnectMode, Flow, Outcome
from miniproxy.functions.base import FlowHandler, HandlerFactory
from miniproxy.functions.policy import Policy
from miniproxy.functions.splittcp import SplitTCP
from miniproxy.interfaces import IProxyFunction
from miniproxy.limits import Limits
from miniproxy.plugins.miniproxy_builtin import policy as policyPlugin
from miniproxy.plugins.miniproxy_builtin import splitTCP as splitTCPPlugin
from miniproxy.testing import (
    FlowHarness,
    HookCall,
    MemoryLegTransport,
    RecordingFunction,
    configured,
)
from miniproxy.verdict import CONTINUE, Chunk, Verdict


class Shout(FlowHandler):
    """
    Upper-cases what goes one way.
    """

    __slots__ = ("direction",)
    wantsData = True

    def __init__(self, direction: str) -> None:
        self.direction = direction

    def dataFromClient(self, flow: Any, chunk: Chunk) -> Verdict:
        if self.direction == "up":
            chunk.data = chunk.data.upper()
        return CONTINUE


@implementer(IProxyFunction)
class ShoutPlugin:
    """
    A third-party plugin, as in the module docstring's example.
    """

    name = "shout"
    description = "Shouts."

    def __init__(self) -> None:
        self.reactors: list[object] = []

    def configure(self, settings: dict, reactor: object) -> HandlerFactory:
        self.reactors.append(reactor)
        direction = settings.pop("direction", "up")
        if settings:
            raise ConfigError(f"{sorted(settings)[0]}: unknown setting")
        return HandlerFactory(self.name, lambda flow: Shout(direction))


class ConfigureTests(unittest.TestCase):
    """
    Tests for L{configured} and the forms of functions L{FlowHarness}
    takes.
    """

    def test_docstringExample(self) -> None:
        """
        The module docstring's example works as written.
        """
        shout = ShoutPlugin()
        harness = FlowHarness([(shout, {"direction": "up"})])
        driver = harness.accept()
        driver.connectOutgoing()
        driver.clientSends(b"hello")
        self.assertEqual(driver.sentToServer(), b"HELLO")
        driver.clientHalfCloses()
        driver.serverHalfCloses()
        self.assertEqual(harness.closedFlows, [driver.flow])
        self.assertIs(driver.flow.outcome, Outcome.OK)  # type: ignore[union-attr]
        self.assertEqual(shout.reactors, [harness.reactor])

    def test_configured(self) -> None:
        """
        L{configured} configures a plugin with its settings and reactor.
        """
        clock = Clock()
        name, factory = configured(policyPlugin, {"default": "allow"}, clock)
        self.assertEqual(name, "policy")
        self.assertIsInstance(factory, Policy)
        self.assertTrue(factory.defaultAllow)  # type: ignore[attr-defined]

    def test_configuredBadSettings(self) -> None:
        """
        Bad settings raise the plugin's L{ConfigError}.
        """
        e = self.assertRaises(ConfigError, configured, policyPlugin, {"nope": 1})
        self.assertIn("nope", str(e))

    def test_configuredNotAFactory(self) -> None:
        """
        A plugin whose C{configure} returns no L{IFlowHandlerFactory} is
        reported.
        """

        @implementer(IProxyFunction)
        class Broken:
            name = "broken"
            description = "Broken."

            def configure(self, settings: dict, reactor: object) -> object:
                return object()

        self.assertRaises(TypeError, configured, Broken())

    def test_forms(self) -> None:
        """
        Functions may be given as factories, C{(name, factory)} pairs,
        plugins, or C{(plugin, settings)} pairs, in order.
        """
        clock = MemoryReactorClock()
        recorder = RecordingFunction("rec")
        harness = FlowHarness(
            [
                recorder,
                ("renamed", RecordingFunction("other")),
                splitTCPPlugin,
                (policyPlugin, {"default": "allow"}),
                configured(ShoutPlugin(), {}, clock),
            ],
            reactor=clock,
        )
        self.assertEqual(
            [name for name, _ in harness.functions],
            ["rec", "renamed", "split-tcp", "policy", "shout"],
        )
        self.assertIs(harness.functions[0][1], recorder)
        self.assertIsInstance(harness.functions[2][1], SplitTCP)
        self.assertEqual(harness.context.settings.functionNames[1], "renamed")

    def test_badForms(self) -> None:
        """
        Anything else is a L{TypeError}.
        """
        for bad in (object(), ("name", object()), (object(), {}), "policy"):
            self.assertRaises(TypeError, FlowHarness, [bad])

    def test_splitTCPOnMemoryTransports(self) -> None:
        """
        A socket tuner (split-TCP) runs on the in-memory legs without a
        socket to tune.
        """
        harness = FlowHarness([splitTCPPlugin])
        driver = harness.accept()
        driver.connectOutgoing()
        driver.clientSends(b"x")
        self.assertEqual(driver.sentToServer(), b"x")


class HarnessTests(unittest.TestCase):
    """
    Tests for L{FlowHarness} and L{FlowDriver}.
    """

    def test_noGlobalReactor(self) -> None:
        """
        Importing L{miniproxy.testing} does not install the global reactor.
        """
        code = (
            "import sys, miniproxy.testing; "
            "print('twisted.internet.reactor' in sys.modules)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        self.assertEqual(out.stdout.strip(), "False")

    def test_defaults(self) -> None:
        """
        By default the harness runs on a fresh L{MemoryReactorClock}, in
        C{early} mode, to a static next hop, with the default limits.
        """
        harness = FlowHarness()
        self.assertIsInstance(harness.reactor, MemoryReactorClock)
        self.assertIs(harness.context.mode, ConnectMode.EARLY)
        self.assertEqual(harness.context.staticNextHop, NextHop(HostPort("198.51.100.1", 80)))
        self.assertEqual(harness.limits, Limits())
        driver = harness.accept()
        self.assertEqual(driver.flow.client, HostPort("192.0.2.1", 40000))  # type: ignore[union-attr]
        self.assertEqual(driver.flow.local, HostPort("203.0.113.1", 8080))  # type: ignore[union-attr]

    def test_toString(self) -> None:
        """
        The static next hop may be an endpoint string.
        """
        harness = FlowHarness(to="tcp:host=10.9.8.7:port=3128")
        self.assertEqual(harness.accept().dialed, NextHop(HostPort("10.9.8.7", 3128)))

    def test_autoConnect(self) -> None:
        """
        With C{autoConnect} the outgoing leg connects as soon as it is
        dialed.
        """
        harness = FlowHarness(autoConnect=True)
        driver = harness.accept()
        self.assertFalse(driver.connecting)
        self.assertIsNotNone(driver.outgoingLeg)
        driver.clientSends(b"x")
        self.assertEqual(driver.sentToServer(), b"x")

    def test_outgoingAddresses(self) -> None:
        """
        The outgoing leg's peer is the next hop; its local address may be
        given.
        """
        harness = FlowHarness()
        driver = harness.accept()
        driver.connectOutgoing(local=HostPort("198.51.100.200", 61000))
        transport = driver.serverTransport
        assert transport is not None
        self.assertEqual(transport.getPeer().host, "198.51.100.1")
        self.assertEqual(transport.getPeer().port, 80)
        self.assertEqual(transport.getHost().port, 61000)

    def test_connectTimers(self) -> None:
        """
        The fake dialer's connect timeout is cancelled once connected or
        failed.
        """
        harness = FlowHarness(limits=Limits(idleTimeout=0))
        connected = harness.accept()
        failed = harness.accept(client=HostPort("192.0.2.2", 1))
        self.assertEqual(len(harness.reactor.getDelayedCalls()), 2)
        connected.connectOutgoing()
        failed.failOutgoing(Failure(error.ConnectError("no")))
        self.assertEqual(harness.reactor.getDelayedCalls(), [])
        self.assertEqual(len(harness.dialer.attempts), 2)
        self.assertEqual(connected.attempts, [harness.dialer.attempts[0]])

    def test_misuse(self) -> None:
        """
        Acting on a leg that does not exist, or connecting a flow that is
        not connecting, is a L{RuntimeError}.
        """
        harness = FlowHarness(limits=Limits(maxFlows=1, idleTimeout=0))
        driver = harness.accept()
        self.assertRaises(RuntimeError, driver.serverSends, b"x")
        self.assertRaises(RuntimeError, driver.serverHalfCloses)
        driver.connectOutgoing()
        self.assertRaises(RuntimeError, driver.connectOutgoing)
        self.assertRaises(RuntimeError, driver.failOutgoing)
        refused = harness.accept(client=HostPort("192.0.2.2", 1))
        self.assertTrue(refused.refusedAtAccept)
        self.assertRaises(RuntimeError, refused.clientSends, b"x")
        self.assertEqual(refused.sentToClient(), b"")
        self.assertFalse(refused.closed)

    def test_nothingAfterEnd(self) -> None:
        """
        A peer cannot send after its FIN.
        """
        harness = FlowHarness()
        driver = harness.accept()
        driver.clientHalfCloses()
        self.assertRaises(RuntimeError, driver.clientSends, b"x")
        self.assertRaises(RuntimeError, driver.clientCloses)

    def test_closedLegReadsNothing(self) -> None:
        """
        What a peer sends after the proxy closed its leg does not arrive.
        """
        harness = FlowHarness(to=None)
        driver = harness.accept()
        self.assertTrue(driver.clientLegClosed)
        driver.clientSends(b"ignored")
        self.assertEqual(driver.flow.bytesFromClient, 0)  # type: ignore[union-attr]

    def test_flushAfterDirectCalls(self) -> None:
        """
        What a function does outside a step of the harness (here, a direct
        call) takes effect at L{FlowHarness.flush}.
        """
        harness = FlowHarness()
        driver = harness.accept()
        driver.connectOutgoing()
        assert driver.flow is not None
        driver.flow.halfCloseToServer()
        self.assertTrue(driver.finSentToServer)
        self.assertFalse(driver.outgoingLeg.writeClosed)  # type: ignore[union-attr]
        harness.flush()
        self.assertTrue(driver.outgoingLeg.writeClosed)  # type: ignore[union-attr]


class MemoryLegTransportTests(unittest.TestCase):
    """
    Tests for L{MemoryLegTransport}.
    """

    def connected(self) -> tuple[FlowHarness, Any]:
        harness = FlowHarness(limits=Limits(idleTimeout=0))
        driver = harness.accept()
        driver.connectOutgoing()
        return harness, driver

    def test_dropsWritesAfterFin(self) -> None:
        """
        Bytes written after the write side was shut down are dropped, and
        recorded as such.
        """
        harness, driver = self.connected()
        transport: MemoryLegTransport = driver.serverTransport
        transport.write(b"before")
        transport.loseWriteConnection()
        transport.write(b"after")
        self.assertEqual(transport.value(), b"before")
        self.assertEqual(transport.droppedWrites, [b"after"])
        self.assertRaises(TypeError, transport.write, "text")

    def test_holdsWhilePaused(self) -> None:
        """
        While the proxy does not read a leg, what the peer sends waits, in
        order, FIN included.
        """
        harness, driver = self.connected()
        transport: MemoryLegTransport = driver.clientTransport
        transport.pauseProducing()
        driver.clientSends(b"ab")
        driver.clientSends(b"cd")
        driver.clientHalfCloses()
        self.assertEqual(transport.pendingFromPeer, 4)
        self.assertEqual(driver.sentToServer(), b"")
        self.assertFalse(driver.finSentToServer)
        transport.resumeProducing()
        harness.flush()
        self.assertEqual(driver.sentToServer(), b"abcd")
        self.assertTrue(driver.finSentToServer)

    def test_reset(self) -> None:
        """
        A peer's reset discards what was not read and reports
        L{ConnectionLost}.
        """
        harness, driver = self.connected()
        transport: MemoryLegTransport = driver.serverTransport
        transport.pauseProducing()
        driver.serverSends(b"unread")
        driver.serverResets()
        self.assertTrue(transport.lost)
        self.assertTrue(transport.lostReason.check(error.ConnectionLost))
        self.assertEqual(driver.sentToClient(), b"")

    def test_tcpOptions(self) -> None:
        """
        The TCP options are kept.
        """
        harness, driver = self.connected()
        transport: MemoryLegTransport = driver.clientTransport
        self.assertFalse(transport.getTcpNoDelay())
        transport.setTcpNoDelay(True)
        transport.setTcpKeepAlive(1)
        self.assertTrue(transport.getTcpNoDelay())
        self.assertTrue(transport.getTcpKeepAlive())

    def test_abortedReason(self) -> None:
        """
        A leg the proxy reset is told L{ConnectionAborted}.
        """
        harness, driver = self.connected()
        driver.flow.abort("test")
        harness.flush()
        self.assertTrue(driver.clientTransport.lostReason.check(error.ConnectionAborted))
        self.assertTrue(driver.serverTransport.lostReason.check(error.ConnectionAborted))


class RecordingFunctionTests(unittest.TestCase):
    """
    Tests for L{RecordingFunction} and L{HookCall}.
    """

    def test_records(self) -> None:
        """
        Calls are recorded with the chunk as the handler got it, or the
        reason; one handler is made per flow.
        """
        recorder = RecordingFunction("r")
        harness = FlowHarness([recorder], limits=Limits(idleTimeout=0))
        driver = harness.accept()
        driver.failOutgoing()
        self.assertEqual(
            recorder.calls,
            [
                HookCall("r", "earlySyn"),
                HookCall("r", "accepted"),
                HookCall("r", "outgoingFailed", "connection refused"),
                HookCall("r", "closed"),
            ],
        )
        self.assertEqual(recorder.hooks(), ["earlySyn", "accepted", "outgoingFailed", "closed"])
        self.assertEqual([h.flow for h in recorder.handlers], [driver.flow])

    def test_sharedCalls(self) -> None:
        """
        Functions sharing a list show their relative order; C{hooks()}
        gives each one's own.
        """
        calls: list[HookCall] = []
        a = RecordingFunction("a", calls, wantsData=False)
        b = RecordingFunction("b", calls)
        harness = FlowHarness([a, b], autoConnect=True)
        driver = harness.accept()
        driver.clientSends(b"x")
        self.assertEqual(
            [(c.function, c.hook) for c in calls],
            [
                ("a", "earlySyn"),
                ("b", "earlySyn"),
                ("a", "accepted"),
                ("b", "accepted"),
                ("a", "outgoingConnected"),
                ("b", "outgoingConnected"),
                ("b", "dataFromClient"),
            ],
        )
        self.assertNotIn("dataFromClient", a.hooks())

    def test_callableAnswers(self) -> None:
        """
        A callable answer gets the hook's arguments and may act on the
        flow.
        """
        seen: list[Any] = []

        def closed(flow: Flow) -> Verdict:
            seen.append(flow.outcome)
            return CONTINUE

        recorder = RecordingFunction(verdicts={"closed": closed})
        harness = FlowHarness([recorder])
        driver = harness.accept()
        driver.clientResets()
        self.assertEqual(seen, [Outcome.RESET])
