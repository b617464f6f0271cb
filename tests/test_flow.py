"""
Tests for L{miniproxy.flow}: the relay between a flow's legs, the hooks of
its functions, and how flows end.

They run the real flow and legs on the in-memory transports of
L{miniproxy.testing}.
"""

from __future__ import annotations

import gc
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from miniproxy.address import DestinationSource, HostPort, NextHop
from miniproxy.chain import HookFailed
from miniproxy.flow import (
    ConnectMode,
    Flow,
    FlowTimes,
    IdleTimers,
    Moment,
    Outcome,
    describeFailure,
)
from miniproxy.functions import policy
from miniproxy.limits import Limits
from miniproxy.testing import FlowDriver, FlowHarness, HookCall, RecordingFunction
from miniproxy.verdict import CONTINUE, STOP, Chunk, Verdict

SERVER = NextHop(HostPort("198.51.100.1", 80))


def accessEvents(events: Any) -> list[dict[str, Any]]:
    """
    The access-log events among captured log events.
    """
    return [e for e in events if e.get("log_namespace") == "miniproxy.access"]


class FlowTestCase(unittest.TestCase):
    """
    Helpers to make a harness and to check how a flow ended.
    """

    def harness(self, *functions: Any, **kwargs: Any) -> FlowHarness:
        kwargs.setdefault("limits", Limits(idleTimeout=0))
        return FlowHarness(functions, **kwargs)

    def connected(self, *functions: Any, **kwargs: Any) -> tuple[FlowHarness, FlowDriver]:
        """
        A harness with one accepted flow whose outgoing leg is connected.
        """
        harness = self.harness(*functions, **kwargs)
        driver = harness.accept()
        driver.connectOutgoing()
        return harness, driver

    def assertClosed(
        self, harness: FlowHarness, driver: FlowDriver, outcome: Outcome
    ) -> None:
        """
        The flow is closed exactly once with C{outcome}, and the flow table
        forgot it.
        """
        self.assertEqual(harness.closedFlows.count(driver.flow), 1)
        assert driver.flow is not None
        self.assertIs(driver.flow.outcome, outcome)
        self.assertNotIn(driver.flow, harness.table.flows)
        self.assertEqual(harness.table.countFrom(driver.client.host), 0)


class RelayTests(FlowTestCase):
    """
    Bytes and half-closes pass between the legs.
    """

    def test_bothDirections(self) -> None:
        """
        Bytes from each side reach the other side, in order, and are
        counted.
        """
        harness, driver = self.connected()
        driver.clientSends(b"GET / HTTP/1.0\r\n")
        driver.clientSends(b"\r\n")
        driver.serverSends(b"HTTP/1.0 200 OK\r\n\r\n")
        driver.serverSends(b"body")
        self.assertEqual(driver.sentToServer(), b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(driver.sentToClient(), b"HTTP/1.0 200 OK\r\n\r\nbody")
        assert driver.flow is not None
        self.assertEqual(driver.flow.bytesFromClient, 18)
        self.assertEqual(driver.flow.bytesFromServer, 23)

    def test_halfCloses(self) -> None:
        """
        A FIN from the client becomes a FIN to the server; the server may
        still answer; its FIN becomes a FIN to the client, and the flow then
        closes with outcome OK.
        """
        harness, driver = self.connected()
        driver.clientSends(b"request")
        driver.clientHalfCloses()
        self.assertTrue(driver.finSentToServer)
        self.assertFalse(driver.finSentToClient)
        driver.serverSends(b"answer")
        self.assertEqual(driver.sentToClient(), b"answer")
        self.assertFalse(driver.closed)
        driver.serverHalfCloses()
        self.assertTrue(driver.finSentToClient)
        self.assertTrue(driver.clientLegClosed)
        self.assertTrue(driver.serverLegClosed)
        self.assertFalse(driver.clientLegReset or driver.serverLegReset)
        self.assertClosed(harness, driver, Outcome.OK)
        assert driver.flow is not None
        self.assertIsNone(driver.flow.reason)

    def test_serverHalfClosesFirst(self) -> None:
        """
        The server may end its direction first.
        """
        harness, driver = self.connected()
        driver.serverSends(b"banner")
        driver.serverHalfCloses()
        self.assertTrue(driver.finSentToClient)
        driver.clientSends(b"late")
        self.assertEqual(driver.sentToServer(), b"late")
        driver.clientHalfCloses()
        self.assertClosed(harness, driver, Outcome.OK)

    def test_closeWithoutHalfClose(self) -> None:
        """
        A leg that closes cleanly without a half-close first (as TLS does)
        ends its direction: the other leg gets a FIN, once.
        """
        calls: list[HookCall] = []
        harness, driver = self.connected(RecordingFunction("r", calls))
        driver.clientSends(b"x")
        driver.clientCloses()
        self.assertTrue(driver.finSentToServer)
        driver.serverHalfCloses()
        self.assertClosed(harness, driver, Outcome.OK)
        self.assertEqual(
            [c.hook for c in calls].count("clientHalfClosed"), 1
        )

    def test_times(self) -> None:
        """
        The flow's timestamps follow its life on the reactor's clock.
        """
        harness = self.harness()
        harness.advance(1)
        driver = harness.accept()
        harness.advance(0.5)
        driver.connectOutgoing()
        harness.advance(1)
        driver.clientSends(b"q")
        driver.serverSends(b"a")
        harness.advance(1)
        driver.clientHalfCloses()
        driver.serverHalfCloses()
        assert driver.flow is not None
        self.assertEqual(
            driver.flow.times.asDict(),
            {
                "synSeen": None,
                "accepted": 1.0,
                "outgoingStarted": 1.0,
                "outgoingConnected": 1.5,
                "firstByteFromClient": 2.5,
                "firstByteFromServer": 2.5,
                "clientHalfClosed": 3.5,
                "serverHalfClosed": 3.5,
                "closed": 3.5,
            },
        )

    def test_flowTimesStartEmpty(self) -> None:
        """
        Every timestamp of new L{FlowTimes} is L{None}.
        """
        self.assertEqual(set(FlowTimes().asDict().values()), {None})

    def test_slots(self) -> None:
        """
        A flow has no instance dictionary: it is all C{__slots__}.
        """
        harness = self.harness()
        driver = harness.accept()
        self.assertFalse(hasattr(driver.flow, "__dict__"))
        self.assertIs(driver.flow.reactor, harness.reactor)  # type: ignore[union-attr]

    def test_backpressure(self) -> None:
        """
        When the client does not read, the proxy stops reading from the
        server, and the other way round; reading resumes when it drains.
        """
        harness, driver = self.connected()
        driver.clientStopsReading()
        self.assertTrue(driver.serverLegPaused)
        self.assertFalse(driver.clientLegPaused)
        driver.serverSends(b"waits")
        self.assertEqual(driver.sentToClient(), b"")
        driver.clientResumesReading()
        self.assertFalse(driver.serverLegPaused)
        self.assertEqual(driver.sentToClient(), b"waits")
        driver.serverStopsReading()
        self.assertTrue(driver.clientLegPaused)
        driver.serverResumesReading()
        self.assertFalse(driver.clientLegPaused)

    def test_finWhileServerPaused(self) -> None:
        """
        A FIN from the client reaches the server even though the server's
        transport had paused the client leg (the FIN is read once reading
        resumes, after the bytes before it).
        """
        harness, driver = self.connected()
        driver.serverStopsReading()
        driver.clientSends(b"last")
        driver.clientHalfCloses()
        self.assertFalse(driver.finSentToServer)
        driver.serverResumesReading()
        self.assertEqual(driver.sentToServer(), b"last")
        self.assertTrue(driver.finSentToServer)


class CycleTests(FlowTestCase):
    """
    A closed flow lets go of its legs, which refer to it: it leaves no
    reference cycle, so that its objects are freed by their reference
    counts rather than by the garbage collector.
    """

    def test_closedFlowHoldsNoLeg(self) -> None:
        """
        Once closed, a flow refers to neither leg; its legs still know it.
        """
        harness, driver = self.connected()
        accepted, outgoing = driver.acceptedLeg, driver.outgoingLeg
        flow = driver.flow
        self.assertIn(accepted, gc.get_referents(flow))
        driver.clientHalfCloses()
        driver.serverHalfCloses()
        self.assertClosed(harness, driver, Outcome.OK)
        referents = gc.get_referents(flow)
        self.assertNotIn(accepted, referents)
        self.assertNotIn(outgoing, referents)
        self.assertIs(accepted.flow, flow)
        self.assertIs(outgoing.flow, flow)

    def test_resetFlowHoldsNoLeg(self) -> None:
        """
        A flow that ends with a reset lets go of its legs too.
        """
        harness, driver = self.connected()
        accepted, outgoing = driver.acceptedLeg, driver.outgoingLeg
        driver.serverResets()
        self.assertClosed(harness, driver, Outcome.RESET)
        referents = gc.get_referents(driver.flow)
        self.assertNotIn(accepted, referents)
        self.assertNotIn(outgoing, referents)


class EarlyBytesTests(FlowTestCase):
    """
    Bytes the client sends before the outgoing leg is connected.
    """

    def test_heldInOrder(self) -> None:
        """
        They are held, then written first and in order once connected.
        """
        harness = self.harness()
        driver = harness.accept()
        self.assertTrue(driver.connecting)
        for chunk in (b"one ", b"two ", b"three"):
            driver.clientSends(chunk)
        self.assertEqual(driver.sentToServer(), b"")
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), b"one two three")
        driver.clientSends(b" four")
        self.assertEqual(driver.sentToServer(), b"one two three four")

    def test_bounded(self) -> None:
        """
        Once C{limits.readSize} bytes are held, the accepted leg's
        transport is paused; what the client sends meanwhile stays with the
        client; after the connect reading resumes and every byte arrives in
        order.
        """
        limits = Limits(maxBuffer=4096, idleTimeout=0)
        self.assertEqual(limits.readSize, 2048)
        harness = self.harness(limits=limits)
        driver = harness.accept()
        assert driver.clientTransport is not None and driver.flow is not None
        self.assertEqual(driver.clientTransport.bufferSize, limits.readSize)
        driver.clientSends(b"a" * 2000)
        self.assertFalse(driver.clientLegPaused)
        driver.clientSends(b"b" * 100)
        self.assertTrue(driver.clientLegPaused)
        driver.clientSends(b"c" * 5000)
        self.assertEqual(driver.flow.bytesFromClient, 2100)
        self.assertEqual(driver.clientTransport.pendingFromPeer, 5000)
        driver.connectOutgoing()
        self.assertFalse(driver.clientLegPaused)
        self.assertEqual(driver.sentToServer(), b"a" * 2000 + b"b" * 100 + b"c" * 5000)
        assert driver.serverTransport is not None
        self.assertEqual(driver.serverTransport.bufferSize, limits.readSize)

    def test_finHeld(self) -> None:
        """
        A FIN from the client before the connect is sent after the held
        bytes.
        """
        harness = self.harness()
        driver = harness.accept()
        driver.clientSends(b"all")
        driver.clientHalfCloses()
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), b"all")
        self.assertTrue(driver.finSentToServer)

    def test_droppedOnFailure(self) -> None:
        """
        If the outgoing leg fails, the held bytes go nowhere.
        """
        harness = self.harness()
        driver = harness.accept()
        driver.clientSends(b"lost")
        driver.failOutgoing()
        self.assertIsNone(driver.serverTransport)
        self.assertClosed(harness, driver, Outcome.CONNECT_FAILED)


