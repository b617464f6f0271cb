"""
Tests for L{miniproxy.service}: a L{ProxyService} with several listeners,
listeners added while it runs, stopping it, and bad listen endpoints.

These run the service on real loopback sockets (see L{tests.support}).
"""

from __future__ import annotations

import gc
import socket
from typing import Any

from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from miniproxy.address import NextHop
from miniproxy.config import buildConfig
from miniproxy.errors import ConfigError
from miniproxy.flow import ConnectMode, Flow, Outcome
from miniproxy.listener import ListenerSettings
from miniproxy.service import ListenerService, ProxyService, withBacklog
from tests.support import TEST_TIMEOUT, LogCapture, Network, waitUntil, withTimeout

LOCAL = "tcp:0:interface=127.0.0.1"


class ServiceTests(unittest.TestCase):
    """
    A running L{ProxyService}.
    """

    timeout = TEST_TIMEOUT

    @defer.inlineCallbacks
    def exchange(self, net: Network, port: int, servers: Any, message: bytes) -> Any:
        """
        Send C{message} through the proxy at C{port}, have the server echo
        it, and close.

        @return: The client and server peers.
        """
        client = yield net.connect(port)
        client.transport.write(message)
        client.transport.loseWriteConnection()
        server = yield servers.nextPeer()
        yield withTimeout(
            defer.gatherResults([client.lost, server.lost]), 10, "the exchange to end"
        )
        self.assertEqual(server.received, message)
        self.assertEqual(client.received, message)
        return client, server

    @defer.inlineCallbacks
    def test_severalListeners(self) -> Any:
        """
        Each listener relays to its own next hop; L{ProxyService.whenListening}
        gives their ports in the order of the listeners, and each is
        announced in the log with its bound port.
        """
        net = Network(self)
        logs = LogCapture(self)
        portA, serversA = net.server(echo=True)
        portB, serversB = net.server(echo=True)
        proxy = yield net.startProxy(
            None,
            listen=None,
            document={
                "listeners": [
                    {"endpoint": LOCAL, "to": f"tcp:host=127.0.0.1:port={portA}"},
                    {"endpoint": LOCAL, "to": f"tcp:host=127.0.0.1:port={portB}"},
                ]
            },
        )
        self.assertEqual(len(proxy.ports), 2)
        self.assertNotEqual(proxy.ports[0], proxy.ports[1])
        announced = [e["port"] for e in logs.matching("miniproxy.service")
                     if e.get("log_format", "").startswith("miniproxy listening on")]
        self.assertEqual(sorted(announced), sorted(proxy.ports))

        yield self.exchange(net, proxy.ports[1], serversB, b"to B")
        yield self.exchange(net, proxy.ports[0], serversA, b"to A")
        flowB, flowA = yield proxy.waitForClosed(2)
        self.assertEqual((flowA.local.port, flowA.nextHop.address.port),
                         (proxy.ports[0], portA))
        self.assertEqual((flowB.local.port, flowB.nextHop.address.port),
                         (proxy.ports[1], portB))
        self.assertEqual(len(serversA.peers), 1)
        self.assertEqual(len(serversB.peers), 1)

    @defer.inlineCallbacks
    def test_addListener(self) -> Any:
        """
        L{ProxyService.addListener} starts a listener on the running
        service; it relays, and it stops with the service.
        """
        net = Network(self)
        portA, serversA = net.server(echo=True)
        portB, serversB = net.server(echo=True)
        proxy = yield net.startProxy(f"tcp:host=127.0.0.1:port={portA}")
        service = proxy.service
        listening = yield service.addListener(
            ListenerSettings(
                endpoint=LOCAL,
                mode=ConnectMode.ACCEPT,
                to=NextHop.fromString(f"tcp:host=127.0.0.1:port={portB}"),
            )
        )
        added = listening.getHost().port
        self.assertEqual(len(service.listeners), 2)
        self.assertTrue(service.listeners[1].running)
        ports = yield service.whenListening()
        self.assertEqual([p.getHost().port for p in ports], [proxy.port, added])

        yield self.exchange(net, added, serversB, b"through the new listener")
        flow = yield proxy.nextClosed()
        self.assertEqual(flow.outcome, Outcome.OK)
        self.assertEqual(flow.mode, ConnectMode.ACCEPT)
        self.assertEqual(serversA.peers, [])

        yield proxy.stop()
        yield self.assertFailure(net.connect(added), error.ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_stopService(self) -> Any:
        """
        Stopping the service closes its listeners and resets its open flows,
        among them one still connecting: each is C{aborted} because the
        service stops, and the clients and servers see resets.
        """
        net = Network(self)
        serverPort, servers = net.server()
        proxy = yield net.startProxy(
            None,
            listen=None,
            document={
                "listeners": [
                    {"endpoint": LOCAL, "to": f"tcp:host=127.0.0.1:port={serverPort}"},
                    {"endpoint": LOCAL,
                     "to": f"tcp:host=127.0.0.1:port={net.blackHolePort()}"},
                ]
            },
        )
        open1 = yield net.connect(proxy.ports[0])
        open1.transport.write(b"hello")
        server = yield servers.nextPeer()
        yield server.waitForBytes(5)
        connecting = yield net.connect(proxy.ports[1])
        yield waitUntil(lambda: len(proxy.openFlows()) == 2, "two open flows")

        yield defer.maybeDeferred(proxy.service.stopService)
        yield withTimeout(
            defer.gatherResults([open1.lost, server.lost, connecting.lost]),
            10, "the flows' connections to end",
        )
        flows = yield proxy.waitForClosed(2)
        self.assertEqual({f.outcome for f in flows}, {Outcome.ABORTED})
        self.assertEqual({f.reason for f in flows}, {"service stopping"})
        self.assertTrue(open1.wasReset(), open1.reason)
        self.assertTrue(server.wasReset(), server.reason)
        self.assertTrue(connecting.wasReset(), connecting.reason)
        for port in proxy.ports:
            yield self.assertFailure(net.connect(port), error.ConnectionRefusedError)
        self.assertEqual(proxy.openFlows(), [])

    @defer.inlineCallbacks
    def test_closedFlowLeavesNoCycle(self) -> Any:
        """
        A flow over real sockets, once closed, leaves no reference cycle:
        the garbage collector finds neither it nor its legs, because their
        reference counts freed them.
        """
        from miniproxy.legs import Leg

        net = Network(self)
        serverPort, servers = net.server(echo=True)
        proxy = yield net.startProxy(f"tcp:host=127.0.0.1:port={serverPort}")
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        yield self.exchange(net, proxy.port, servers, b"once")
        yield waitUntil(lambda: len(proxy.closed) == 1, "the flow to close")
        # Nothing here keeps the flow: only a cycle could.
        del proxy.closed[:]
        gc.set_debug(gc.DEBUG_SAVEALL)
        self.addCleanup(gc.set_debug, 0)
        self.addCleanup(gc.garbage.clear)
        gc.collect()
        found = [o for o in gc.garbage if isinstance(o, (Flow, Leg))]
        self.assertEqual(found, [])

    @defer.inlineCallbacks
    def test_portInUse(self) -> Any:
        """
        A listener whose port is taken fails L{ProxyService.startService}
        (so that twistd does not run without it).
        """
        from twisted.internet import reactor

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = buildConfig(
            {}, listen=[f"tcp:{port}:interface=127.0.0.1"], to="tcp:host=127.0.0.1:port=9"
        )
        service = ProxyService(config, reactor)
        self.assertRaises(error.CannotListenError, service.startService)
        yield defer.maybeDeferred(service.stopService)


class BadListenerTests(unittest.TestCase):
    """
    A listen endpoint Twisted cannot parse is a L{ConfigError} naming it.
    """

    def config(self, endpoint: str) -> Any:
        return buildConfig({}, listen=[endpoint], to="tcp:host=127.0.0.1:port=9")

    def test_badEndpoints(self) -> None:
        """
        An unknown endpoint kind, a port that is not a number and an
        unknown parameter are each refused when the service is made.
        """
        from twisted.internet import reactor

        for endpoint in (
            "nonsense:8080",
            "tcp:notaport:interface=127.0.0.1",
            "tcp:8080:bogus=1",
        ):
            e = self.assertRaises(ConfigError, ProxyService, self.config(endpoint), reactor)
            self.assertIn("bad listen endpoint", str(e))
            self.assertIn(repr(endpoint), str(e))

    def test_addBadListener(self) -> None:
        """
        L{ProxyService.addListener} with a bad endpoint raises L{ConfigError}
        and leaves the service's listeners as they were.
        """
        from twisted.internet import reactor

        service = ProxyService(self.config("tcp:0:interface=127.0.0.1"), reactor)
        # Never started, so never stopped: give back its share of the emitter.
        self.addCleanup(service.optionEmitter.release)
        e = self.assertRaises(
            ConfigError,
            service.addListener,
            ListenerSettings(endpoint="nonsense:1", mode=ConnectMode.EARLY),
        )
        self.assertIn("'nonsense:1'", str(e))
        self.assertEqual(len(service.listeners), 1)

    def test_unknownFunction(self) -> None:
        """
        A function that is not installed is a L{ConfigError} naming it and
        the installed ones.
        """
        from twisted.internet import reactor

        config = buildConfig(
            {}, listen=[LOCAL], to="tcp:host=127.0.0.1:port=9", functions=["no-such"]
        )
        e = self.assertRaises(ConfigError, ProxyService, config, reactor)
        self.assertIn("'no-such'", str(e))
        self.assertIn("split-tcp", str(e))

    def test_backlog(self) -> None:
        """
        L{withBacklog} adds the configured backlog to the endpoints that
        listen(2) themselves (TCP, TLS, transparent and UNIX sockets) and
        have none, and leaves the others alone.
        """
        self.assertEqual(withBacklog("tcp:80", 7), "tcp:80:backlog=7")
        self.assertEqual(withBacklog("tcp:80:backlog=3", 7), "tcp:80:backlog=3")
        self.assertEqual(withBacklog("tproxy:80", 7), "tproxy:80:backlog=7")
        self.assertEqual(withBacklog("unix:/tmp/s", 7), "unix:/tmp/s:backlog=7")
        self.assertEqual(withBacklog("systemd:domain=INET:index=0", 7),
                         "systemd:domain=INET:index=0")




class AcceptBatchTests(unittest.TestCase):
    """
    A plain TCP listener accepts every queued connection in one wake-up,
    however few the last one found.
    """

    def listen(self) -> tuple[Any, list[Any]]:
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory, Protocol

        from miniproxy.service import serverEndpoint

        built: list[Any] = []

        class Count(Factory):
            noisy = False

            def buildProtocol(self, addr: Any) -> Protocol:
                protocol = Protocol()
                built.append(protocol)
                return protocol

        endpoint = serverEndpoint(reactor, "tcp:0:interface=127.0.0.1", 1024)
        port = self.successResultOf(endpoint.listen(Count()))
        self.addCleanup(port.stopListening)
        return port, built

    def connect(self, port: Any, n: int) -> None:
        for _ in range(n):
            client = socket.socket()
            self.addCleanup(client.close)
            client.connect(("127.0.0.1", port.getHost().port))

    def test_burstInOneWakeUp(self) -> None:
        """
        After a wake-up that found one connection (Twisted's own port then
        accepts one at a time), 300 queued connections are all accepted by
        the next wake-up, with one more for the batch found full.
        """
        from miniproxy.service import ACCEPT_BATCH

        port, built = self.listen()
        self.connect(port, 1)
        port.doRead()
        self.assertEqual(len(built), 1)
        self.assertEqual(port.numberAccepts, ACCEPT_BATCH)
        self.connect(port, 300)
        port.doRead()
        self.assertEqual(len(built), 1 + ACCEPT_BATCH)
        self.assertEqual(port.numberAccepts, ACCEPT_BATCH + 20)
        port.doRead()
        self.assertEqual(len(built), 301)
        for protocol in built:
            protocol.transport.abortConnection()

    def test_memoryReactor(self) -> None:
        """
        On a reactor of tests, the reactor's own port is used.
        """
        from twisted.internet.protocol import Factory
        from twisted.internet.testing import MemoryReactor

        from miniproxy.service import serverEndpoint

        reactor = MemoryReactor()
        endpoint = serverEndpoint(reactor, "tcp:8080:interface=127.0.0.1:backlog=9", 1024)
        self.successResultOf(endpoint.listen(Factory()))
        [(port, _, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, backlog, interface), (8080, 9, "127.0.0.1"))


class StoppablePort:
    """
    A listening port that records that it was stopped.
    """

    stopped = False

    def stopListening(self) -> None:
        self.stopped = True


class ListenerServiceTests(unittest.TestCase):
    """
    L{ListenerService} behaves as Twisted's C{StreamServerEndpointService}:
    it listens once, when started or at the privileged start-up; a listen
    that fails at once raises when asked to and is logged otherwise; it
    stops listening, or cancels the listen, when stopped.
    """

    def listener(self, result: Any = None) -> tuple[ListenerService, list[Any]]:
        """
        A L{ListenerService} on an endpoint whose C{listen} records its
        factory and returns C{result} (by default, a new L{defer.Deferred}).
        """
        calls: list[Any] = []
        factory = object()

        class Endpoint:
            def listen(self, given: Any) -> defer.Deferred:
                calls.append(given)
                return result if result is not None else defer.Deferred()

        service = ListenerService(Endpoint(), factory)
        self.assertIs(service.factory, factory)
        return service, calls

    def test_listensOnce(self) -> None:
        """
        The privileged start-up listens with the factory; starting the
        service afterwards does not listen again, and stopping it stops
        the port listening and the service running.
        """
        port = StoppablePort()
        service, calls = self.listener(defer.succeed(port))
        service._raiseSynchronously = True
        service.privilegedStartService()
        self.assertFalse(service._raiseSynchronously)
        service.startService()
        self.assertEqual(calls, [service.factory])
        self.assertTrue(service.running)
        stopped = service.stopService()
        self.assertTrue(port.stopped)
        self.assertFalse(service.running)
        self.assertIsNone(self.successResultOf(stopped))

    def test_startListens(self) -> None:
        """
        Starting a service that had no privileged start-up listens.
        """
        service, calls = self.listener(defer.succeed(StoppablePort()))
        self.assertIsNone(service._waitingForPort)
        service.startService()
        self.assertEqual(calls, [service.factory])

    def test_raisesAtOnce(self) -> None:
        """
        With C{_raiseSynchronously}, a listen that fails at once raises its
        error from the privileged start-up, and logs nothing.
        """
        service, _ = self.listener(defer.fail(error.CannotListenError("", 1, None)))
        service._raiseSynchronously = True
        self.assertRaises(error.CannotListenError, service.privilegedStartService)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_logsFailure(self) -> None:
        """
        Without C{_raiseSynchronously}, a listen that fails is logged.
        """
        service, _ = self.listener(defer.fail(error.CannotListenError("", 1, None)))
        service.startService()
        self.assertEqual(len(self.flushLoggedErrors(error.CannotListenError)), 1)

    def test_stopCancels(self) -> None:
        """
        Stopping a service that is not listening yet cancels the listen;
        it is stopped, and the cancellation is not logged as an error.
        """
        cancelled: list[defer.Deferred] = []
        service, _ = self.listener(defer.Deferred(cancelled.append))
        service.startService()
        stopped = service.stopService()
        self.assertEqual(cancelled, [service._waitingForPort])
        self.assertIsNone(self.successResultOf(stopped))
        self.assertFalse(service.running)
        self.assertEqual(self.flushLoggedErrors(), [])


class LazyPartsTests(unittest.TestCase):
    """
    A L{ProxyService} makes its SYN taps and takes its share of the option
    emitter only when something wants them, and gives back only what it
    took.
    """

    def service(self, mode: str) -> ProxyService:
        config = buildConfig({}, listen=[LOCAL], to="tcp:host=127.0.0.1:port=9", mode=mode)
        return ProxyService(config, MemoryReactor())

    def test_acceptMode(self) -> None:
        """
        An C{accept}-mode service has neither SYN taps nor an emitter, not
        even once it has started and stopped.
        """
        service = self.service("accept")
        self.assertIsNone(service.listeners[0].listenerContext.early)
        service.startService()
        self.successResultOf(service.stopService())
        self.assertIsNone(service._early)
        self.assertIsNone(service._optionEmitter)

    def test_earlyMode(self) -> None:
        """
        An C{early}-mode listener is given the service's SYN taps.
        """
        service = self.service("early")
        self.assertIsNotNone(service._early)
        self.assertIs(service.listeners[0].listenerContext.early, service.early)
        self.assertIsNone(service._optionEmitter)

    def test_emitterOnFirstUse(self) -> None:
        """
        A listener's dialer takes the service's share of the shared
        emitter on its first use of it, and stopping the service gives it
        back.
        """
        service = self.service("accept")
        dialer = service.listeners[0].listenerContext.dialer
        mark = dialer.optionEmitter.mark
        emitter = service._optionEmitter
        self.assertIsNotNone(emitter)
        self.assertEqual(mark, emitter.mark)
        self.assertIs(service.optionEmitter, emitter)
        self.assertEqual(emitter._users, 1)
        service.startService()
        self.successResultOf(service.stopService())
        self.assertEqual(emitter._users, 0)


class GarbageCollectorTests(unittest.TestCase):
    """
    L{tuneGarbageCollector}, and the services that call it.  The collector
    is the process's: these tests patch its functions, never call them.
    """

    def setUp(self) -> None:
        from miniproxy import service

        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.patch(service.gc, "freeze", lambda: self.calls.append(("freeze", ())))
        self.patch(
            service.gc, "set_threshold",
            lambda *values: self.calls.append(("set_threshold", values)),
        )
        self.patch(service.gc, "get_threshold", lambda: (700, 10, 10))

    def test_tune(self) -> None:
        """
        The objects that exist are frozen, then the youngest generation's
        threshold is raised; the older generations' are left as they are.
        """
        from miniproxy.service import GC_THRESHOLD, tuneGarbageCollector

        tuneGarbageCollector()
        self.assertEqual(
            self.calls, [("freeze", ()), ("set_threshold", (GC_THRESHOLD, 10, 10))]
        )
        self.assertGreater(GC_THRESHOLD, 700)

    def service(self, reactor: Any, tuneGC: bool) -> ProxyService:
        config = buildConfig({}, listen=[LOCAL], to="tcp:host=127.0.0.1:port=9")
        service = ProxyService(config, reactor, tuneGC=tuneGC)
        self.addCleanup(service.optionEmitter.release)
        return service

    def test_startTunes(self) -> Any:
        """
        A service made with C{tuneGC} on a real reactor tunes the collector
        when it starts; one made without does not.
        """
        from twisted.internet import reactor

        untuned = self.service(reactor, False)
        untuned.startService()
        self.addCleanup(untuned.stopService)
        self.assertEqual(self.calls, [])
        tuned = self.service(reactor, True)
        tuned.startService()
        self.addCleanup(tuned.stopService)
        self.assertEqual([name for name, _ in self.calls], ["freeze", "set_threshold"])

    def test_testReactor(self) -> None:
        """
        On a reactor of tests, C{tuneGC} leaves the collector alone.
        """
        from twisted.internet.testing import MemoryReactorClock

        service = self.service(MemoryReactorClock(), True)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(self.calls, [])

    def test_twistdTunes(self) -> None:
        """
        The service C{twistd miniproxy} makes tunes the collector.
        """
        from twisted.internet.testing import MemoryReactorClock

        from miniproxy.tap import Options, makeService

        options = Options()
        options.parseOptions(["--to", "tcp:host=127.0.0.1:port=9"])
        service = makeService(options, MemoryReactorClock())
        self.addCleanup(service.optionEmitter.release)
        self.assertTrue(service.tuneGC)
