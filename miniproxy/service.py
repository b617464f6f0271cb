# -*- test-case-name: tests.test_service -*-
"""
The miniproxy service: listeners, the functions they run, and the flows
they share.
"""

from __future__ import annotations

import gc
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Sequence

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from miniproxy.accesslog import accessLogFor
from miniproxy.config import ServiceConfig
from miniproxy.errors import ConfigError, FunctionError
from miniproxy.flow import ConnectMode
from miniproxy.flowtable import FlowTable
from miniproxy.interfaces import IFlowHandlerFactory
from miniproxy.legs import AcceptedLegFactory
from miniproxy.tcpclient import enableFastOpenListener
from miniproxy.listener import ListenerContext, ListenerSettings, parseListenDescription

if TYPE_CHECKING:
    from miniproxy.earlysyn import EarlySyns
    from miniproxy.optionemitter import OptionEmitter

_log = Logger(namespace="miniproxy.service")

#: The allocation threshold of the garbage collector's youngest generation
#: in a tuned process (see L{tuneGarbageCollector}); CPython's default is
#: 700.
GC_THRESHOLD = 10000


def tuneGarbageCollector(threshold: int = GC_THRESHOLD) -> None:
    """
    Tune CPython's cyclic garbage collector for a process that serves
    flows: call it once the process is set up, before the first flow.

    A flow's objects are freed by their reference counts (a closed flow
    leaves no cycle), but the collector runs whenever the objects made since
    its last run outnumber what were freed by C{threshold}, and then goes
    through every young object, most of which belong to flows still open;
    with CPython's 700 that is once every few short flows.  A full
    collection goes through every object of the process, the tens of
    thousands that its imports made included.  So:

      - the objects that exist now (modules, classes, configuration) are
        moved out of the collector's reach for good (L{gc.freeze}): full
        collections only go through what was made since;
      - the youngest generation's threshold is raised to C{threshold}, so
        that most flows begun since a collection are over when the next
        one runs.

    This is the whole process's setting: L{ProxyService} only calls it when
    asked to (twistd's C{miniproxy} and the workers do; tests do not).

    @param threshold: The new threshold of the youngest generation.
    """
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(threshold, middle, oldest)


def configureFunctions(
    config: ServiceConfig, reactor: Any, package: ModuleType | None = None
) -> tuple[tuple[str, IFlowHandlerFactory], ...]:
    """
    Find and configure the enabled functions, in order.

    @raise ConfigError: If a function is not installed or its settings are
        bad; the message names C{function.NAME.KEY}.
    """
    if not config.functions:
        return ()
    from miniproxy.functions.discovery import getFunctions

    try:
        installed = getFunctions(package)
    except FunctionError as e:
        raise ConfigError(str(e)) from None
    configured = []
    for name, settings in config.functions:
        if name not in installed:
            known = ", ".join(sorted(installed)) or "none"
            raise ConfigError(
                f"functions: no proxy function named {name!r} is installed "
                f"(installed: {known})"
            )
        try:
            factory = installed[name].configure(dict(settings), reactor)
        except ConfigError as e:
            raise ConfigError(f"function.{name}.{e}") from None
        if not IFlowHandlerFactory.providedBy(factory):
            raise ConfigError(
                f"functions: {name!r} configured to {factory!r}, which does not "
                f"provide IFlowHandlerFactory"
            )
        configured.append((name, factory))
    return tuple(configured)


def withBacklog(description: str, backlog: int) -> str:
    """
    Add C{backlog=N} to a TCP server endpoint description that has none:
    Twisted's default of 50 drops connections under bursts.
    """
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl", "tproxy", "unix") and ":backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


#: Connections a listener accepts per wake-up at least.  Twisted's port
#: adapts its batch to the last wake-up's count (100 at first, then as
#: many as were accepted, so 1 after a quiet spell, growing by 20 while
#: full): a burst of 230 connects after a quiet spell took 6 wake-ups, each
#: behind everything else the reactor had to do.  An empty accept costs one
#: EAGAIN.
ACCEPT_BATCH = 256