class ConnectModeTests(FlowTestCase):
    """
    When the outgoing leg starts, and C{flow.startedBy}.
    """

    def startedAtAccepted(self, mode: ConnectMode) -> tuple[FlowDriver, list[object]]:
        seen: list[object] = []

        def accepted(flow: Flow) -> Verdict:
            seen.append(flow.startedBy)
            return CONTINUE

        harness = self.harness(
            RecordingFunction(verdicts={"accepted": accepted}), mode=mode
        )
        return harness.accept(), seen

    def test_early(self) -> None:
        """
        In C{early} mode the outgoing leg starts at the early-SYN hook,
        before the accepted hooks run; without a SYN tap that moment is the
        accept.
        """
        driver, seen = self.startedAtAccepted(ConnectMode.EARLY)
        self.assertEqual(seen, [Moment.ACCEPT])
        self.assertEqual(driver.dialed, SERVER)
        assert driver.flow is not None
        self.assertIs(driver.flow.startedBy, Moment.ACCEPT)
        self.assertIs(driver.flow.mode, ConnectMode.EARLY)

    def test_accept(self) -> None:
        """
        In C{accept} mode it starts after the accepted hooks.
        """
        driver, seen = self.startedAtAccepted(ConnectMode.ACCEPT)
        self.assertEqual(seen, [None])
        self.assertTrue(driver.connecting)
        assert driver.flow is not None
        self.assertIs(driver.flow.startedBy, Moment.ACCEPT)

    def test_firstData(self) -> None:
        """
        In C{first-data} mode it starts when the first byte is to be sent
        upstream, and that byte is held until the connect.
        """
        harness = self.harness(mode=ConnectMode.FIRST_DATA)
        driver = harness.accept()
        self.assertIsNone(driver.dialed)
        assert driver.flow is not None
        self.assertIsNone(driver.flow.startedBy)
        harness.advance(2)
        driver.clientSends(b"GET")
        self.assertIs(driver.flow.startedBy, Moment.FIRST_DATA)
        self.assertEqual(driver.flow.times.outgoingStarted, 2.0)
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), b"GET")

    def test_firstDataTakenChunk(self) -> None:
        """
        In C{first-data} mode a chunk a function takes over does not start
        the outgoing leg: a function may read the request first.
        """
        harness = self.harness(
            RecordingFunction(verdicts={"dataFromClient": STOP}),
            mode=ConnectMode.FIRST_DATA,
        )
        driver = harness.accept()
        driver.clientSends(b"GET")
        self.assertIsNone(driver.dialed)

    def test_firstDataFinOnly(self) -> None:
        """
        In C{first-data} mode a client that sends nothing but a FIN still
        reaches the server (which may speak first), and the FIN is sent.
        """
        harness = self.harness(mode=ConnectMode.FIRST_DATA)
        driver = harness.accept()
        driver.clientHalfCloses()
        assert driver.flow is not None
        self.assertIs(driver.flow.startedBy, Moment.FIRST_DATA)
        driver.connectOutgoing()
        self.assertTrue(driver.finSentToServer)
        driver.serverSends(b"bye")
        driver.serverHalfCloses()
        self.assertEqual(driver.sentToClient(), b"bye")
        self.assertClosed(harness, driver, Outcome.OK)

    def test_firstDataWriteToServer(self) -> None:
        """
        In C{first-data} mode a function's C{writeToServer} starts the
        outgoing leg too.
        """

        def accepted(flow: Flow) -> Verdict:
            flow.writeToServer(b"HELLO ")
            return CONTINUE

        harness = self.harness(
            RecordingFunction(verdicts={"accepted": accepted}),
            mode=ConnectMode.FIRST_DATA,
        )
        driver = harness.accept()
        self.assertEqual(driver.dialed, SERVER)
        driver.clientSends(b"world")
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), b"HELLO world")

    def test_nextHopChosenAtEarlySyn(self) -> None:
        """
        A function may choose the next hop at the early-SYN hook.
        """
        other = NextHop.fromString("tcp:host=10.0.0.2:port=3128")

        def earlySyn(flow: Flow) -> Verdict:
            flow.nextHop = other
            return CONTINUE

        harness = self.harness(RecordingFunction(verdicts={"earlySyn": earlySyn}))
        driver = harness.accept()
        self.assertEqual(driver.dialed, other)


