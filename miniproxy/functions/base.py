# -*- test-case-name: tests.test_functions_base -*-
"""
The pieces a proxy function is made of: a handler base class whose hooks all
continue, and a lazy plugin object for dropin modules.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.plugin import IPlugin
from twisted.python.reflect import namedAny
from zope.interface import implementer

from miniproxy.interfaces import IFlowHandler, IFlowHandlerFactory, IProxyFunction
from miniproxy.verdict import CONTINUE, Chunk, Verdict


@implementer(IFlowHandler)
class FlowHandler:
    """
    A handler whose every hook returns C{CONTINUE}.  Subclass it and
    override the hooks you need.

    @cvar wantsData: Set it to L{True} in a subclass whose data hooks must
        run; left L{False}, the relay never calls them.
    """

    __slots__ = ()
    wantsData = False

    def earlySyn(self, flow: Any) -> Verdict:
        """
        See L{IFlowHandler.earlySyn}.
        """
        return CONTINUE

    def accepted(self, flow: Any) -> Verdict:
        """
        See L{IFlowHandler.accepted}.
        """
        return CONTINUE

    def outgoingConnected(self, flow: Any) -> Verdict:
        """
        See L{IFlowHandler.outgoingConnected}.
        """
        return CONTINUE

    def outgoingFailed(self, flow: Any, reason: str) -> Verdict:
        """
        See L{IFlowHandler.outgoingFailed}.
        """
        return CONTINUE

    def dataFromClient(self, flow: Any, chunk: Chunk) -> Verdict:
        """
        See L{IFlowHandler.dataFromClient}.
        """
        return CONTINUE

    def dataFromServer(self, flow: Any, chunk: Chunk) -> Verdict:
        """
        See L{IFlowHandler.dataFromServer}.
        """
        return CONTINUE

    def clientHalfClosed(self, flow: Any) -> Verdict:
        """
        See L{IFlowHandler.clientHalfClosed}.
        """
        return CONTINUE

    def serverHalfClosed(self, flow: Any) -> Verdict:
        """
        See L{IFlowHandler.serverHalfClosed}.
        """
        return CONTINUE

    def closed(self, flow: Any) -> Verdict:
        """
        See L{IFlowHandler.closed}.
        """
        return CONTINUE


@implementer(IFlowHandlerFactory)
class HandlerFactory:
    """
    An L{IFlowHandlerFactory} that calls a handler class (or any callable
    taking the flow) for each flow.

    @ivar name: The function's name.
    """

    def __init__(self, name: str, makeHandler: Callable[[Any], Any]) -> None:
        self.name = name
        self._makeHandler = makeHandler

    def handlerForFlow(self, flow: Any) -> Any:
        """
        See L{IFlowHandlerFactory.handlerForFlow}.
        """
        return self._makeHandler(flow)


@implementer(IPlugin, IProxyFunction)
class FunctionMaker:
    """
    A proxy function plugin that imports its implementation only when it is
    configured, as L{twisted.application.service.ServiceMaker} does for
    twistd plugins.  Dropin modules hold one of these and nothing else.

    @ivar name: The function's name.
    @ivar module: The fully qualified name of the module implementing it.
    @ivar description: One line saying what it does.
    @ivar entryPoint: The name, in C{module}, of a callable C{(settings,
        reactor) -> IFlowHandlerFactory}.
    """

    def __init__(
        self, name: str, module: str, description: str, entryPoint: str = "configure"
    ) -> None:
        self.name = name
        self.module = module
        self.description = description
        self.entryPoint = entryPoint

    def __repr__(self) -> str:
        return f"<FunctionMaker {self.name!r} from {self.module}>"

    def configure(self, settings: dict, reactor: Any) -> IFlowHandlerFactory:
        """
        See L{IProxyFunction.configure}.
        """
        return namedAny(f"{self.module}.{self.entryPoint}")(settings, reactor)