def _acceptBatchPort() -> type:
    # Made on first use: twisted.internet.tcp is the reactor's.
    global _AcceptBatchPort
    if _AcceptBatchPort is None:
        from twisted.internet import tcp

        class AcceptBatchPort(tcp.Port):
            """
            A TCP port that accepts at least L{ACCEPT_BATCH} connections per
            wake-up (as many as are queued), and more while it keeps
            finding its batch full.
            """

            @property  # type: ignore[misc]
            def numberAccepts(self) -> int:
                return self._batch

            @numberAccepts.setter
            def numberAccepts(self, value: int) -> None:
                self._batch = max(value, ACCEPT_BATCH)

        _AcceptBatchPort = AcceptBatchPort
    return _AcceptBatchPort


_AcceptBatchPort: Any = None


def listenBatched(reactor: Any, port: int, factory: Any, backlog: int, interface: str) -> Any:
    """
    C{reactor.listenTCP}, with a port that accepts in batches of at least
    L{ACCEPT_BATCH}; the reactor's own on a reactor that is not a real
    one.
    """
    from twisted.internet.posixbase import PosixReactorBase

    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = _acceptBatchPort()(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def adoptBatched(reactor: Any, fileno: int, family: int, factory: Any) -> Any:
    """
    C{reactor.adoptStreamPort} for a TCP socket, with a port that accepts
    in batches of at least L{ACCEPT_BATCH}.
    """
    from twisted.internet.posixbase import PosixReactorBase

    if not isinstance(reactor, PosixReactorBase):
        return reactor.adoptStreamPort(fileno, family, factory)
    listening = _acceptBatchPort()._fromListeningDescriptor(reactor, fileno, family, factory)
    listening.startListening()
    return listening


class TCPServerEndpoint:
    """
    A plain TCP server endpoint, as Twisted's C{tcp:} and C{tcp6:} ones,
    made without L{twisted.internet.endpoints}, which imports its TLS
    support (a tenth of a second or more of start-up); its port accepts
    in batches (see L{ACCEPT_BATCH}).
    """

    def __init__(self, reactor: Any, port: int, interface: str, backlog: int) -> None:
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, factory: Any) -> Deferred:
        """
        Listen with C{factory}.

        @return: A L{Deferred} firing with the listening port, or failing
            with L{CannotListenError}.
        """
        try:
            port = listenBatched(
                self.reactor, self.port, factory, self.backlog, self.interface
            )
        except BaseException:
            return fail()
        return succeed(port)


def serverEndpoint(reactor: Any, description: str, backlog: int) -> Any:
    """
    The server endpoint of a listener: a L{TCPServerEndpoint} for a plain
    C{tcp:} or C{tcp6:} description, otherwise Twisted's C{serverFromString}
    (with the default backlog added, see L{withBacklog}).

    @raise ConfigError: If the description is bad.
    """
    try:
        kind, interface, port, given = parseListenDescription(description)
    except ConfigError:
        kind = None
    if kind in ("tcp", "tcp6"):
        return TCPServerEndpoint(reactor, port, interface, given or backlog)
    from twisted.internet.endpoints import serverFromString

    try:
        return serverFromString(reactor, withBacklog(description, backlog))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"bad listen endpoint {description!r}: {e}") from None


class ListenerService(Service):
    """
    One listener of a L{ProxyService}: it listens on its endpoint with its
    factory when it starts (or, under twistd, when the privileged start-up
    runs), and stops listening when it stops.

    This is Twisted's C{StreamServerEndpointService}, with the same
    attributes and behaviour, without its module:
    C{twisted.application.internet} imports Twisted's client service and
    C{automat} with it, which miniproxy never uses (about a tenth of the
    start-up's imports).

    @ivar endpoint: The server endpoint.
    @ivar factory: The factory it listens with.
    @ivar _waitingForPort: The L{Deferred} of the endpoint's C{listen}, once
        called, else L{None}.
    @ivar _raiseSynchronously: Whether a C{listen} that fails at once
        raises from the privileged start-up (instead of being logged).
    """

    _raiseSynchronously = False

    def __init__(self, endpoint: Any, factory: Any) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self._waitingForPort: Deferred | None = None

    def privilegedStartService(self) -> None:
        """
        Start listening on the endpoint.
        """
        Service.privilegedStartService(self)
        self._waitingForPort = self.endpoint.listen(self.factory)
        raisedNow: list[Failure] = []

        def handleIt(err: Failure) -> None:
            from twisted.internet.defer import CancelledError

            if self._raiseSynchronously:
                raisedNow.append(err)
            elif not err.check(CancelledError):
                _log.failure("listener {endpoint!r} did not listen", err, endpoint=self.endpoint)

        self._waitingForPort.addErrback(handleIt)
        if raisedNow:
            raisedNow[0].raiseException()
        self._raiseSynchronously = False

    def startService(self) -> None:
        """
        Start listening on the endpoint, unless L{privilegedStartService}
        did already.
        """
        Service.startService(self)
        if self._waitingForPort is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred:
        """
        Stop listening if it listens, or cancel the attempt to listen.

        @return: A L{Deferred} firing with L{None} once it no longer
            listens.
        """
        self._waitingForPort.cancel()  # type: ignore[union-attr]

        def stopIt(port: Any) -> Any:
            if port is not None:
                return port.stopListening()
            return None

        d = self._waitingForPort.addCallback(stopIt)  # type: ignore[union-attr]

        def stop(passthrough: object) -> object:
            self.running = False
            return passthrough

        return d.addBoth(stop)