class HookTests(FlowTestCase):
    """
    The hooks run in order, with continue / stop semantics.
    """

    def test_order(self) -> None:
        """
        Every hook of every function runs in the configured order, at each
        step of the flow's life.
        """
        calls: list[HookCall] = []
        harness, driver = self.connected(
            RecordingFunction("a", calls), RecordingFunction("b", calls)
        )
        driver.clientSends(b"up")
        driver.serverSends(b"down")
        driver.clientHalfCloses()
        driver.serverHalfCloses()
        expected = []
        for hook, detail in [
            ("earlySyn", None),
            ("accepted", None),
            ("outgoingConnected", None),
            ("dataFromClient", b"up"),
            ("dataFromServer", b"down"),
            ("clientHalfClosed", None),
            ("serverHalfClosed", None),
            ("closed", None),
        ]:
            expected += [("a", hook, detail), ("b", hook, detail)]
        self.assertEqual(calls, expected)

    def test_noHandler(self) -> None:
        """
        A function whose factory gives no handler for a flow is not called.
        """

        class Nothing:
            name = "nothing"

            def handlerForFlow(self, flow: Flow) -> None:
                return None

        from zope.interface import directlyProvides

        from miniproxy.interfaces import IFlowHandlerFactory

        nothing = Nothing()
        directlyProvides(nothing, IFlowHandlerFactory)
        harness, driver = self.connected(nothing)
        driver.clientSends(b"x")
        self.assertEqual(driver.sentToServer(), b"x")

    def test_noDataHooksUnlessWanted(self) -> None:
        """
        When no function wants data, no data hook is called.
        """
        quiet = RecordingFunction(wantsData=False)
        harness, driver = self.connected(quiet)
        driver.clientSends(b"x")
        driver.serverSends(b"y")
        self.assertNotIn("dataFromClient", quiet.hooks())
        self.assertNotIn("dataFromServer", quiet.hooks())
        self.assertEqual(driver.sentToClient(), b"y")

    def test_lifecycleStopEndsChainOnly(self) -> None:
        """
        C{STOP} from a lifecycle hook ends the chain for that event only:
        the next function's hook is skipped, but the proxy still starts the
        outgoing leg and writes the held bytes.
        """
        calls: list[HookCall] = []
        harness = self.harness(
            RecordingFunction(
                "a", calls, {"earlySyn": STOP, "accepted": STOP, "outgoingConnected": STOP}
            ),
            RecordingFunction("b", calls),
        )
        driver = harness.accept()
        self.assertEqual(driver.dialed, SERVER)
        driver.clientSends(b"held")
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), b"held")
        self.assertFalse(driver.clientLegPaused)
        self.assertEqual(
            [c.function for c in calls if c.hook != "dataFromClient"], ["a", "a", "a"]
        )

    def test_replaceChunk(self) -> None:
        """
        A data hook may change the bytes; the next function sees the change.
        """
        calls: list[HookCall] = []

        def upper(flow: Flow, chunk: Chunk) -> Verdict:
            chunk.data = chunk.data.upper()
            return CONTINUE

        harness, driver = self.connected(
            RecordingFunction("upper", calls, {"dataFromServer": upper}),
            RecordingFunction("after", calls),
        )
        driver.serverSends(b"shout")
        self.assertEqual(driver.sentToClient(), b"SHOUT")
        self.assertIn(("after", "dataFromServer", b"SHOUT"), calls)

    def test_takeOverChunk(self) -> None:
        """
        C{STOP} from a data hook takes the chunk: it is not sent and the
        next function does not see it.
        """
        calls: list[HookCall] = []
        harness, driver = self.connected(
            RecordingFunction("taker", calls, {"dataFromClient": STOP}),
            RecordingFunction("after", calls),
        )
        driver.clientSends(b"secret")
        self.assertEqual(driver.sentToServer(), b"")
        self.assertNotIn("after", [c.function for c in calls if c.hook == "dataFromClient"])
        assert driver.flow is not None
        self.assertEqual(driver.flow.bytesFromClient, 6)

    def test_holdAndRelease(self) -> None:
        """
        A function may hold chunks and release them later with
        C{flow.writeToServer}, in order.
        """
        held: list[bytes] = []

        def hold(flow: Flow, chunk: Chunk) -> Verdict:
            held.append(chunk.data)
            if chunk.data.endswith(b"\n"):
                flow.writeToServer(b"".join(held))
                del held[:]
            return STOP

        harness, driver = self.connected(RecordingFunction(verdicts={"dataFromClient": hold}))
        driver.clientSends(b"par")
        driver.clientSends(b"tial")
        self.assertEqual(driver.sentToServer(), b"")
        driver.clientSends(b" line\n")
        self.assertEqual(driver.sentToServer(), b"partial line\n")

    def test_answer(self) -> None:
        """
        A function may answer the client itself with C{flow.writeToClient},
        before any outgoing leg.
        """

        def answer(flow: Flow, chunk: Chunk) -> Verdict:
            flow.writeToClient(b"cached:" + chunk.data)
            return STOP

        harness = self.harness(
            RecordingFunction(verdicts={"dataFromClient": answer}),
            mode=ConnectMode.FIRST_DATA,
        )
        driver = harness.accept()
        driver.clientSends(b"key")
        self.assertEqual(driver.sentToClient(), b"cached:key")
        self.assertIsNone(driver.dialed)

    def test_answerAndClose(self) -> None:
        """
        A function that answered may close the flow: the client leg closes
        cleanly, with no half-close hook run and outcome OK.
        """
        calls: list[HookCall] = []

        def answer(flow: Flow, chunk: Chunk) -> Verdict:
            flow.writeToClient(b"from cache")
            flow.close()
            return STOP

        harness = self.harness(
            RecordingFunction("cache", calls, {"dataFromClient": answer}),
            mode=ConnectMode.FIRST_DATA,
        )
        driver = harness.accept()
        driver.clientSends(b"GET")
        self.assertEqual(driver.sentToClient(), b"from cache")
        self.assertTrue(driver.clientLegClosed)
        self.assertFalse(driver.clientLegReset)
        self.assertClosed(harness, driver, Outcome.OK)
        self.assertNotIn("clientHalfClosed", [c.hook for c in calls])

    def test_closeWhileConnecting(self) -> None:
        """
        C{flow.close()} while the outgoing leg connects cancels it; that is
        no connection failure.
        """
        calls: list[HookCall] = []

        def close(flow: Flow, chunk: Chunk) -> Verdict:
            flow.close()
            return STOP

        harness = self.harness(RecordingFunction("c", calls, {"dataFromClient": close}))
        driver = harness.accept()
        driver.clientSends(b"x")
        assert driver.attempt is not None
        self.assertTrue(driver.attempt.cancelled)
        self.assertClosed(harness, driver, Outcome.OK)
        self.assertNotIn("outgoingFailed", [c.hook for c in calls])

    def test_stopOnHalfCloseKeepsFin(self) -> None:
        """
        C{STOP} from a half-close hook keeps the FIN until the function
        calls C{flow.halfCloseToServer()} (or C{halfCloseToClient()}).
        """
        flows: list[Flow] = []

        def keep(flow: Flow) -> Verdict:
            flows.append(flow)
            return STOP

        harness, driver = self.connected(
            RecordingFunction(
                verdicts={"clientHalfClosed": keep, "serverHalfClosed": keep}
            )
        )
        driver.clientHalfCloses()
        self.assertFalse(driver.finSentToServer)
        flows[0].writeToServer(b"trailer")
        flows[0].halfCloseToServer()
        flows[0].halfCloseToServer()
        # Called outside a step of the harness: let it deliver what follows.
        harness.flush()
        self.assertEqual(driver.sentToServer(), b"trailer")
        self.assertTrue(driver.finSentToServer)
        driver.serverHalfCloses()
        self.assertFalse(driver.finSentToClient)
        self.assertFalse(driver.closed)
        flows[1].halfCloseToClient()
        harness.flush()
        self.assertTrue(driver.finSentToClient)
        self.assertClosed(harness, driver, Outcome.OK)

    def test_closedHookSeesFinalOutcome(self) -> None:
        """
        The C{closed} hook runs once per flow, with the outcome final.
        """
        outcomes: list[object] = []

        def closed(flow: Flow) -> Verdict:
            outcomes.append((flow.outcome, flow.times.closed))
            return CONTINUE

        harness, driver = self.connected(RecordingFunction(verdicts={"closed": closed}))
        driver.clientResets()
        self.assertEqual(outcomes, [(Outcome.RESET, 0.0)])


