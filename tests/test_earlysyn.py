"""
Tests for L{miniproxy.earlysyn}: flows begun at their SYN.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from miniproxy.address import HostPort, NextHop
from miniproxy.earlysyn import EarlySyns, canonicalEndpoint, sameEndpoint
from miniproxy.syntap import READ_BATCH, workerOf
from miniproxy.flow import ConnectMode, Moment, Outcome
from miniproxy.flowtable import FlowTable
from miniproxy.limits import Limits
from miniproxy.listener import ListenerContext, ListenerSettings
from miniproxy.testing import FakeDialer
from miniproxy.wire import tcpoption
from miniproxy.wire.packet import SYN, TCPSegment
from tests.support import Network, waitUntil
from tests.test_wire_packet import ipv4, tcp

LOCAL = HostPort("127.0.0.1", 8080)


class FakeTap:
    """
    A SYN tap that records what it was asked to do.
    """

    instances: list[FakeTap] = []

    def __init__(self, reactor: Any, family: int, ports: Any, onSyn: Any, fail: bool = False) -> None:
        self.family = family
        self.ports = frozenset(ports)
        self.onSyn = onSyn
        self.running = False
        self.fail = fail

    def start(self) -> None:
        if self.fail:
            raise PermissionError(1, "Operation not permitted")
        self.running = True

    def setPorts(self, ports: Any) -> None:
        self.ports = frozenset(ports)

    def stop(self) -> None:
        self.running = False


def syn(client: HostPort, local: HostPort = LOCAL, options: tuple = ()) -> TCPSegment:
    return TCPSegment(client, local, 1, SYN, options, b"")


class EarlySynsTests(unittest.TestCase):
    """
    L{EarlySyns} begins flows at their SYN, bounds them, and hands them to
    the accepted legs.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.limits = Limits(maxPendingSyns=4, maxPendingSynsPerSource=2, synTimeout=3.0)
        self.taps: list[FakeTap] = []
        self.early = EarlySyns(self.reactor, self.limits, makeTap=self.makeTap)
        self.table = FlowTable(100, 100)
        self.dialer = FakeDialer(self.reactor, 10)
        self.closed: list[Any] = []
        self.context = self.makeContext(ListenerSettings(
            endpoint="tcp:8080", mode=ConnectMode.EARLY,
            to=NextHop(HostPort("127.0.0.1", 9000)),
        ))
        self.assertTrue(self.early.register(self.context, "127.0.0.1", {8080}))

    def makeTap(self, reactor: Any, family: int, ports: Any, onSyn: Any) -> FakeTap:
        tap = FakeTap(reactor, family, ports, onSyn)
        self.taps.append(tap)
        return tap

    def makeContext(self, settings: ListenerSettings) -> ListenerContext:
        context = ListenerContext(
            self.reactor, settings, self.limits, (), self.table, dialer=self.dialer,
            onFlowClosed=self.closed.append,
        )
        context.early = self.early
        return context

    def test_register(self) -> None:
        """
        A listener on an IPv4 address gets one IPv4 tap for its port; a
        second listener adds its port to the same tap.
        """
        [tap] = self.taps
        self.assertEqual((tap.family, tap.ports, tap.running), (socket.AF_INET, {8080}, True))
        other = self.makeContext(ListenerSettings(endpoint="tcp:8081", mode=ConnectMode.EARLY))
        self.early.register(other, "127.0.0.1", {8081})
        self.assertEqual(tap.ports, {8080, 8081})
        self.early.register(other, None, {8082})
        self.assertEqual(
            sorted(t.family for t in self.taps), [socket.AF_INET, socket.AF_INET6]
        )
        self.early.stop()
        self.assertFalse(any(t.running for t in self.taps))

    def test_synBeginsFlowAndConnects(self) -> None:
        """
        A SYN to the listener begins a flow at the SYN and starts its
        outgoing leg at once; the accepted leg claims it.
        """
        client = HostPort("127.0.0.1", 50000)
        self.early.synArrived(syn(client))
        [attempt] = self.dialer.attempts
        self.assertEqual(attempt.nextHop.address, HostPort("127.0.0.1", 9000))
        self.assertTrue(self.early.isPending(client))
        [flow] = self.table.flows
        self.assertIs(flow.startedBy, Moment.SYN)
        self.assertIsNotNone(flow.times.synSeen)
        self.assertIsNone(self.early.claim(client, HostPort("127.0.0.1", 8081)))
        self.assertIs(self.early.claim(client, LOCAL), flow)
        self.assertFalse(self.early.isPending(client))
        self.assertIsNone(self.early.claim(client, LOCAL))

    def test_mappedAddresses(self) -> None:
        """
        A dual-stack listener sees the client as C{::ffff:a.b.c.d}; it is the
        same client.
        """
        self.early.synArrived(syn(HostPort("127.0.0.1", 50000)))
        mapped = HostPort("::ffff:127.0.0.1", 50000)
        self.assertTrue(self.early.isPending(mapped))
        self.assertIsNotNone(self.early.claim(mapped, HostPort("::ffff:127.0.0.1", 8080)))
        self.assertTrue(sameEndpoint(HostPort("::ffff:10.0.0.1", 1), HostPort("10.0.0.1", 1)))
        self.assertEqual(canonicalEndpoint(HostPort("::1", 2)), HostPort("::1", 2))

    def test_otherDestinationIgnored(self) -> None:
        self.early.synArrived(syn(HostPort("127.0.0.1", 1), HostPort("127.0.0.2", 8080)))
        self.early.synArrived(syn(HostPort("127.0.0.1", 1), HostPort("127.0.0.1", 9999)))
        self.assertEqual(self.dialer.attempts, [])

    def test_retransmission(self) -> None:
        """
        A retransmitted SYN does not start a second leg.
        """
        client = HostPort("127.0.0.1", 50000)
        self.early.synArrived(syn(client))
        self.early.synArrived(syn(client))
        self.assertEqual(len(self.dialer.attempts), 1)
        self.assertEqual(self.early.retransmits, 1)

    def test_bounds(self) -> None:
        """
        Past the per-source and total bounds, SYNs begin no flow (they will
        connect at accept), are counted, and are logged once per interval.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for port in range(3):
            self.early.synArrived(syn(HostPort("10.0.0.1", 1000 + port)))
        self.assertEqual(len(self.dialer.attempts), 2)
        self.assertEqual(self.early.overflows, 1)
        for host in ("10.0.0.2", "10.0.0.3", "10.0.0.4"):
            self.early.synArrived(syn(HostPort(host, 1000)))
        self.assertEqual(len(self.dialer.attempts), 4)
        self.assertEqual(self.early.overflows, 2)
        warnings = [e for e in events if e.get("log_namespace") == "miniproxy.earlysyn"]
        self.assertEqual(len(warnings), 1)
        self.reactor.advance(11)
        self.early.synArrived(syn(HostPort("10.0.0.9", 1000)))
        warnings = [e for e in events if e.get("log_namespace") == "miniproxy.earlysyn"]
        self.assertEqual(len(warnings), 1)  # all expired first: room again
        self.assertEqual(len(self.early.pending), 1)

    def test_expiry(self) -> None:
        """
        A handshake that never completes is given up: the flow is aborted,
        its early outgoing leg reset, its place freed.
        """
        client = HostPort("127.0.0.1", 50000)
        self.early.synArrived(syn(client))
        [attempt] = self.dialer.attempts
        self.reactor.advance(2.9)
        self.assertTrue(self.early.isPending(client))
        self.reactor.advance(0.2)
        self.assertFalse(self.early.isPending(client))
        self.assertEqual(self.early.expired, 1)
        [flow] = self.closed
        self.assertIs(flow.outcome, Outcome.ABORTED)
        self.assertIn("handshake not completed", flow.reason)
        self.assertFalse(attempt.pending)
        self.assertEqual(self.table.flows, set())

    def expiryCalls(self) -> list[Any]:
        """
        The delayed calls that expire pending flows.
        """
        return [c for c in self.reactor.getDelayedCalls() if c.func == self.early._expire]

    def test_oneExpiryCall(self) -> None:
        """
        However many flows are pending, one delayed call expires them, each
        C{synTimeout} after its own SYN, in the order of their SYNs; a claim
        cancels nothing, and the call ends with the last pending flow.
        """
        # From three hosts: the per-source bound here is 2.
        clients = [HostPort(f"127.0.0.{1 + i}", 50000) for i in range(3)]
        for client in clients:
            self.early.synArrived(syn(client))
            self.assertEqual(len(self.expiryCalls()), 1)
            self.reactor.advance(1)
        # t=3: the first handshake's time is up.
        self.assertEqual(self.early.expired, 1)
        self.assertFalse(self.early.isPending(clients[0]))
        self.assertTrue(self.early.isPending(clients[1]))
        [call] = self.expiryCalls()
        self.assertEqual(call.getTime(), 4.0)
        self.assertIsNotNone(self.early.claim(clients[1], LOCAL))
        self.reactor.advance(1)
        # t=4: the claimed flow is not expired; the call waits for the third.
        self.assertEqual(self.early.expired, 1)
        self.assertEqual([c.getTime() for c in self.expiryCalls()], [5.0])
        self.reactor.advance(1)
        self.assertEqual(self.early.expired, 2)
        self.assertEqual(self.early.pending, {})
        self.assertEqual(self.expiryCalls(), [])
        self.assertEqual(
            [f.outcome for f in self.closed], [Outcome.ABORTED, Outcome.ABORTED]
        )
        self.early.synArrived(syn(HostPort("127.0.0.1", 50009)))
        self.assertEqual([c.getTime() for c in self.expiryCalls()], [8.0])

    def test_stopCancelsExpiry(self) -> None:
        """
        Stopping aborts the pending flows and leaves no delayed call.
        """
        self.early.synArrived(syn(HostPort("127.0.0.1", 50000)))
        self.early.stop()
        self.assertEqual(self.expiryCalls(), [])
        [flow] = self.closed
        self.assertEqual(flow.reason, "service stopping")

    def test_flowLimitsAtSyn(self) -> None:
        """
        A SYN over the flow table's limits begins no flow.
        """
        self.table.maxFlowsPerSource = 0
        self.early.synArrived(syn(HostPort("127.0.0.1", 50000)))
        self.assertEqual(self.dialer.attempts, [])
        self.assertEqual(self.early.pending, {})

    def test_tapUnavailable(self) -> None:
        """
        Without CAP_NET_RAW the tap cannot open: one log line, and flows
        start at accept.
        """
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        early = EarlySyns(
            self.reactor, self.limits,
            makeTap=lambda *a: FakeTap(*a, fail=True),
        )
        self.assertFalse(early.register(self.context, "127.0.0.1", {8080}))
        self.assertFalse(early.register(self.context, "127.0.0.1", {8080}))
        self.assertFalse(early.available)
        messages = [e for e in events if "CAP_NET_RAW" in e.get("log_format", "")]
        self.assertEqual(len(messages), 1)


class QueuedTap(FakeTap):
    """
    A tap with SYNs queued in its socket, delivered when it is read.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue: list[TCPSegment] = []
        self.reads = 0

    def readQueued(self, limit: int = READ_BATCH) -> int:
        self.reads += 1
        batch, self.queue = self.queue[:limit], self.queue[limit:]
        for segment in batch:
            self.onSyn(segment)
        return len(batch)


