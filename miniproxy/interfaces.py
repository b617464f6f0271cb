# -*- test-case-name: tests.test_interfaces -*-
"""
Interfaces of miniproxy.

A proxied connection is a L{IFlow}: a pair of legs, the accepted leg facing
the client (or the previous proxy) and the outgoing leg facing the server (or
the next proxy).  Proxy functions are plugins providing L{IProxyFunction};
once configured they give each flow an L{IFlowHandler} whose hooks run, in
the configured order, at every step of the flow's life.

Every hook returns a L{miniproxy.verdict.Verdict}: C{CONTINUE} lets the next
function's hook run and the proxy take its default action; C{STOP} ends the
chain for this event, and, for data and half-close events, tells the proxy
that the handler has taken the event over (see each hook).  For the
lifecycle events (early SYN, accepted, outgoing connected) C{STOP} only
skips the later functions' hooks: the proxy still takes its next step; a
handler that wants the flow stopped refuses or aborts it.  The model is
Envoy's network filters (C{Continue} / C{StopIteration}) together with
mitmproxy's C{server_connect} hook.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IFlow(Interface):
    """
    One proxied connection, as the proxy functions see it.

    A flow is created when the proxy first learns of the connection: at the
    client's SYN when a SYN tap is running, otherwise when the kernel hands
    over the accepted socket.  It never exposes a socket: everything a
    function may do to the connection goes through this interface.
    """

    client = Attribute(
        "L{miniproxy.address.HostPort}: the client's (or previous hop's) "
        "address and port."
    )
    local = Attribute(
        "L{miniproxy.address.HostPort}: the address and port the client "
        "connected to.  For a transparent listener this is the original "
        "destination."
    )
    destination = Attribute(
        "L{miniproxy.address.HostPort} or L{None}: the flow's final "
        "destination, once known."
    )
    destinationSource = Attribute(
        "L{miniproxy.address.DestinationSource}: where C{destination} came "
        "from: the operator's static configuration, the transparent "
        "listener's original destination, or an explicit header carried by "
        "the flow.  Only a static destination is trusted without a policy "
        "decision."
    )
    nextHop = Attribute(
        "L{miniproxy.address.NextHop} or L{None}: what the outgoing leg "
        "connects to.  Functions may set it at the early-SYN hook (and, in "
        "C{first-data} mode, until the first byte is sent upstream)."
    )
    chain = Attribute(
        "L{tuple} of L{miniproxy.address.NextHop}: the explicit proxies the "
        "flow is to cross after C{nextHop}, in order (empty by default)."
    )
    mode = Attribute(
        "L{miniproxy.flow.ConnectMode}: the listener's connect mode."
    )
    startedBy = Attribute(
        "L{miniproxy.flow.Moment} or L{None}: the moment that started the "
        "outgoing leg (SYN, accept or first data)."
    )
    times = Attribute("L{miniproxy.flow.FlowTimes}: the flow's timestamps.")
    bytesFromClient = Attribute("L{int}: bytes received on the accepted leg.")
    bytesFromServer = Attribute("L{int}: bytes received on the outgoing leg.")
    outcome = Attribute(
        "L{miniproxy.flow.Outcome} or L{None} while the flow is open."
    )
    reason = Attribute(
        "L{str} or L{None}: why the flow failed or was refused."
    )
    allowed = Attribute(
        "L{bool}: whether a policy decision allowed a non-static destination."
        "  Set it with L{allow}."
    )
    origin = Attribute(
        "L{miniproxy.address.HostPort} or L{None}: the original client, when "
        "an explicit carrier named it (the source of a PROXY v2 header: "
        "C{client} is then the proxy that sent the header)."
    )
    proxyHeader = Attribute(
        "L{miniproxy.wire.proxyv2.ProxyHeader} or L{None}: the PROXY v2 "
        "header the flow began with, on a listener that reads them, with "
        "its TLVs (C{proxyHeader.tlvs}, C{proxyHeader.tlv(kind)}).  Set "
        "before the early-SYN hooks run."
    )

    def allow() -> None:
        """
        Record that policy allows this flow's destination.

        A flow whose destination was not configured statically by the
        operator (a transparent or explicit destination) is refused when its
        outgoing leg is about to start unless some function called this.
        That is how miniproxy stays a closed relay by default.
        """

    def refuse(reason: str) -> None:
        """
        Refuse the flow: no outgoing leg is started (or the one under way is
        aborted) and the accepted leg is closed.

        @param reason: Why, for the access log.
        """

    def writeToClient(data: bytes) -> None:
        """
        Send bytes to the client on the accepted leg, after every function.

        This is how a function answers a request itself, or releases bytes
        from the server that it held.
        """

    def writeToServer(data: bytes) -> None:
        """
        Send bytes to the server on the outgoing leg, after every function.

        Bytes written before the outgoing leg is connected are held, in
        order, within the flow's buffer bound.  In C{first-data} mode the
        first call starts the outgoing leg.
        """

    def halfCloseToClient() -> None:
        """
        Shut down the accepted leg's write side (send a FIN to the client)
        once what is buffered for it has been written.
        """

    def halfCloseToServer() -> None:
        """
        Shut down the outgoing leg's write side (send a FIN to the server)
        once what is buffered for it has been written.
        """

    def close() -> None:
        """
        Close both legs cleanly, after writing what is buffered.
        """

    def abort(reason: str) -> None:
        """
        Reset both legs at once, discarding what is buffered.

        @param reason: Why, for the access log.
        """

    def wantsDataChanged() -> None:
        """
        A handler's C{wantsData} changed: read every handler's again.

        This is how a function starts (or stops) looking at the bytes in
        the middle of a flow.  Set the handler's C{wantsData} (an instance
        attribute) and call this: from the next byte the proxy reads on,
        the data hooks of the handlers that want data see every byte, in
        order.  A flow whose handlers want no data may relay its bytes
        without them entering the proxy's memory (C{splice(2)}, see
        L{miniproxy.splice}); bytes already taken off one leg that way are
        written on to the other first, without the hooks, exactly once.
        Once no handler wants data any more, the flow may go back to that
        path.
        """


class IFlowHandler(Interface):
    """
    The hooks one proxy function runs for one flow.

    Hooks are called in the configured order of functions.  Each returns a
    L{miniproxy.verdict.Verdict}.  A hook must not raise: an exception is
    logged and the flow is aborted, so a broken function never takes the
    service down.  L{miniproxy.functions.base.FlowHandler} implements every
    hook as C{CONTINUE}; subclass it and override what you need.
    """

    wantsData = Attribute(
        "L{bool}: whether L{dataFromClient} and L{dataFromServer} are to be "
        "called.  When no handler of a flow wants data, the relay passes "
        "bytes without calling any hook (and, between two plain TCP legs, "
        "without copying them into userspace).  It is read when the flow "
        "begins; a handler that changes it later calls "
        "L{IFlow.wantsDataChanged}."
    )

    def earlySyn(flow: IFlow) -> object:
        """
        The flow is known but its handshake with the client may not be
        complete: this is the earliest moment, at the client's SYN when a SYN
        tap runs and otherwise at accept.

        The handler may set C{flow.nextHop}, call C{flow.allow()}, or call
        C{flow.refuse(reason)}.  In C{early} connect mode the outgoing leg
        starts as soon as every handler has run.

        @return: C{CONTINUE} or C{STOP}.
        """

    def accepted(flow: IFlow) -> object:
        """
        The kernel handed over the accepted leg: the client's handshake is
        complete.

        @return: C{CONTINUE} or C{STOP}.
        """

    def outgoingConnected(flow: IFlow) -> object:
        """
        The outgoing leg is connected; bytes held for it are about to be
        written.

        @return: C{CONTINUE} or C{STOP}.
        """

    def outgoingFailed(flow: IFlow, reason: str) -> object:
        """
        The outgoing leg could not be connected (refused, unreachable,
        timed out).  The accepted leg is closed after every handler ran,
        unless a handler answered the client itself with
        C{flow.writeToClient} first (the close then comes after those bytes).

        @param reason: A human-readable description of the failure.
        @return: C{CONTINUE} or C{STOP}.
        """

    def dataFromClient(flow: IFlow, chunk: object) -> object:
        """
        Bytes arrived from the client.

        C{chunk} is a L{miniproxy.verdict.Chunk}; its C{data} attribute holds
        the bytes.  The handler may replace C{chunk.data} (change the bytes)
        and return C{CONTINUE}, or return C{STOP} to take the chunk over:
        the following functions do not see it and the proxy does not send
        it.  A handler that took a chunk may send bytes later with
        C{flow.writeToServer} (hold and release) or answer with
        C{flow.writeToClient}.

        @return: C{CONTINUE} or C{STOP}.
        """

    def dataFromServer(flow: IFlow, chunk: object) -> object:
        """
        Bytes arrived from the server: as L{dataFromClient}, the other way.

        @return: C{CONTINUE} or C{STOP}.
        """

    def clientHalfClosed(flow: IFlow) -> object:
        """
        The client sent a FIN.  On C{CONTINUE} from every handler the proxy
        sends a FIN to the server once the bytes before it are written; on
        C{STOP} the handler takes that over and must call
        C{flow.halfCloseToServer()} itself.

        @return: C{CONTINUE} or C{STOP}.
        """

    def serverHalfClosed(flow: IFlow) -> object:
        """
        The server sent a FIN: as L{clientHalfClosed}, the other way.

        @return: C{CONTINUE} or C{STOP}.
        """

    def closed(flow: IFlow) -> object:
        """
        Both legs are closed and C{flow.outcome} is final.  Every handler is
        called, whatever the others return: this is where a handler frees
        what it holds.

        @return: Ignored.
        """


class IFlowHandlerFactory(Interface):
    """
    A configured proxy function: it gives each new flow its handler.
    """

    name = Attribute("L{str}: the function's name.")

    def handlerForFlow(flow: IFlow) -> IFlowHandler | None:
        """
        Make the handler of a new flow.

        @return: An L{IFlowHandler}, or L{None} if this function has nothing
            to do for this flow (it then costs nothing per chunk).
        """


class IProxyFunction(Interface):
    """
    A proxy function plugin: split-TCP, policy, a cache, or any third-party
    function.

    Instances providing this interface and
    L{twisted.plugin.IPlugin} live in dropin modules of the
    L{miniproxy.plugins} package and are found by
    L{miniproxy.functions.discovery.getFunctions}.
    """

    name = Attribute(
        "L{str}: the name that enables the function, as in "
        "C{--function NAME} or C{functions = [NAME]} in the config file."
    )
    description = Attribute("L{str}: one line saying what the function does.")

    def configure(settings: dict, reactor: object) -> IFlowHandlerFactory:
        """
        Validate settings and make the configured function.

        @param settings: The function's table from the config file (possibly
            empty), with keys as written there.
        @param reactor: The reactor the service runs on.
        @raise miniproxy.errors.ConfigError: If a setting is bad; its message
            names the key.
        @return: The configured function.
        """


class ISocketTuner(Interface):
    """
    Optionally provided by an L{IFlowHandlerFactory} that tunes the legs'
    sockets (split-TCP does).
    """

    def tuneAccepted(transport: object) -> None:
        """
        Apply socket options to the accepted leg's transport.
        """

    def tuneOutgoing(transport: object) -> None:
        """
        Apply socket options to the outgoing leg's transport.
        """


class ICacheStore(Interface):
    """
    Where a cache function keeps responses.  The cache function itself is
    an ordinary L{IProxyFunction}; see C{docs/cache.md} for how it sees a
    request before any upstream connection.
    """

    def get(key: bytes) -> object:
        """
        Look a response up.

        @return: A L{twisted.internet.defer.Deferred} firing with the stored
            response (L{bytes}) or L{None} if there is none.
        """

    def put(key: bytes, response: bytes) -> object:
        """
        Store a complete response.

        @return: A L{twisted.internet.defer.Deferred} firing when stored.
        """


class ICachePolicy(Interface):
    """
    What a cache function needs to know about the protocol it caches.
    """

    def requestKey(request: bytes) -> bytes | None:
        """
        Turn the bytes a client sent so far into a cache key.

        @return: The key, or L{None} if the request is incomplete or must
            not be cached.
        @raise ValueError: If the request is malformed; the cache then
            passes the flow through untouched.
        """

    def responseComplete(response: bytes) -> bool:
        """
        Whether the bytes the server sent so far are one complete, storable
        response.
        """
