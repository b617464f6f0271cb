# -*- test-case-name: tests.test_chain -*-
"""
Running the functions' hooks in order, with continue / stop semantics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from twisted.logger import Logger

from miniproxy.verdict import CONTINUE, STOP, Chunk, Verdict

if TYPE_CHECKING:
    from miniproxy.interfaces import IFlow, IFlowHandler

_log = Logger(namespace="miniproxy.chain")


class HookFailed(Exception):
    """
    A function's hook raised an exception or returned something that is not
    a L{Verdict}.  The flow is aborted; the service goes on.
    """


class HandlerChain:
    """
    The handlers of one flow, in the configured order of functions.

    @ivar handlers: The C{(functionName, handler)} pairs.
    @ivar wantsData: Whether any handler wants the data hooks called.
    """

    __slots__ = ("handlers", "wantsData")

    def __init__(self, handlers: Sequence[tuple[str, IFlowHandler]]) -> None:
        self.handlers = tuple(handlers)
        self.wantsData = any(
            getattr(handler, "wantsData", True) for _, handler in self.handlers
        )

    def run(self, hook: str, flow: IFlow, *args: object) -> Verdict:
        """
        Call C{hook} on each handler in order until one returns C{STOP}.

        @raise HookFailed: If a hook raised or returned a non-verdict; the
            original exception is chained.
        """
        for name, handler in self.handlers:
            try:
                verdict = getattr(handler, hook)(flow, *args)
            except Exception as e:
                raise HookFailed(f"function {name!r} raised in {hook}: {e!r}") from e
            if verdict is STOP:
                return STOP
            if verdict is not CONTINUE:
                raise HookFailed(
                    f"function {name!r} returned {verdict!r} from {hook}, "
                    f"not CONTINUE or STOP"
                )
        return CONTINUE

    def runData(self, hook: str, flow: IFlow, data: bytes) -> bytes | None:
        """
        Pass a chunk through the data hooks of the handlers that want data.

        @return: The bytes to send on, or L{None} if a handler took the
            chunk over.
        @raise HookFailed: As L{run}.
        """
        chunk = Chunk(data)
        for name, handler in self.handlers:
            if not getattr(handler, "wantsData", True):
                continue
            try:
                verdict = getattr(handler, hook)(flow, chunk)
            except Exception as e:
                raise HookFailed(f"function {name!r} raised in {hook}: {e!r}") from e
            if verdict is STOP:
                return None
            if verdict is not CONTINUE:
                raise HookFailed(
                    f"function {name!r} returned {verdict!r} from {hook}, "
                    f"not CONTINUE or STOP"
                )
            if not isinstance(chunk.data, bytes):
                raise HookFailed(
                    f"function {name!r} set chunk.data to "
                    f"{type(chunk.data).__name__}, not bytes"
                )
        return chunk.data

    def runClosed(self, flow: IFlow) -> None:
        """
        Call every handler's C{closed} hook, whatever each returns or
        raises; failures are logged.
        """
        for name, handler in self.handlers:
            try:
                handler.closed(flow)
            except Exception:
                _log.failure(
                    "function {function!r} raised in closed", function=name
                )
