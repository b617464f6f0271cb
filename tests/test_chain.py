"""
Tests for L{miniproxy.chain} and L{miniproxy.verdict}.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import capturedLogs
from twisted.trial import unittest

from miniproxy.chain import HandlerChain, HookFailed
from miniproxy.testing import HookCall, RecordingFunction
from miniproxy.verdict import CONTINUE, STOP, Chunk, Verdict

FLOW = object()


def chainOf(*functions: RecordingFunction) -> HandlerChain:
    """
    A chain of one handler of each recording function, in order.
    """
    return HandlerChain(
        [(f.name, f.handlerForFlow(FLOW)) for f in functions]  # type: ignore[arg-type]
    )


class VerdictTests(unittest.TestCase):
    """
    Tests for L{Verdict} and L{Chunk}.
    """

    def test_constants(self) -> None:
        """
        C{CONTINUE} and C{STOP} are the two members of L{Verdict}.
        """
        self.assertEqual(set(Verdict), {CONTINUE, STOP})
        self.assertIsNot(CONTINUE, STOP)

    def test_chunk(self) -> None:
        """
        A L{Chunk} holds replaceable bytes and shows them in its repr.
        """
        chunk = Chunk(b"abc")
        chunk.data = b"xyz"
        self.assertEqual(chunk.data, b"xyz")
        self.assertEqual(repr(chunk), "Chunk(b'xyz')")


class RunTests(unittest.TestCase):
    """
    Tests for L{HandlerChain.run}.
    """

    def test_order(self) -> None:
        """
        Every handler's hook is called, in the configured order, and the
        chain continues.
        """
        calls: list[HookCall] = []
        chain = chainOf(
            RecordingFunction("a", calls),
            RecordingFunction("b", calls),
            RecordingFunction("c", calls),
        )
        self.assertIs(chain.run("accepted", FLOW), CONTINUE)  # type: ignore[arg-type]
        self.assertEqual(
            calls, [("a", "accepted", None), ("b", "accepted", None), ("c", "accepted", None)]
        )

    def test_stop(self) -> None:
        """
        A C{STOP} ends the chain: later handlers are not called.
        """
        calls: list[HookCall] = []
        chain = chainOf(
            RecordingFunction("a", calls),
            RecordingFunction("b", calls, {"clientHalfClosed": STOP}),
            RecordingFunction("c", calls),
        )
        self.assertIs(chain.run("clientHalfClosed", FLOW), STOP)  # type: ignore[arg-type]
        self.assertEqual([c.function for c in calls], ["a", "b"])

    def test_arguments(self) -> None:
        """
        Extra arguments are passed on to the hook.
        """
        calls: list[HookCall] = []
        chain = chainOf(RecordingFunction("a", calls))
        chain.run("outgoingFailed", FLOW, "connection refused")  # type: ignore[arg-type]
        self.assertEqual(calls, [("a", "outgoingFailed", "connection refused")])

    def test_raises(self) -> None:
        """
        A hook that raises makes L{HookFailed} naming the function and the
        hook, chained to the original exception; later handlers are not
        called.
        """
        calls: list[HookCall] = []

        def boom(flow: Any) -> Verdict:
            raise ZeroDivisionError("boom")

        chain = chainOf(
            RecordingFunction("bad", calls, {"earlySyn": boom}),
            RecordingFunction("later", calls),
        )
        e = self.assertRaises(HookFailed, chain.run, "earlySyn", FLOW)
        self.assertIn("'bad'", str(e))
        self.assertIn("earlySyn", str(e))
        self.assertIsInstance(e.__cause__, ZeroDivisionError)
        self.assertEqual([c.function for c in calls], ["bad"])

    def test_notAVerdict(self) -> None:
        """
        A hook that returns something other than C{CONTINUE} or C{STOP}
        (such as L{None}, a forgotten return) makes L{HookFailed}.
        """
        for bad in (None, True, "continue", Verdict.CONTINUE.value):
            chain = chainOf(RecordingFunction("sloppy", verdicts={"accepted": bad}))
            e = self.assertRaises(HookFailed, chain.run, "accepted", FLOW)
            self.assertIn(repr(bad), str(e))
            self.assertIn("'sloppy'", str(e))

    def test_missingHook(self) -> None:
        """
        A handler without the hook fails like one that raised.
        """

        class Partial:
            wantsData = False

        chain = HandlerChain([("partial", Partial())])  # type: ignore[list-item]
        e = self.assertRaises(HookFailed, chain.run, "accepted", FLOW)
        self.assertIsInstance(e.__cause__, AttributeError)

    def test_empty(self) -> None:
        """
        An empty chain continues and wants no data.
        """
        chain = HandlerChain(())
        self.assertIs(chain.run("accepted", FLOW), CONTINUE)  # type: ignore[arg-type]
        self.assertFalse(chain.wantsData)


class RunDataTests(unittest.TestCase):
    """
    Tests for L{HandlerChain.runData} and L{HandlerChain.wantsData}.
    """

    def test_wantsData(self) -> None:
        """
        The chain wants data when any handler does; a handler without the
        attribute is taken to want data.
        """
        self.assertFalse(chainOf(RecordingFunction(wantsData=False)).wantsData)
        self.assertTrue(
            chainOf(
                RecordingFunction("a", wantsData=False), RecordingFunction("b")
            ).wantsData
        )

        class Bare:
            pass

        self.assertTrue(HandlerChain([("bare", Bare())]).wantsData)  # type: ignore[list-item]

    def test_skipsHandlersNotWantingData(self) -> None:
        """
        Handlers that want no data are not called.
        """
        calls: list[HookCall] = []
        chain = chainOf(
            RecordingFunction("quiet", calls, wantsData=False),
            RecordingFunction("nosy", calls),
        )
        self.assertEqual(chain.runData("dataFromClient", FLOW, b"x"), b"x")  # type: ignore[arg-type]
        self.assertEqual(calls, [("nosy", "dataFromClient", b"x")])

    def test_stop(self) -> None:
        """
        A C{STOP} takes the chunk: L{None} is returned and later handlers
        do not see it.
        """
        calls: list[HookCall] = []
        chain = chainOf(
            RecordingFunction("taker", calls, {"dataFromServer": STOP}),
            RecordingFunction("later", calls),
        )
        self.assertIsNone(chain.runData("dataFromServer", FLOW, b"x"))  # type: ignore[arg-type]
        self.assertEqual(calls, [("taker", "dataFromServer", b"x")])

    def test_notBytes(self) -> None:
        """
        A handler that replaces the chunk's data with something other than
        bytes makes L{HookFailed}.
        """

        def text(flow: Any, chunk: Chunk) -> Verdict:
            chunk.data = "text"  # type: ignore[assignment]
            return CONTINUE

        chain = chainOf(RecordingFunction("texter", verdicts={"dataFromClient": text}))
        e = self.assertRaises(HookFailed, chain.runData, "dataFromClient", FLOW, b"x")
        self.assertIn("'texter'", str(e))
        self.assertIn("str", str(e))

    def test_raisesAndBadVerdicts(self) -> None:
        """
        Data hooks fail as lifecycle hooks do.
        """

        def boom(flow: Any, chunk: Chunk) -> Verdict:
            raise ValueError("bad chunk")

        chain = chainOf(RecordingFunction("bad", verdicts={"dataFromClient": boom}))
        e = self.assertRaises(HookFailed, chain.runData, "dataFromClient", FLOW, b"x")
        self.assertIsInstance(e.__cause__, ValueError)
        chain = chainOf(RecordingFunction("bad", verdicts={"dataFromClient": None}))
        self.assertRaises(HookFailed, chain.runData, "dataFromClient", FLOW, b"x")

    @given(
        st.binary(max_size=64),
        st.lists(
            st.one_of(
                st.tuples(st.just("append"), st.binary(max_size=8)),
                st.tuples(st.just("upper"), st.none()),
                st.tuples(st.just("drop"), st.integers(0, 8)),
                st.tuples(st.just("pass"), st.none()),
            ),
            max_size=6,
        ),
    )
    def test_transformsCompose(self, data: bytes, steps: list[tuple[str, Any]]) -> None:
        """
        Each handler sees the bytes as the handlers before it left them;
        the chain returns what the last one left.
        """

        def transform(kind: str, arg: Any, chunk: bytes) -> bytes:
            if kind == "append":
                return chunk + arg
            if kind == "upper":
                return chunk.upper()
            if kind == "drop":
                return chunk[arg:]
            return chunk

        def handlerFor(kind: str, arg: Any) -> Any:
            def hook(flow: Any, chunk: Chunk) -> Verdict:
                chunk.data = transform(kind, arg, chunk.data)
                return CONTINUE

            return hook

        calls: list[HookCall] = []
        functions = [
            RecordingFunction(f"f{i}", calls, {"dataFromClient": handlerFor(kind, arg)})
            for i, (kind, arg) in enumerate(steps)
        ]
        expected = data
        seen = []
        for kind, arg in steps:
            seen.append(expected)
            expected = transform(kind, arg, expected)
        out = chainOf(*functions).runData("dataFromClient", FLOW, data)  # type: ignore[arg-type]
        self.assertEqual(out, expected)
        self.assertEqual([c.detail for c in calls], seen)


class RunClosedTests(unittest.TestCase):
    """
    Tests for L{HandlerChain.runClosed}.
    """

    def test_everyHandler(self) -> None:
        """
        Every handler's C{closed} hook runs, whatever the others return or
        raise; a failure is logged with the function's name.
        """
        calls: list[HookCall] = []

        def boom(flow: Any) -> Verdict:
            raise ZeroDivisionError()

        chain = chainOf(
            RecordingFunction("a", calls, {"closed": STOP}),
            RecordingFunction("b", calls, {"closed": boom}),
            RecordingFunction("c", calls),
        )
        with capturedLogs() as events:
            chain.runClosed(FLOW)  # type: ignore[arg-type]
        self.assertEqual([c.function for c in calls], ["a", "b", "c"])
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual(failures[0]["function"], "b")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