class HookFailureTests(FlowTestCase):
    """
    A broken function aborts its flow, and only that flow.
    """

    def test_raisingAbortsOnlyThatFlow(self) -> None:
        """
        A hook that raises aborts its flow: both legs are reset, the reason
        names the function; other flows go on.
        """

        def picky(flow: Flow, chunk: Chunk) -> Verdict:
            if chunk.data == b"bad":
                raise ValueError("cannot parse")
            return CONTINUE

        harness = self.harness(RecordingFunction("picky", verdicts={"dataFromClient": picky}))
        good = harness.accept(client=HostPort("192.0.2.7", 1000))
        good.connectOutgoing()
        bad = harness.accept(client=HostPort("192.0.2.8", 1000))
        bad.connectOutgoing()
        with capturedLogs() as events:
            bad.clientSends(b"bad")
        self.assertTrue(bad.clientLegReset)
        self.assertTrue(bad.serverLegReset)
        self.assertClosed(harness, bad, Outcome.ABORTED)
        assert bad.flow is not None and bad.flow.reason is not None
        self.assertIn("'picky'", bad.flow.reason)
        self.assertIn("dataFromClient", bad.flow.reason)
        self.assertEqual(len(self.flushLoggedErrors(HookFailed)), 1)
        self.assertTrue([e for e in events if "log_failure" in e])
        good.clientSends(b"good")
        self.assertEqual(good.sentToServer(), b"good")
        assert good.flow is not None
        self.assertIsNone(good.flow.outcome)
        self.assertEqual(len(harness.table.flows), 1)

    def test_notAVerdictAborts(self) -> None:
        """
        A hook returning something other than a verdict aborts the flow.
        """
        harness, driver = self.connected(RecordingFunction("sloppy", verdicts={"dataFromServer": None}))
        driver.serverSends(b"x")
        self.assertEqual(driver.sentToClient(), b"")
        self.assertClosed(harness, driver, Outcome.ABORTED)
        self.assertEqual(len(self.flushLoggedErrors()), 1)

    def test_earlySynRaises(self) -> None:
        """
        A failure at the early-SYN hook aborts the flow before any outgoing
        leg: the accepted leg is reset and the accepted hooks never run.
        """

        def boom(flow: Flow) -> Verdict:
            raise RuntimeError("broken")

        recorder = RecordingFunction("r", verdicts={"earlySyn": boom})
        harness = self.harness(recorder)
        driver = harness.accept()
        self.assertIsNone(driver.dialed)
        self.assertTrue(driver.clientLegReset)
        self.assertClosed(harness, driver, Outcome.ABORTED)
        self.assertNotIn("accepted", recorder.hooks())
        self.assertEqual(len(self.flushLoggedErrors(HookFailed)), 1)

    def test_acceptedRaisesWhileConnecting(self) -> None:
        """
        A failure at the accepted hook cancels the outgoing leg being
        connected.
        """

        def boom(flow: Flow) -> Verdict:
            raise RuntimeError("broken")

        harness = self.harness(RecordingFunction(verdicts={"accepted": boom}))
        driver = harness.accept()
        assert driver.attempt is not None
        self.assertTrue(driver.attempt.cancelled)
        self.assertClosed(harness, driver, Outcome.ABORTED)
        self.flushLoggedErrors(HookFailed)

    def test_outgoingFailedRaises(self) -> None:
        """
        A failure in the C{outgoingFailed} hook is logged; the flow still
        ends as a failed connection.
        """

        def boom(flow: Flow, reason: str) -> Verdict:
            raise RuntimeError("broken")

        harness = self.harness(RecordingFunction(verdicts={"outgoingFailed": boom}))
        driver = harness.accept()
        driver.failOutgoing()
        self.assertClosed(harness, driver, Outcome.CONNECT_FAILED)
        self.assertTrue(driver.clientLegClosed)
        self.assertEqual(len(self.flushLoggedErrors(HookFailed)), 1)

    def test_closedRaises(self) -> None:
        """
        A failure in the C{closed} hook is logged; the flow is still
        forgotten and logged.
        """

        def boom(flow: Flow) -> Verdict:
            raise RuntimeError("broken")

        harness, driver = self.connected(RecordingFunction(verdicts={"closed": boom}))
        with capturedLogs() as events:
            driver.clientResets()
        self.assertClosed(harness, driver, Outcome.RESET)
        self.assertEqual(len(accessEvents(events)), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ConnectFailureTests(FlowTestCase):
    """
    The outgoing leg fails to connect, or takes too long.
    """

    def test_refused(self) -> None:
        """
        A refused connection closes the client leg (cleanly) and records
        the outcome and the reason; the C{outgoingFailed} hooks see it.
        """
        recorder = RecordingFunction()
        harness = self.harness(recorder)
        driver = harness.accept()
        driver.failOutgoing(error.ConnectionRefusedError())
        self.assertTrue(driver.clientLegClosed)
        self.assertFalse(driver.clientLegReset)
        self.assertClosed(harness, driver, Outcome.CONNECT_FAILED)
        assert driver.flow is not None
        self.assertEqual(driver.flow.reason, "tcp:198.51.100.1:80: connection refused")
        self.assertIn(HookCall("recorder", "outgoingFailed", "connection refused"), recorder.calls)

    def test_timeout(self) -> None:
        """
        A connection not made within C{limits.connectTimeout} ends the flow
        as a connect timeout.
        """
        harness = self.harness(limits=Limits(connectTimeout=5, idleTimeout=0))
        driver = harness.accept()
        harness.advance(4.9)
        self.assertTrue(driver.connecting)
        harness.advance(0.1)
        self.assertFalse(driver.connecting)
        self.assertClosed(harness, driver, Outcome.CONNECT_TIMEOUT)
        assert driver.flow is not None
        self.assertEqual(driver.flow.reason, "tcp:198.51.100.1:80: connect timed out")
        self.assertTrue(driver.clientLegClosed)

    def test_answerOnFailure(self) -> None:
        """
        A function may answer the client from C{outgoingFailed}; the client
        leg is closed after those bytes.
        """

        def answer(flow: Flow, reason: str) -> Verdict:
            flow.writeToClient(f"502 {reason}".encode())
            return CONTINUE

        harness = self.harness(RecordingFunction(verdicts={"outgoingFailed": answer}))
        driver = harness.accept()
        driver.failOutgoing()
        self.assertEqual(driver.sentToClient(), b"502 connection refused")
        self.assertTrue(driver.clientLegClosed)
        self.assertClosed(harness, driver, Outcome.CONNECT_FAILED)

    def test_describeFailure(self) -> None:
        """
        Failures are described in a few words.
        """
        for exception, text in [
            (error.ConnectionRefusedError(), "connection refused"),
            (error.TimeoutError(), "connect timed out"),
            (error.ConnectionLost(), "connection reset"),
            (error.ConnectionAborted(), "connection aborted"),
            (error.DNSLookupError("nx.invalid"), "DNS lookup failed: "),
            (OSError(113, "No route to host"), "No route to host"),
            (ValueError(), "ValueError"),
        ]:
            self.assertIn(text, describeFailure(Failure(exception)))


class ResetTests(FlowTestCase):
    """
    A reset on one leg resets the other.
    """

    def test_clientResets(self) -> None:
        """
        A reset from the client resets the server leg.
        """
        harness, driver = self.connected()
        driver.clientResets()
        self.assertTrue(driver.serverLegReset)
        self.assertClosed(harness, driver, Outcome.RESET)
        assert driver.flow is not None
        self.assertEqual(driver.flow.reason, "client: connection reset")

    def test_serverResets(self) -> None:
        """
        A reset from the server resets the client leg.
        """
        harness, driver = self.connected()
        driver.serverResets()
        self.assertTrue(driver.clientLegReset)
        self.assertClosed(harness, driver, Outcome.RESET)
        assert driver.flow is not None
        self.assertEqual(driver.flow.reason, "server: connection reset")

    def test_resetWhileConnecting(self) -> None:
        """
        A client reset while the outgoing leg connects cancels it.
        """
        harness = self.harness()
        driver = harness.accept()
        driver.clientResets()
        assert driver.attempt is not None
        self.assertTrue(driver.attempt.cancelled)
        self.assertClosed(harness, driver, Outcome.RESET)

    def test_undeliverable(self) -> None:
        """
        Bytes from the client after the server's connection is gone are
        undeliverable: the client is reset, as the kernel would.
        """
        harness, driver = self.connected()
        driver.serverCloses()
        self.assertTrue(driver.finSentToClient)
        driver.clientSends(b"too late")
        self.assertTrue(driver.clientLegReset)
        self.assertClosed(harness, driver, Outcome.RESET)

    def test_abort(self) -> None:
        """
        C{flow.abort} resets both legs and records the reason.
        """
        harness, driver = self.connected()
        assert driver.flow is not None
        driver.flow.abort("enough")
        harness.flush()
        self.assertTrue(driver.clientLegReset and driver.serverLegReset)
        self.assertClosed(harness, driver, Outcome.ABORTED)
        self.assertEqual(driver.flow.reason, "enough")
        driver.flow.writeToServer(b"ignored")
        driver.flow.writeToClient(b"ignored")
        self.assertEqual(driver.sentToServer() + driver.sentToClient(), b"")


class IdleTimeoutTests(FlowTestCase):
    """
    A flow that passes no byte for the idle timeout is reset.
    """

    def test_idle(self) -> None:
        """
        Traffic postpones the timeout; silence for C{idleTimeout} seconds
        resets both legs.
        """
        harness, driver = self.connected(limits=Limits(idleTimeout=10))
        harness.advance(6)
        driver.clientSends(b"still here")
        harness.advance(6)
        self.assertFalse(driver.closed)
        harness.advance(3.9)
        self.assertFalse(driver.closed)
        harness.advance(0.1)
        self.assertTrue(driver.clientLegReset and driver.serverLegReset)
        self.assertClosed(harness, driver, Outcome.IDLE_TIMEOUT)
        assert driver.flow is not None
        self.assertEqual(driver.flow.reason, "no traffic for 10s")
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_cancelledOnClose(self) -> None:
        """
        A flow that closes leaves no delayed call behind.
        """
        harness, driver = self.connected(limits=Limits(idleTimeout=10))
        self.assertEqual(len(harness.reactor.getDelayedCalls()), 1)
        driver.clientHalfCloses()
        driver.serverHalfCloses()
        self.assertClosed(harness, driver, Outcome.OK)
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_disabled(self) -> None:
        """
        An idle timeout of 0 schedules nothing.
        """
        harness, driver = self.connected(limits=Limits(idleTimeout=0))
        self.assertEqual(harness.reactor.getDelayedCalls(), [])
        harness.advance(10**6)
        self.assertFalse(driver.closed)


class OpenRelayTests(FlowTestCase):
    """
    A destination the operator did not configure is only relayed when a
    policy allowed it.
    """

    def test_transparentRefused(self) -> None:
        """
        A transparent flow without a policy decision is refused: nothing is
        dialed and the client leg is closed.
        """
        harness = self.harness(to=None, transparent=True)
        driver = harness.accept(local=HostPort("203.0.113.9", 443))
        assert driver.flow is not None
        self.assertIs(driver.flow.destinationSource, DestinationSource.TRANSPARENT)
        self.assertEqual(driver.flow.destination, HostPort("203.0.113.9", 443))
        self.assertIsNone(driver.dialed)
        self.assertTrue(driver.clientLegClosed)
        self.assertClosed(harness, driver, Outcome.REFUSED)
        self.assertEqual(
            driver.flow.reason,
            "transparent destination 203.0.113.9:443 not allowed by policy",
        )

    def test_transparentAllowed(self) -> None:
        """
        A transparent flow a function allowed goes to its original
        destination.
        """

        def allow(flow: Flow) -> Verdict:
            flow.allow()
            return CONTINUE

        harness = self.harness(
            RecordingFunction(verdicts={"earlySyn": allow}), to=None, transparent=True
        )
        driver = harness.accept(local=HostPort("203.0.113.9", 443))
        self.assertEqual(driver.dialed, NextHop(HostPort("203.0.113.9", 443)))
        assert driver.flow is not None
        self.assertTrue(driver.flow.allowed)

    def test_explicitRefused(self) -> None:
        """
        A destination a function read from the flow (explicit) is refused
        unless allowed, even with a next hop chosen.
        """

        def explicit(flow: Flow) -> Verdict:
            flow.destination = HostPort("10.1.2.3", 22)
            flow.destinationSource = DestinationSource.EXPLICIT
            flow.nextHop = NextHop(flow.destination)
            return CONTINUE

        harness = self.harness(RecordingFunction(verdicts={"earlySyn": explicit}), to=None)
        driver = harness.accept()
        self.assertIsNone(driver.dialed)
        self.assertClosed(harness, driver, Outcome.REFUSED)

    def test_noDestination(self) -> None:
        """
        A listener with no destination at all refuses its flows.
        """
        harness = self.harness(to=None)
        driver = harness.accept()
        self.assertClosed(harness, driver, Outcome.REFUSED)
        assert driver.flow is not None
        self.assertIn("no destination", driver.flow.reason or "")

    def test_static(self) -> None:
        """
        The operator's static destination needs no policy.
        """
        harness = self.harness()
        driver = harness.accept()
        assert driver.flow is not None
        self.assertIs(driver.flow.destinationSource, DestinationSource.STATIC)
        self.assertFalse(driver.flow.allowed)
        self.assertEqual(driver.dialed, SERVER)

    def test_policyFunction(self) -> None:
        """
        The policy function allows what its rules allow and refuses the
        rest, at the early-SYN hook.
        """
        rules = policy.configure(
            {"rules": [{"action": "allow", "destinations": ["203.0.113.0/24"], "ports": [443]}]},
            None,
        )
        harness = self.harness(rules, to=None, transparent=True)
        allowed = harness.accept(local=HostPort("203.0.113.9", 443))
        denied = harness.accept(
            client=HostPort("192.0.2.2", 1), local=HostPort("203.0.113.9", 22)
        )
        self.assertEqual(allowed.dialed, NextHop(HostPort("203.0.113.9", 443)))
        self.assertIsNone(denied.dialed)
        self.assertClosed(harness, denied, Outcome.REFUSED)
        assert denied.flow is not None
        self.assertEqual(denied.flow.reason, "denied by policy (the default)")


class RefusalTests(FlowTestCase):
    """
    A function refuses a flow.
    """

    def refuser(self, hook: str) -> RecordingFunction:
        def refuse(flow: Flow, *args: object) -> Verdict:
            flow.refuse("not today")
            return STOP

        return RecordingFunction("refuser", verdicts={hook: refuse})

    def test_atEarlySyn(self) -> None:
        """
        Refused at the early-SYN hook: nothing is dialed, the later hooks
        do not run, the client leg is closed (not reset).
        """
        calls: list[HookCall] = []
        harness = self.harness(self.refuser("earlySyn"), RecordingFunction("after", calls))
        driver = harness.accept()
        self.assertIsNone(driver.dialed)
        self.assertTrue(driver.clientLegClosed)
        self.assertFalse(driver.clientLegReset)
        self.assertClosed(harness, driver, Outcome.REFUSED)
        assert driver.flow is not None
        self.assertEqual(driver.flow.reason, "not today")
        self.assertEqual(calls, [("after", "closed", None)])

    def test_whileConnecting(self) -> None:
        """
        Refused at the accepted hook in C{early} mode: the connection under
        way is cancelled.
        """
        harness = self.harness(self.refuser("accepted"))
        driver = harness.accept()
        assert driver.attempt is not None
        self.assertTrue(driver.attempt.cancelled)
        self.assertClosed(harness, driver, Outcome.REFUSED)

    def test_afterConnected(self) -> None:
        """
        Refused once connected: the outgoing leg is reset, the client leg
        closed.
        """
        harness = self.harness(self.refuser("dataFromClient"))
        driver = harness.accept()
        driver.connectOutgoing()
        driver.clientSends(b"x")
        self.assertEqual(driver.sentToServer(), b"")
        self.assertTrue(driver.serverLegReset)
        self.assertTrue(driver.clientLegClosed)
        self.assertClosed(harness, driver, Outcome.REFUSED)


class FlowTableTests(FlowTestCase):
    """
    The flows a listener has open, per source and in total.
    """

    def test_countsGoBackToZero(self) -> None:
        """
        The table counts open flows per source, and forgets each one as it
        closes, however it ends.
        """
        harness = self.harness()
        a1 = harness.accept(client=HostPort("192.0.2.1", 1))
        a2 = harness.accept(client=HostPort("192.0.2.1", 2))
        b = harness.accept(client=HostPort("192.0.2.2", 1))
        self.assertEqual(harness.table.countFrom("192.0.2.1"), 2)
        self.assertEqual(harness.table.countFrom("192.0.2.2"), 1)
        self.assertEqual(len(harness.table.flows), 3)
        a1.connectOutgoing()
        a1.clientHalfCloses()
        a1.serverHalfCloses()
        a2.failOutgoing()
        self.assertEqual(harness.table.countFrom("192.0.2.1"), 0)
        b.clientResets()
        self.assertEqual(harness.table.countFrom("192.0.2.2"), 0)
        self.assertEqual(harness.table.flows, set())
        self.assertEqual(len(harness.closedFlows), 3)

    def test_limitPerSource(self) -> None:
        """
        Over C{maxFlowsPerSource} the listener refuses the connection at
        accept, and logs it; another source is still admitted.
        """
        harness = self.harness(limits=Limits(maxFlowsPerSource=1, idleTimeout=0))
        first = harness.accept()
        with capturedLogs() as events:
            second = harness.accept()
        self.assertTrue(second.refusedAtAccept)
        self.assertIsNone(second.flow)
        self.assertEqual(harness.table.refused, 1)
        refused = [e for e in events if e.get("outcome") == "refused"]
        self.assertEqual(len(refused), 1)
        self.assertIn("too many flows from 192.0.2.1", formatEvent(refused[0]))
        other = harness.accept(client=HostPort("192.0.2.99", 5))
        self.assertFalse(other.refusedAtAccept)
        first.clientResets()
        self.assertFalse(harness.accept().refusedAtAccept)

    def test_limitTotal(self) -> None:
        """
        Over C{maxFlows} every new connection is refused at accept.
        """
        harness = self.harness(limits=Limits(maxFlows=2, idleTimeout=0))
        harness.accept(client=HostPort("192.0.2.1", 1))
        harness.accept(client=HostPort("192.0.2.2", 1))
        self.assertTrue(harness.accept(client=HostPort("192.0.2.3", 1)).refusedAtAccept)


class AccessLogTests(FlowTestCase):
    """
    One access-log line per flow.
    """

    def test_oneLinePerFlow(self) -> None:
        """
        A flow that ends writes one access-log event with its fields.
        """
        with capturedLogs() as events:
            harness = self.harness()
            driver = harness.accept()
            harness.advance(0.25)
            driver.connectOutgoing()
            driver.clientSends(b"12345")
            harness.advance(0.5)
            driver.serverSends(b"abc")
            driver.clientHalfCloses()
            driver.serverHalfCloses()
            harness.advance(5)
        [event] = accessEvents(events)
        self.assertEqual(event["client"], "192.0.2.1:40000")
        self.assertEqual(event["destination"], "198.51.100.1:80")
        self.assertEqual(event["nextHop"], "tcp:198.51.100.1:80")
        self.assertEqual(event["mode"], "early")
        self.assertEqual(event["startedBy"], "accept")
        self.assertEqual(event["bytesFromClient"], 5)
        self.assertEqual(event["bytesFromServer"], 3)
        self.assertEqual(event["outcome"], "ok")
        self.assertIsNone(event["reason"])
        self.assertEqual(event["connectMs"], "250.0ms")
        self.assertEqual(event["ttfbMs"], "750.0ms")
        self.assertEqual(event["durationMs"], "750.0ms")
        text = formatEvent(event)
        self.assertIn("192.0.2.1:40000 -> 198.51.100.1:80", text)
        self.assertIn("outcome=ok", text)
        self.assertNotIn("reason=", text)

    def test_line(self) -> None:
        """
        The event's text is its C{line}: the access-log format filled in
        with the event's own fields, formatted once, when the flow ended.
        """
        from miniproxy.accesslog import _FORMAT, LINE_FORMAT

        with capturedLogs() as events:
            harness = self.harness()
            driver = harness.accept()
            driver.connectOutgoing()
            driver.clientSends(b"up")
            driver.serverResets()
        [event] = accessEvents(events)
        self.assertEqual(event["log_format"], LINE_FORMAT)
        self.assertEqual(event["line"], _FORMAT.format(**event))
        self.assertEqual(formatEvent(event), event["line"])
        self.assertIn(" up=2 down=0 outcome=reset reason='server: ", event["line"])

    def test_refusedFlow(self) -> None:
        """
        A refused flow is logged once too, with its reason.
        """
        with capturedLogs() as events:
            harness = self.harness(to=None, transparent=True)
            driver = harness.accept()
        [event] = accessEvents(events)
        self.assertEqual(event["outcome"], "refused")
        self.assertEqual(event["startedBy"], "-")
        self.assertEqual(event["nextHop"], "-")
        self.assertEqual(event["durationMs"], "0.0ms")
        self.assertIn("reason='transparent destination", formatEvent(event))
        self.assertTrue(driver.closed)

    def test_eachOutcomeOnce(self) -> None:
        """
        However flows end, each writes exactly one line.
        """
        with capturedLogs() as events:
            harness = self.harness(limits=Limits(idleTimeout=30))
            ok = harness.accept(client=HostPort("192.0.2.1", 1))
            ok.connectOutgoing()
            ok.clientHalfCloses()
            ok.serverHalfCloses()
            failed = harness.accept(client=HostPort("192.0.2.1", 2))
            failed.failOutgoing()
            reset = harness.accept(client=HostPort("192.0.2.1", 3))
            reset.connectOutgoing()
            reset.serverResets()
            idle = harness.accept(client=HostPort("192.0.2.1", 4))
            idle.connectOutgoing()
            harness.advance(30)
        outcomes = sorted(e["outcome"] for e in accessEvents(events))
        self.assertEqual(outcomes, ["connect-failed", "idle-timeout", "ok", "reset"])
        self.assertEqual(len(harness.closedFlows), 4)


class SynTests(FlowTestCase):
    """
    A flow begun at its SYN, before the client's handshake completes.
    """

    def test_earlyConnect(self) -> None:
        """
        In C{early} mode the outgoing leg starts at the SYN; the accepted
        hooks run at the accept.
        """
        recorder = RecordingFunction()
        harness = self.harness(recorder)
        harness.advance(1)
        driver = harness.syn()
        assert driver.flow is not None
        self.assertEqual(driver.flow.times.synSeen, 1.0)
        self.assertIsNone(driver.flow.times.accepted)
        self.assertIs(driver.flow.startedBy, Moment.SYN)
        self.assertEqual(driver.dialed, SERVER)
        self.assertEqual(recorder.hooks(), ["earlySyn"])
        self.assertIn(driver.flow, harness.table.flows)
        harness.advance(0.5)
        driver.connectOutgoing()
        harness.advance(0.5)
        driver.handshakeCompletes()
        self.assertEqual(driver.flow.times.accepted, 2.0)
        self.assertEqual(recorder.hooks(), ["earlySyn", "outgoingConnected", "accepted"])
        driver.clientSends(b"up")
        driver.serverSends(b"down")
        self.assertEqual((driver.sentToServer(), driver.sentToClient()), (b"up", b"down"))
        driver.clientHalfCloses()
        driver.serverHalfCloses()
        self.assertClosed(harness, driver, Outcome.OK)

    def test_serverSpeaksFirst(self) -> None:
        """
        What the server sends before the accept (a banner) is held, within
        the buffer bound: past it the outgoing leg is paused until the
        accept delivers everything, in order.
        """
        harness = self.harness(limits=Limits(maxBuffer=4096, idleTimeout=0))
        driver = harness.syn()
        driver.connectOutgoing()
        driver.serverSends(b"220 " + b"x" * 2000)
        self.assertFalse(driver.serverLegPaused)
        driver.serverSends(b"y" * 100)
        self.assertTrue(driver.serverLegPaused)
        driver.serverSends(b"z" * 3000)
        assert driver.serverTransport is not None
        self.assertEqual(driver.serverTransport.pendingFromPeer, 3000)
        driver.handshakeCompletes()
        self.assertFalse(driver.serverLegPaused)
        self.assertEqual(driver.sentToClient(), b"220 " + b"x" * 2000 + b"y" * 100 + b"z" * 3000)

    def test_pairedAtAccept(self) -> None:
        """
        The legs are paired at the accept: backpressure works both ways.
        """
        harness = self.harness()
        driver = harness.syn()
        driver.connectOutgoing()
        driver.handshakeCompletes()
        driver.clientStopsReading()
        self.assertTrue(driver.serverLegPaused)
        driver.clientResumesReading()
        driver.serverStopsReading()
        self.assertTrue(driver.clientLegPaused)

    def test_serverFinBeforeAccept(self) -> None:
        """
        A FIN from the server before the accept is sent to the client after
        the bytes before it.
        """
        harness = self.harness()
        driver = harness.syn()
        driver.connectOutgoing()
        driver.serverSends(b"bye")
        driver.serverHalfCloses()
        self.assertFalse(driver.closed)
        driver.handshakeCompletes()
        self.assertEqual(driver.sentToClient(), b"bye")
        self.assertTrue(driver.finSentToClient)
        driver.clientHalfCloses()
        self.assertClosed(harness, driver, Outcome.OK)

    def test_refusedAtSyn(self) -> None:
        """
        A flow refused at its SYN is closed at once (and logged with its
        SYN time); its accepted leg is closed when it comes.
        """
        with capturedLogs() as events:
            harness = self.harness(to=None, transparent=True)
            driver = harness.syn()
            self.assertTrue(driver.closed)
            driver.handshakeCompletes()
        self.assertTrue(driver.clientLegClosed)
        self.assertClosed(harness, driver, Outcome.REFUSED)
        [event] = accessEvents(events)
        self.assertEqual(event["durationMs"], "0.0ms")

    def test_failedBeforeAccept(self) -> None:
        """
        An outgoing leg that fails before the accept ends the flow; an
        answer a function wrote is lost with the client leg never there.
        """
        harness = self.harness()
        driver = harness.syn()
        driver.failOutgoing()
        self.assertClosed(harness, driver, Outcome.CONNECT_FAILED)
        driver.handshakeCompletes()
        self.assertTrue(driver.clientLegClosed)
        self.assertEqual(harness.closedFlows.count(driver.flow), 1)

    def test_acceptMode(self) -> None:
        """
        In C{accept} mode a flow begun at its SYN still waits for the
        accept to start its outgoing leg.
        """
        harness = self.harness(mode=ConnectMode.ACCEPT)
        driver = harness.syn()
        self.assertIsNone(driver.dialed)
        driver.handshakeCompletes()
        assert driver.flow is not None
        self.assertIs(driver.flow.startedBy, Moment.ACCEPT)

    def test_misuse(self) -> None:
        """
        Only a flow begun at its SYN completes a handshake, once.
        """
        harness = self.harness()
        self.assertRaises(RuntimeError, harness.accept().handshakeCompletes)
        driver = harness.syn()
        self.assertRaises(RuntimeError, driver.clientSends, b"x")
        driver.handshakeCompletes()
        self.assertRaises(RuntimeError, driver.handshakeCompletes)

    def test_closedAtSyn(self) -> None:
        """
        A flow a function closes at its SYN ends cleanly at once; its
        accepted leg is closed when it comes, and the flow is not started
        again.
        """

        def close(flow: Flow) -> Verdict:
            flow.close()
            return CONTINUE

        harness = self.harness(RecordingFunction(verdicts={"earlySyn": close}))
        driver = harness.syn()
        self.assertIsNone(driver.dialed)
        self.assertTrue(driver.closed)
        driver.handshakeCompletes()
        self.assertTrue(driver.clientLegClosed)
        self.assertIsNone(driver.dialed)
        self.assertClosed(harness, driver, Outcome.OK)

    def test_finFromFunctionWaitsForMode(self) -> None:
        """
        In C{accept} mode, a FIN a function sends to the server at the SYN
        waits for the outgoing leg the accept starts; it does not start one
        itself.
        """

        def fin(flow: Flow) -> Verdict:
            flow.halfCloseToServer()
            return CONTINUE

        harness = self.harness(
            RecordingFunction(verdicts={"earlySyn": fin}), mode=ConnectMode.ACCEPT
        )
        driver = harness.syn()
        self.assertIsNone(driver.dialed)
        driver.handshakeCompletes()
        assert driver.flow is not None
        self.assertIs(driver.flow.startedBy, Moment.ACCEPT)
        driver.connectOutgoing()
        self.assertTrue(driver.finSentToServer)


class _WatchedFlow:
    """
    What L{IdleTimers} uses of a flow: its idle timeout, its last activity,
    its entry, and being timed out.
    """

    def __init__(self, timers: Any, clock: Any, idle: float) -> None:
        from types import SimpleNamespace

        self._context = SimpleNamespace(limits=SimpleNamespace(idleTimeout=idle))
        self._lastActivity = clock.seconds()
        self._clock = clock
        self.timedOut: float | None = None
        self._idleCall = timers.watch(self, clock.seconds() + idle)

    def active(self) -> None:
        self._lastActivity = self._clock.seconds()

    def _idleTimedOut(self, idle: float) -> None:
        self.timedOut = self._clock.seconds()


class IdleTimersTests(unittest.TestCase):
    """
    L{IdleTimers} times out many flows with one delayed call, exactly when
    each has been idle for its timeout.
    """

    @given(
        st.lists(
            st.tuples(
                st.sampled_from([1.0, 2.5, 10.0]),
                st.lists(st.integers(1, 60).map(lambda n: n / 4), max_size=6),
            ),
            min_size=1,
            max_size=12,
        )
    )
    def test_exact(self, flows: list[tuple[float, list[float]]]) -> None:
        """
        Each flow is timed out at its last activity plus its timeout, the
        last activity being the last one before that; one delayed call
        runs at a time, and none once every flow timed out.
        """
        clock = Clock()
        timers = IdleTimers(clock)
        watched = []
        events: list[tuple[float, int]] = []
        for i, (idle, activity) in enumerate(flows):
            watched.append(_WatchedFlow(timers, clock, idle))
            at = 0.0
            for gap in activity:
                at += gap
                events.append((at, i))
        expected = []
        for i, (idle, activity) in enumerate(flows):
            last, at = 0.0, 0.0
            for gap in activity:
                at += gap
                if at - last >= idle:
                    break
                last = at
            expected.append(last + idle)
        # Every time is a multiple of 1/4 s: step through them all, so that
        # each delayed call runs at its own time.
        byStep: dict[int, list[int]] = {}
        for at, i in events:
            byStep.setdefault(round(at * 4), []).append(i)
        for step in range(1, round(max(expected) * 4) + 2):
            clock.advance(0.25)
            self.assertLessEqual(len(clock.getDelayedCalls()), 1)
            for i in byStep.get(step, []):
                if watched[i].timedOut is None:
                    watched[i].active()
        self.assertEqual([f.timedOut for f in watched], expected)
        self.assertEqual(timers.watched, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_forget(self) -> None:
        """
        Forgotten flows are never timed out; once every flow is forgotten
        no delayed call is left; many forgotten entries are swept out.
        """
        clock = Clock()
        timers = IdleTimers(clock)
        flows = [_WatchedFlow(timers, clock, 10.0) for _ in range(200)]
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        for flow in flows[:150]:
            timers.forget(flow._idleCall)
        self.assertLess(len(timers._heap), 200)
        clock.advance(10)
        self.assertEqual([f.timedOut for f in flows[:150]], [None] * 150)
        self.assertEqual({f.timedOut for f in flows[150:]}, {10.0})
        flow = _WatchedFlow(timers, clock, 5.0)
        timers.forget(flow._idleCall)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_sharedByFlows(self) -> None:
        """
        The flows of one harness share one delayed call for their idle
        timeouts.
        """
        harness = FlowHarness(functions=(), limits=Limits(idleTimeout=10), to=SERVER)
        drivers = [harness.accept(client=HostPort("192.0.2.1", 1000 + i)) for i in range(5)]
        for driver in drivers:
            driver.connectOutgoing()
        self.assertEqual(len(harness.reactor.getDelayedCalls()), 1)
        harness.advance(5)
        drivers[0].clientSends(b"x")
        harness.advance(5)
        self.assertEqual(sum(1 for d in drivers if d.closed), 4)
        self.assertFalse(drivers[0].closed)
        harness.advance(4.9)
        self.assertFalse(drivers[0].closed)
        harness.advance(0.1)
        self.assertTrue(drivers[0].closed)
        self.assertEqual(harness.reactor.getDelayedCalls(), [])
