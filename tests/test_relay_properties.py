"""
Property tests of the relay: whatever the chunking, the interleaving of
the two directions, the moment of each half-close, the connect mode, the
buffer bound and the backpressure, bytes arrive exactly and in order and
the flow ends cleanly.

They drive the real flow and legs through L{miniproxy.testing}; no real
time passes.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from miniproxy.flow import ConnectMode, Flow, Outcome
from miniproxy.functions.base import FlowHandler, HandlerFactory
from miniproxy.limits import Limits
from miniproxy.testing import FlowDriver, FlowHarness, RecordingFunction
from miniproxy.verdict import CONTINUE, STOP, Chunk, Verdict



def stream(sizes: list[int], seed: int) -> list[bytes]:
    """
    Chunks of the given sizes of one stream whose every byte depends on
    its position, so that a lost, repeated or reordered chunk shows.
    """
    out = []
    offset = 0
    for size in sizes:
        out.append(bytes((seed + 7 * i) % 251 for i in range(offset, offset + size)))
        offset += size
    return out


#: A stream's chunks: sizes spread up to beyond the smallest buffer bound,
#: so that early bytes often fill it.
chunks = st.builds(
    stream, st.lists(st.integers(1, 3000), max_size=8), st.integers(0, 250)
)
modes = st.sampled_from(list(ConnectMode))
maxBuffers = st.sampled_from([2048, 4096, 16384])

#: The most times one run pauses or resumes a side's reading.
MAX_TOGGLES = 8


class Rechunker(FlowHandler):
    """
    Takes every chunk over and sends the bytes on in pieces of its own
    size; what is left goes out at the FIN, before it.
    """

    __slots__ = ("size", "up", "down")
    wantsData = True

    def __init__(self, size: int) -> None:
        self.size = size
        self.up = b""
        self.down = b""

    def _release(self, held: bytes, write: Any) -> bytes:
        while len(held) >= self.size:
            write(held[: self.size])
            held = held[self.size :]
        return held

    def dataFromClient(self, flow: Flow, chunk: Chunk) -> Verdict:
        self.up = self._release(self.up + chunk.data, flow.writeToServer)
        return STOP

    def dataFromServer(self, flow: Flow, chunk: Chunk) -> Verdict:
        self.down = self._release(self.down + chunk.data, flow.writeToClient)
        return STOP

    def clientHalfClosed(self, flow: Flow) -> Verdict:
        flow.writeToServer(self.up)
        self.up = b""
        return CONTINUE

    def serverHalfClosed(self, flow: Flow) -> Verdict:
        flow.writeToClient(self.down)
        self.down = b""
        return CONTINUE


def functionsFor(kind: str, size: int) -> list[Any]:
    """
    The functions of a run: none, one that looks at every chunk, or one
    that re-chunks everything itself.
    """
    if kind == "none":
        return []
    if kind == "passthrough":
        return [RecordingFunction()]
    return [HandlerFactory("rechunker", lambda flow: Rechunker(size))]


def pick(data: st.DataObject, possible: list[str]) -> str:
    """
    Draw one of C{possible}.  A wide integer taken modulo spreads the
    choices far better than C{sampled_from} does, which hypothesis keeps
    near the first option.
    """
    return possible[data.draw(st.integers(0, 2**16)) % len(possible)]


class Run:
    """
    One run: a client and a server each sending their chunks then a FIN,
    with the steps interleaved as the test draws them.
    """

    def __init__(
        self, driver: FlowDriver, up: list[bytes], down: list[bytes], atSyn: bool = False
    ) -> None:
        self.driver = driver
        self.awaitingHandshake = atSyn
        self.up = list(up)
        self.down = list(down)
        self.clientEnded = False
        self.serverEnded = False
        self.toggles = 0
        self.clientReading = True
        self.serverReading = True

    def steps(self) -> list[str]:
        """
        What may happen next.
        """
        driver = self.driver
        possible = []
        if self.awaitingHandshake:
            possible.append("handshake")
        elif self.up:
            possible.append("clientSends")
        elif not self.clientEnded:
            possible.append("clientHalfCloses")
        if driver.connecting:
            possible.append("connect")
        if driver.serverTransport is not None:
            if self.down:
                possible.append("serverSends")
            elif not self.serverEnded:
                possible.append("serverHalfCloses")
            if self.toggles < MAX_TOGGLES and not self.awaitingHandshake:
                possible += ["toggleClientReading", "toggleServerReading"]
        return possible

    def do(self, step: str) -> None:
        driver = self.driver
        if step == "handshake":
            self.awaitingHandshake = False
            driver.handshakeCompletes()
        elif step == "clientSends":
            driver.clientSends(self.up.pop(0))
        elif step == "clientHalfCloses":
            self.clientEnded = True
            driver.clientHalfCloses()
        elif step == "connect":
            driver.connectOutgoing()
        elif step == "serverSends":
            driver.serverSends(self.down.pop(0))
        elif step == "serverHalfCloses":
            self.serverEnded = True
            driver.serverHalfCloses()
        elif step == "toggleClientReading":
            self.toggles += 1
            self.clientReading = not self.clientReading
            if self.clientReading:
                driver.clientResumesReading()
            else:
                driver.clientStopsReading()
        elif step == "toggleServerReading":
            self.toggles += 1
            self.serverReading = not self.serverReading
            if self.serverReading:
                driver.serverResumesReading()
            else:
                driver.serverStopsReading()

    def readAgain(self) -> None:
        """
        Both peers read again.
        """
        if not self.clientReading:
            self.clientReading = True
            self.driver.clientResumesReading()
        if not self.serverReading:
            self.serverReading = True
            self.driver.serverResumesReading()


class RelayPropertyTests(unittest.TestCase):
    """
    Properties of the relay.
    """

    def harness(self, mode: ConnectMode, maxBuffer: int, functions: list[Any]) -> FlowHarness:
        return FlowHarness(
            functions, mode=mode, limits=Limits(maxBuffer=maxBuffer, idleTimeout=0)
        )

    @settings(max_examples=200)
    @given(
        up=chunks,
        down=chunks,
        mode=modes,
        maxBuffer=maxBuffers,
        functions=st.sampled_from(["none", "passthrough", "rechunk"]),
        rechunkSize=st.integers(1, 5000),
        atSyn=st.booleans(),
        data=st.data(),
    )
    def test_exactAndInOrder(
        self,
        up: list[bytes],
        down: list[bytes],
        mode: ConnectMode,
        maxBuffer: int,
        functions: str,
        rechunkSize: int,
        atSyn: bool,
        data: st.DataObject,
    ) -> None:
        """
        Bytes from each side arrive byte-exact and in order at the other
        side, followed by a FIN, and once both directions ended both legs
        close cleanly with outcome OK; whether the flow began at its SYN
        (the server may then speak, and end, before the accept) or at the
        accept.
        """
        harness = self.harness(mode, maxBuffer, functionsFor(functions, rechunkSize))
        driver = harness.syn() if atSyn else harness.accept()
        run = Run(driver, up, down, atSyn)
        while True:
            possible = run.steps()
            if not possible:
                break
            run.do(pick(data, possible))
        run.readAgain()
        flow = driver.flow
        assert flow is not None and driver.clientTransport and driver.serverTransport
        self.assertEqual(driver.sentToServer(), b"".join(up))
        self.assertEqual(driver.sentToClient(), b"".join(down))
        self.assertEqual(flow.bytesFromClient, len(b"".join(up)))
        self.assertEqual(flow.bytesFromServer, len(b"".join(down)))
        self.assertTrue(driver.finSentToServer and driver.finSentToClient)
        self.assertEqual(driver.clientTransport.droppedWrites, [])
        self.assertEqual(driver.serverTransport.droppedWrites, [])
        self.assertTrue(driver.clientLegClosed and driver.serverLegClosed)
        self.assertFalse(driver.clientLegReset or driver.serverLegReset)
        self.assertIs(flow.outcome, Outcome.OK)
        self.assertEqual(harness.closedFlows, [flow])
        self.assertEqual(harness.table.flows, set())
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    @given(
        up=chunks,
        down=chunks,
        mode=modes,
        maxBuffer=maxBuffers,
        resetter=st.sampled_from(["client", "server"]),
        data=st.data(),
    )
    def test_resetAnywhere(
        self,
        up: list[bytes],
        down: list[bytes],
        mode: ConnectMode,
        maxBuffer: int,
        resetter: str,
        data: st.DataObject,
    ) -> None:
        """
        A reset at any point resets the other leg too; what arrived on each
        side before is a prefix of what was sent, and the flow is closed
        once as reset.
        """
        harness = self.harness(mode, maxBuffer, [])
        driver = harness.accept()
        run = Run(driver, up, down)
        steps = data.draw(st.integers(0, len(up) + len(down) + 4))
        for _ in range(steps):
            possible = run.steps()
            if not possible:
                break
            run.do(pick(data, possible))
        if resetter == "server" and driver.serverTransport is None:
            if not driver.connecting:
                # Nothing was dialed (first-data mode, nothing sent): the
                # client is the one to reset.
                resetter = "client"
            else:
                driver.connectOutgoing()
        flow = driver.flow
        assert flow is not None
        if flow.outcome is not None:
            # Both directions already ended: nothing left to reset.
            self.assertIs(flow.outcome, Outcome.OK)
            return
        if resetter == "client":
            driver.clientResets()
        else:
            driver.serverResets()
        self.assertTrue(b"".join(up).startswith(driver.sentToServer()))
        self.assertTrue(b"".join(down).startswith(driver.sentToClient()))
        self.assertIs(flow.outcome, Outcome.RESET)
        self.assertTrue(flow.reason and flow.reason.startswith(resetter))
        other = driver.clientLegReset if resetter == "server" else driver.serverLegReset
        if resetter == "server" or driver.serverTransport is not None:
            self.assertTrue(other)
        self.assertEqual(harness.closedFlows, [flow])
        self.assertEqual(harness.table.flows, set())
        self.assertEqual(harness.reactor.getDelayedCalls(), [])
