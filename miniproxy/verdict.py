# -*- test-case-name: tests.test_chain -*-
"""
What a hook returns, and the chunk a data hook sees.
"""

from __future__ import annotations

from enum import Enum


class Verdict(Enum):
    """
    A hook's answer: whether the chain of functions goes on.

    @cvar CONTINUE: The next function's hook runs; after the last one the
        proxy takes its default action (send the bytes, propagate the FIN,
        start the outgoing leg).
    @cvar STOP: The chain ends here for this event.  For data and half-close
        events the handler has taken the event over: the proxy does not send
        the chunk, or does not propagate the FIN.  For the lifecycle events
        (early SYN, accepted, outgoing connected) only the later functions'
        hooks are skipped: the proxy still takes its next step (starting the
        outgoing leg, writing held bytes); refuse or abort the flow to stop
        it.
    """

    CONTINUE = "continue"
    STOP = "stop"


CONTINUE = Verdict.CONTINUE
STOP = Verdict.STOP


class Chunk:
    """
    Bytes passing through the data hooks.

    @ivar data: The bytes.  A handler may replace them.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Chunk({self.data!r})"