class DrainTests(unittest.TestCase):
    """
    An accept that finds no flow begun at its SYN reads the SYNs still
    queued in the taps first, so one connection never begins two flows.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.taps: list[QueuedTap] = []
        limits = Limits(maxPendingSynsPerSource=1000)
        self.early = EarlySyns(self.reactor, limits, makeTap=self.makeTap)
        self.table = FlowTable(10000, 10000)
        self.dialer = FakeDialer(self.reactor, 10)
        context = ListenerContext(
            self.reactor,
            ListenerSettings(endpoint="tcp:8080", mode=ConnectMode.EARLY,
                             to=NextHop(HostPort("127.0.0.1", 9000))),
            limits, (), self.table, dialer=self.dialer,
        )
        context.early = self.early
        self.early.register(context, "127.0.0.1", {8080})

    def makeTap(self, *args: Any, **kwargs: Any) -> QueuedTap:
        tap = QueuedTap(*args, **kwargs)
        self.taps.append(tap)
        return tap

    def test_claimDrains(self) -> None:
        """
        The SYN of an accepted connection still queued in the tap (the
        reactor read the listener first) is read at the accept, and the
        accept claims the flow it began: one flow, one outgoing leg.
        """
        [tap] = self.taps
        client = HostPort("127.0.0.1", 50000)
        tap.queue.append(syn(client))
        self.assertTrue(self.early.isPending(client))
        flow = self.early.claim(client, LOCAL)
        self.assertIsNotNone(flow)
        self.assertEqual(list(self.table.flows), [flow])
        self.assertEqual(len(self.dialer.attempts), 1)

    def test_drainsEveryBatch(self) -> None:
        """
        A claim drains full batches until the tap is empty (within
        L{DRAIN_BATCHES}), so a SYN behind a burst is found too.
        """
        [tap] = self.taps
        clients = [HostPort("127.0.0.1", 10000 + i) for i in range(READ_BATCH + 10)]
        tap.queue.extend(syn(c) for c in clients)
        self.assertIsNotNone(self.early.claim(clients[-1], LOCAL))
        self.assertEqual(tap.queue, [])
        self.assertEqual(tap.reads, 2)

    def test_noDrainWhenPending(self) -> None:
        """
        A claim that finds its flow reads nothing more: the common case
        costs no system call.
        """
        [tap] = self.taps
        client = HostPort("127.0.0.1", 50000)
        self.early.synArrived(syn(client))
        self.assertTrue(self.early.isPending(client))
        self.assertIsNotNone(self.early.claim(client, LOCAL))
        self.assertEqual(tap.reads, 0)

    def test_missDrainsOnce(self) -> None:
        """
        A connection with no SYN anywhere (the tap dropped it) begins at
        accept, after one empty read of the tap.
        """
        [tap] = self.taps
        self.assertIsNone(self.early.claim(HostPort("127.0.0.1", 50000), LOCAL))
        self.assertEqual(tap.reads, 1)
        self.assertEqual(self.table.flows, set())


class ShareTests(unittest.TestCase):
    """
    In a worker, L{EarlySyns} begins flows only for the SYNs of the
    connections the kernel steers to that worker.
    """

    def test_share(self) -> None:
        """
        Of two workers' L{EarlySyns}, each begins the flows of exactly the
        client ports L{workerOf} gives it, and its tap is made with the
        share.
        """
        began = []
        for index in range(2):
            reactor = MemoryReactorClock()
            taps: list[Any] = []

            def makeTap(*args: Any, **kwargs: Any) -> FakeTap:
                taps.append(kwargs)
                return FakeTap(*args)

            early = EarlySyns(reactor, Limits(), makeTap=makeTap, share=(index, 2))
            table = FlowTable(10000, 10000)
            context = ListenerContext(
                reactor,
                ListenerSettings(endpoint="tcp:8080", mode=ConnectMode.EARLY,
                                 to=NextHop(HostPort("127.0.0.1", 9000))),
                Limits(), (), table, dialer=FakeDialer(reactor, 10),
            )
            early.register(context, "127.0.0.1", {8080})
            self.assertEqual(taps, [{"share": (index, 2)}])
            for port in range(40000, 40040, 2):
                early.synArrived(syn(HostPort("127.0.0.1", port)))
            ports = sorted(c.port for c in early.pending)
            self.assertEqual(ports, [p for p in range(40000, 40040, 2) if workerOf(p, 2) == index])
            began.append(ports)
        self.assertEqual(sorted(began[0] + began[1]), list(range(40000, 40040, 2)))
        self.assertTrue(began[0] and began[1])


class ExplicitDestinationTests(unittest.TestCase):
    """
    The flow address TCP option names a flow's destination at its SYN, from
    trusted peers only, and only with a policy decision.
    """

    def setUp(self) -> None:
        import ipaddress

        self.reactor = MemoryReactorClock()
        self.early = EarlySyns(self.reactor, Limits(), makeTap=lambda *a: FakeTap(*a))
        self.dialer = FakeDialer(self.reactor, 10)
        self.closed: list[Any] = []
        self.settings = ListenerSettings(
            endpoint="tcp:8080", mode=ConnectMode.EARLY, explicit=("tcp-option",),
            trusted=(ipaddress.ip_network("10.0.0.0/8"),),
        )

    def context(self, functions: tuple = ()) -> ListenerContext:
        context = ListenerContext(
            self.reactor, self.settings, Limits(), functions, FlowTable(10, 10),
            dialer=self.dialer, onFlowClosed=self.closed.append,
        )
        context.early = self.early
        self.early.register(context, None, {8080})
        return context

    def option(self, host: str = "192.0.2.7", port: int = 80) -> tuple:
        raw = tcpoption.encode(tcpoption.FlowAddressOption(HostPort(host, port)))
        return ((raw[0], raw[2:]),)

    def test_refusedWithoutPolicy(self) -> None:
        """
        An explicit destination from a trusted peer is still refused unless
        a function allows it: no open relay.
        """
        self.context()
        self.early.synArrived(syn(HostPort("10.1.1.1", 5), options=self.option()))
        [flow] = self.closed
        self.assertIs(flow.outcome, Outcome.REFUSED)
        self.assertIn("explicit destination 192.0.2.7:80 not allowed", flow.reason)
        self.assertEqual(self.dialer.attempts, [])

    def test_allowedByPolicy(self) -> None:
        from miniproxy.functions.policy import configure

        policy = configure(
            {"rules": [{"action": "allow", "destinations": ["192.0.2.0/24"], "ports": [80]}]},
            self.reactor,
        )
        self.context(functions=(("policy", policy),))
        self.early.synArrived(syn(HostPort("10.1.1.1", 5), options=self.option()))
        [attempt] = self.dialer.attempts
        self.assertEqual(attempt.nextHop.address, HostPort("192.0.2.7", 80))
        self.early.synArrived(syn(HostPort("10.1.1.1", 6), options=self.option(port=81)))
        self.assertEqual(len(self.dialer.attempts), 1)
        self.assertIn("denied by policy", self.closed[-1].reason)

    def test_untrustedPeer(self) -> None:
        self.context()
        self.early.synArrived(syn(HostPort("172.16.0.1", 5), options=self.option()))
        [flow] = self.closed
        self.assertIs(flow.outcome, Outcome.REFUSED)
        self.assertIn("untrusted peer 172.16.0.1", flow.reason)
        # It stays pending, so that the accepted connection is closed.
        self.assertTrue(self.early.isPending(HostPort("172.16.0.1", 5)))

    def test_malformed(self) -> None:
        self.context()
        bad = ((tcpoption.KIND, tcpoption.EXID.to_bytes(2, "big") + b"\x01"),)
        self.early.synArrived(syn(HostPort("10.0.0.1", 5), options=bad))
        self.assertIn("malformed flow address option", self.closed[0].reason)


def _needRoot() -> None:
    if os.geteuid() != 0:
        raise unittest.SkipTest("the SYN tap needs CAP_NET_RAW (run as root)")


class RealEarlySynTests(unittest.TestCase):
    """
    On real loopback sockets, early mode starts the outgoing leg at the
    client's SYN, before accept.
    """

    def setUp(self) -> None:
        _needRoot()
        self.network = Network(self)

    @defer.inlineCallbacks
    def test_startedAtSyn(self):  # type: ignore[no-untyped-def]
        port, servers = self.network.server()
        proxy = yield self.network.startProxy(to=f"tcp:host=127.0.0.1:port={port}", mode="early")
        client = yield self.network.connect(proxy.port)
        server = yield servers.nextPeer()
        client.transport.write(b"ping")
        yield server.waitForBytes(4)
        self.assertEqual(server.received, b"ping")
        server.transport.write(b"pong")
        yield client.waitForBytes(4)
        self.assertEqual(client.received, b"pong")
        client.transport.loseConnection()
        server.transport.loseConnection()
        flow = yield proxy.nextClosed()
        self.assertIs(flow.startedBy, Moment.SYN)
        self.assertIs(flow.outcome, Outcome.OK)
        times = flow.times
        self.assertLessEqual(times.synSeen, times.outgoingStarted)
        self.assertLessEqual(times.outgoingStarted, times.accepted)
        self.assertEqual(proxy.service.early.pending, {})

    @defer.inlineCallbacks
    def test_acceptModeDoesNotTap(self):  # type: ignore[no-untyped-def]
        port, servers = self.network.server()
        proxy = yield self.network.startProxy(to=f"tcp:host=127.0.0.1:port={port}", mode="accept")
        client = yield self.network.connect(proxy.port)
        yield servers.nextPeer()
        client.transport.loseConnection()
        self.assertEqual(proxy.service.early._taps, {})

    @defer.inlineCallbacks
    def test_synFlood(self):  # type: ignore[no-untyped-def]
        """
        2,000 SYNs that never complete their handshake open no more
        upstream connections than the pending bound.
        """
        port, servers = self.network.server()
        bound = 50
        proxy = yield self.network.startProxy(
            to=f"tcp:host=127.0.0.1:port={port}", mode="early",
            limits={"max-pending-syns": bound, "max-pending-syns-per-source": 1000,
                    "syn-timeout": 30},
        )
        early = proxy.service.early
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.addCleanup(raw.close)
        total = 2000
        for i in range(total):
            # From 127.1.x.y: local, but no socket answers there, so the
            # SYN-ACK meets a RST and the handshake never completes.
            source = f"127.1.{i // 250}.{i % 250 + 1}"
            segment = tcp(10000 + i, proxy.port, i, SYN, b"", b"")
            check = _checksum(source, "127.0.0.1", segment)
            segment = segment[:16] + struct.pack("!H", check) + segment[18:]
            raw.sendto(ipv4(source, "127.0.0.1", segment), ("127.0.0.1", 0))
        yield waitUntil(
            lambda: early.overflows + len(early.pending) >= total,
            "the tap to see every SYN", timeout=20,
        )
        self.assertEqual(len(early.pending), bound)
        self.assertEqual(early.overflows, total - bound)
        # Every early leg reaches the server; no more than the bound.
        yield waitUntil(lambda: len(servers.peers) >= bound, "the early legs to connect")
        self.assertEqual(len(servers.peers), bound)
        self.assertEqual(len(proxy.service.table.flows), bound)


def _checksum(source: str, destination: str, segment: bytes) -> int:
    pseudo = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack(
        "!BBH", 0, socket.IPPROTO_TCP, len(segment)
    )
    data = pseudo + segment
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