class _SharedEmitter:
    """
    A service's option emitter, as its listeners' dialers see it: the
    shared emitter is acquired (and its modules imported) the first time a
    leg carries its destination in a TCP option.
    """

    __slots__ = ("_service",)

    def __init__(self, service: ProxyService) -> None:
        self._service = service

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service.optionEmitter, name)


def _portOf(service: ListenerService) -> Deferred:
    """
    A new L{Deferred} with the result of a started listener's
    C{_waitingForPort}.  Never hand out C{_waitingForPort} itself: whoever
    waits on it (C{yield} in C{inlineCallbacks}) would take the port from
    the listener, which then cannot stop listening.
    """
    port: Deferred = Deferred()

    def forward(result: Any) -> Any:
        if isinstance(result, Failure):
            port.errback(result)
        else:
            port.callback(result)
        return result

    service._waitingForPort.addBoth(forward)
    return port


class ProxyService(MultiService):
    """
    A running miniproxy: one L{ListenerService} per listener.

    @ivar config: The service's configuration.
    @ivar table: The open flows of every listener.
    @ivar functions: The configured functions, in order.
    """

    def __init__(
        self,
        config: ServiceConfig,
        reactor: Any,
        functions: tuple[tuple[str, IFlowHandlerFactory], ...] | None = None,
        onFlowClosed: Callable[[Any], None] | None = None,
        endpoints: Sequence[Any] | None = None,
        share: tuple[int, int] | None = None,
        tuneGC: bool = False,
    ) -> None:
        """
        @param functions: The configured functions, instead of those the
            configuration names.
        @param onFlowClosed: Called with each flow once it is closed.
        @param endpoints: The server endpoint of each listener, in order,
            instead of the ones their descriptions make (a worker's adopted
            sockets; see L{miniproxy.workers}).
        @param share: C{(index, workers)} in a worker: the SYN taps begin
            flows only for this worker's connections.
        @param tuneGC: Whether starting the service tunes the process's
            garbage collector (L{tuneGarbageCollector}): for a process
            that runs this service and nothing else.  Only on a real
            reactor: a process with a test reactor (a unit test of
            C{makeService}) is left as it is.
        """
        super().__init__()
        self.tuneGC = tuneGC
        self.config = config
        self.reactor = reactor
        self.table = FlowTable(config.limits.maxFlows, config.limits.maxFlowsPerSource)
        self.functions = (
            functions if functions is not None else configureFunctions(config, reactor)
        )
        self.onFlowClosed = onFlowClosed
        self.accessLog = accessLogFor(
            config.accessLog, reactor, config.accessLogBuffer, config.accessLogFlush
        )
        self._share = share
        self._early: EarlySyns | None = None
        self._optionEmitter: OptionEmitter | None = None
        self.listeners: list[ListenerService] = []
        try:
            for i, settings in enumerate(config.listeners):
                self._makeListener(settings, endpoints[i] if endpoints is not None else None)
        except BaseException:
            # A bad listener: this service never runs, so it never stops
            # and would keep the shared emitter (and its iptables rule).
            if self._optionEmitter is not None:
                self._optionEmitter.release()
            raise

    @property
    def early(self) -> EarlySyns:
        """
        The SYN taps of the early-mode listeners, made (and the SYN tap's
        modules imported) when first wanted.
        """
        if self._early is None:
            from miniproxy.earlysyn import EarlySyns

            self._early = EarlySyns(self.reactor, self.config.limits, share=self._share)
        return self._early

    @property
    def optionEmitter(self) -> OptionEmitter:
        """
        This process's shared option emitter (L{OptionEmitter.shared}),
        acquired when first wanted (when a leg first carries its
        destination in a TCP option) and released when the service stops.
        """
        if self._optionEmitter is None:
            from miniproxy.optionemitter import OptionEmitter

            self._optionEmitter = OptionEmitter.shared(self.reactor)
        return self._optionEmitter

    def _makeListener(
        self, settings: ListenerSettings, endpoint: Any = None, name: str | None = None
    ) -> ListenerService:
        if name is None:
            number = len(self.listeners) + 1
            while f"listener-{number}" in self.namedServices:
                number += 1
            name = f"listener-{number}"
        elif name in self.namedServices:
            raise ConfigError(f"a listener named {name!r} exists already")
        functions = self.functions
        if settings.functionNames:
            byName = dict(self.functions)
            missing = [n for n in settings.functionNames if n not in byName]
            if missing:
                raise ConfigError(f"functions: {missing[0]!r} is not enabled in this service")
            functions = tuple((n, byName[n]) for n in settings.functionNames)
        context = ListenerContext(
            self.reactor,
            settings,
            self.config.limits,
            functions,
            self.table,
            onFlowClosed=self.onFlowClosed,
            accessLog=self.accessLog,
        )
        if endpoint is None:
            endpoint = serverEndpoint(
                self.reactor, settings.endpoint, self.config.limits.listenBacklog
            )
        if settings.mode is ConnectMode.EARLY and settings.synTap:
            context.early = self.early
        context.dialer.optionEmitter = _SharedEmitter(self)
        service = ListenerService(endpoint, AcceptedLegFactory(context))
        service.listenerContext = context  # type: ignore[attr-defined]
        # Fail twistd's start-up when a port cannot be bound, instead of
        # logging and running with no listener.
        service._raiseSynchronously = True
        service.setName(name)
        try:
            service.setServiceParent(self)
        except BaseException:
            # It could not listen: forget it (its name is free again).
            failure = Failure()
            self.namedServices.pop(name, None)
            if service in self.services:
                self.services.remove(service)
            service.parent = None
            service.running = False
            failure.raiseException()
        self.listeners.append(service)
        return service

    def addListener(self, settings: ListenerSettings, name: str | None = None) -> Any:
        """
        Start one more listener in the running service (a proxy made on the
        fly).

        @param name: Its name (see L{removeListener}); by default the
            first free C{listener-N}.
        @return: A L{Deferred} firing with the listening port, or failing
            (L{CannotListenError}) with the listener already forgotten.
        @raise ConfigError: If the name is taken, or the endpoint or the
            functions are bad.
        """
        try:
            # A running parent starts (and binds) it at once.
            service = self._makeListener(settings, name=name)
        except CannotListenError:
            return fail()
        if self.running:
            self._announce(service)
        return _portOf(service)

    def listenerNamed(self, name: str) -> ListenerService:
        """
        The listener named C{name}.

        @raise KeyError: If there is none.
        """
        service = self.namedServices[name]
        if service not in self.listeners:
            raise KeyError(name)
        return service

    def listenerPort(self, name: str) -> Deferred:
        """
        The listening port of the started listener named C{name}.

        @return: A L{Deferred} firing with it once it listens.
        @raise KeyError: If there is no such listener.
        """
        return _portOf(self.listenerNamed(name))

    def flowsOf(self, name: str) -> list[Any]:
        """
        The open flows accepted (or begun at their SYN) by the listener
        named C{name}.

        @raise KeyError: If there is no such listener.
        """
        return self._flowsOf(self.listenerNamed(name).listenerContext)  # type: ignore[attr-defined]

    def _flowsOf(self, context: ListenerContext) -> list[Any]:
        return [flow for flow in self.table.flows if flow._context is context]

    def removeListener(self, name: str, closeFlows: bool = False) -> Deferred:
        """
        Stop the listener named C{name} and forget it: it stops listening
        (and its SYN tap stops beginning flows for it).  Its open flows run
        to their end under the limits, unless C{closeFlows}: then they are
        reset once it no longer listens.

        @return: A L{Deferred} firing with the number of its flows left
            open (0 with C{closeFlows}) once it no longer listens.
        @raise KeyError: If there is no such listener.
        """
        service = self.listenerNamed(name)
        context = service.listenerContext  # type: ignore[attr-defined]
        self.listeners.remove(service)
        if context.early is not None:
            context.early.unregister(context)
        stopped = service.disownServiceParent()
        if stopped is None:
            stopped = succeed(None)

        def done(_: object) -> int:
            flows = self._flowsOf(context)
            if not closeFlows:
                return len(flows)
            for flow in flows:
                flow.abort("listener removed")
            return 0

        return stopped.addCallback(done)

    def _openAccessLog(self) -> None:
        opener = getattr(self.accessLog, "open", None)
        if opener is None:
            return
        try:
            opener()
        except OSError as e:
            raise SystemExit(
                f"miniproxy: cannot open the access log {self.config.accessLog}: "
                f"{e.strerror}"
            ) from None

    def privilegedStartService(self) -> None:
        """
        Open the access log's file, if it has one, and bind the listeners
        (twistd does this before dropping privileges).  A file that cannot
        be opened, or a listener that cannot listen, stops twistd with one
        clear line.
        """
        self._openAccessLog()
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise SystemExit(f"miniproxy: {e}") from None

    def startService(self) -> None:
        """
        Start every listener, and log the address each one is bound to once
        it listens (so that C{tcp:0} listeners report their port).  With
        C{tuneGC}, tune the garbage collector first.
        """
        if self.tuneGC:
            from twisted.internet.posixbase import PosixReactorBase

            if isinstance(self.reactor, PosixReactorBase):
                tuneGarbageCollector()
        self._openAccessLog()
        super().startService()
        for service in self.listeners:
            self._announce(service)

    def _announce(self, service: ListenerService) -> None:
        def announce(port: Any) -> Any:
            address = port.getHost()
            _log.info(
                "miniproxy listening on {host}:{port}",
                host=getattr(address, "host", address),
                port=getattr(address, "port", ""),
            )
            return port

        if service._waitingForPort is not None:
            service._waitingForPort.addCallback(announce)
            service._waitingForPort.addCallback(self._tap, service)

    def _tap(self, port: Any, service: ListenerService) -> Any:
        """
        Once a listener listens: let it accept TCP Fast Open SYNs, and
        start the SYN tap of an early-mode listener.
        """
        context = service.listenerContext  # type: ignore[attr-defined]
        if context.settings.fastOpen:
            enableFastOpenListener(port)
        if context.early is None:
            return port
        settings = context.settings
        address = port.getHost()
        if settings.transparent:
            if not settings.synPorts:
                _log.info(
                    "{endpoint}: no syn-ports configured; transparent flows start "
                    "at accept",
                    endpoint=settings.endpoint,
                )
                return port
            self.early.register(context, None, set(settings.synPorts))
        else:
            self.early.register(context, address.host, {address.port})
        return port

    def whenListening(self) -> Deferred:
        """
        The listening ports of every listener, once all of them listen.
        Call it after L{startService}.

        @return: A L{Deferred} firing with the list of
            L{twisted.internet.interfaces.IListeningPort}, in the order of
            C{listeners}, or failing if a listener could not listen.
        """
        waiting = [_portOf(service) for service in self.listeners]
        return gatherResults(waiting, consumeErrors=True).addErrback(
            lambda f: f.value.subFailure if f.check(FirstError) else f
        )

    def stopService(self) -> Any:
        """
        Stop listening, then reset the flows still open.
        """
        d = super().stopService()
        if self._early is not None:
            self._early.stop()
        if self._optionEmitter is not None:
            self._optionEmitter.release()

        def closeFlows(result: object) -> object:
            for flow in list(self.table.flows):
                flow.abort("service stopping")
            return result

        d.addBoth(closeFlows)
        closer = getattr(self.accessLog, "close", None)
        if closer is not None:
            # The aborted flows end in the reactor's next turn: their lines
            # are written before the file is closed.
            def closeLog(result: object) -> Deferred:
                def close() -> object:
                    closer()
                    return result

                return deferLater(self.reactor, 0, close)

            d.addBoth(closeLog)
        return d
