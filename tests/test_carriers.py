"""
Tests for L{miniproxy.carriers}: the PROXY v2 header read on the accepted
leg and written on the outgoing leg, on the fake-transport harness.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from attrs import evolve
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from miniproxy.address import DestinationSource, HostPort, NextHop
from miniproxy.carriers import (
    MAX_HEADER_LENGTH,
    ProxyV2Reader,
    applyHeader,
    headerBytes,
    hostName,
)
from miniproxy.config import EXPLICIT_CARRIERS, buildConfig
from miniproxy.earlysyn import EarlySyns
from miniproxy.errors import ConfigError
from miniproxy.flow import ConnectMode, Moment, Outcome
from miniproxy.functions.policy import configure as configurePolicy
from miniproxy.limits import Limits
from miniproxy.testing import FlowHarness, RecordingFunction
from miniproxy.verdict import CONTINUE
from miniproxy.wire.errors import MalformedInput
from miniproxy.wire.packet import SYN, TCPSegment
from miniproxy.wire.proxyv2 import (
    SIGNATURE,
    Command,
    Family,
    ProxyHeader,
    ProxyV2Parser,
    TLVType,
    Transport,
    encode,
)
from tests.test_earlysyn import FakeTap

#: The proxy that sends headers (trusted), and the original client.
PEER = HostPort("10.0.0.5", 40000)
ORIGIN = HostPort("198.51.100.7", 51515)
DESTINATION = HostPort("192.0.2.10", 80)
LOCAL = HostPort("203.0.113.1", 8080)
SERVER = NextHop(HostPort("203.0.113.99", 9000))

ALLOW_192 = {"rules": [{"action": "allow", "destinations": ["192.0.2.0/24"], "ports": [80]}]}


def header(
    source: HostPort = ORIGIN,
    destination: HostPort = DESTINATION,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    return encode(ProxyHeader.forStream(source, destination, tlvs))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for p in points + [len(data)]:
        chunks.append(data[last:p])
        last = p
    return [c for c in chunks if c]


def makeHarness(
    policy: dict | None = ALLOW_192,
    to: NextHop | None = None,
    mode: ConnectMode = ConnectMode.EARLY,
    trusted: tuple[str, ...] = ("10.0.0.0/8",),
    functions: tuple = (),
    limits: Limits = Limits(),
) -> FlowHarness:
    """
    A harness whose listener reads PROXY v2 headers from C{trusted}, with
    a policy function first (unless C{policy} is L{None}).
    """
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    chain: list[Any] = []
    if policy is not None:
        chain.append(("policy", configurePolicy(policy, reactor)))
    chain.extend(functions)
    harness = FlowHarness(
        chain, mode=mode, to=to, client=PEER, local=LOCAL, reactor=reactor, limits=limits
    )
    harness.context.settings = evolve(
        harness.context.settings,
        explicit=("proxy-v2",),
        trusted=tuple(ipaddress.ip_network(n) for n in trusted),
    )
    return harness


class ReadingTests(unittest.TestCase):
    """
    A listener with C{explicit = ["proxy-v2"]} reads each flow's header
    before it begins.
    """

    def test_destinationAndOrigin(self) -> None:
        """
        A PROXY header from a trusted peer gives the flow its explicit
        destination and origin; the policy allows it; the outgoing leg
        goes there; the header is not relayed nor counted.
        """
        harness = makeHarness()
        driver = harness.accept()
        flow = driver.flow
        self.assertEqual(driver.attempts, [])
        self.assertIs(flow.destinationSource, DestinationSource.NONE)
        driver.clientSends(header() + b"hello")
        self.assertEqual(flow.destination, DESTINATION)
        self.assertIs(flow.destinationSource, DestinationSource.EXPLICIT)
        self.assertEqual(flow.origin, ORIGIN)
        self.assertEqual(flow.client, PEER)
        self.assertTrue(flow.allowed)
        self.assertEqual(driver.dialed, NextHop(DESTINATION))
        self.assertIs(flow.startedBy, Moment.ACCEPT)
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), b"hello")
        self.assertEqual(flow.bytesFromClient, 5)
        driver.serverSends(b"world")
        self.assertEqual(driver.sentToClient(), b"world")
        driver.clientHalfCloses()
        driver.serverHalfCloses()
        self.assertIs(flow.outcome, Outcome.OK)

    def test_everySplit(self) -> None:
        """
        A header (with TLVs) followed by bytes, split in two at every
        boundary, gives the same flow: nothing is dialed before the last
        header byte, and the bytes after it arrive whole and in order.
        """
        tlvs = ((TLVType.UNIQUE_ID, b"abc123"), (TLVType.AUTHORITY, b"example.com"))
        head = header(tlvs=tlvs)
        data = head + b"GET / HTTP/1.0\r\n\r\n"
        for cut in range(len(data) + 1):
            harness = makeHarness()
            driver = harness.accept()
            sent = 0
            for chunk in split(data, [cut]):
                driver.clientSends(chunk)
                sent += len(chunk)
                if sent < len(head):
                    self.assertEqual(driver.attempts, [], cut)
                    self.assertIsNone(driver.flow.proxyHeader, cut)
            self.assertEqual(driver.dialed, NextHop(DESTINATION), cut)
            self.assertEqual(driver.flow.proxyHeader.tlvs, tlvs)
            driver.connectOutgoing()
            self.assertEqual(driver.sentToServer(), data[len(head):], cut)

    @given(
        st.lists(
            st.tuples(st.integers(0, 255), st.binary(max_size=100)), max_size=4
        ).map(tuple),
        st.binary(max_size=200),
        st.lists(st.integers(0, 10_000), max_size=10),
        st.sampled_from(list(ConnectMode)),
    )
    def test_anySplit(
        self, tlvs: tuple, after: bytes, cuts: list[int], mode: ConnectMode
    ) -> None:
        """
        In every connect mode, a header with any TLVs, split anywhere,
        followed by any bytes: the TLVs are kept, and exactly the bytes
        after the header reach the server, in order.
        """
        head = header(tlvs=tlvs)
        harness = makeHarness(mode=mode)
        driver = harness.accept()
        for chunk in split(head + after, cuts):
            driver.clientSends(chunk)
        flow = driver.flow
        self.assertIsNone(flow.outcome)
        self.assertEqual(flow.proxyHeader.tlvs, tlvs)
        self.assertEqual(flow.destination, DESTINATION)
        if mode is ConnectMode.FIRST_DATA and not after:
            self.assertEqual(driver.attempts, [])
            driver.clientHalfCloses()
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), after)
        self.assertEqual(flow.bytesFromClient, len(after))

    def test_hooksWaitForHeader(self) -> None:
        """
        The early-SYN hook runs when the header is complete, and sees the
        destination; the accepted hook comes after it.
        """
        seen: list[Any] = []

        def earlySyn(flow: Any) -> Any:
            seen.append((flow.destination, flow.origin, flow.proxyHeader is not None))
            return CONTINUE

        recorder = RecordingFunction("rec", verdicts={"earlySyn": earlySyn})
        harness = makeHarness(functions=(recorder,))
        driver = harness.accept()
        self.assertEqual(recorder.hooks(), [])
        head = header()
        driver.clientSends(head[:20])
        self.assertEqual(recorder.hooks(), [])
        driver.clientSends(head[20:])
        self.assertEqual(recorder.hooks(), ["earlySyn", "accepted"])
        self.assertEqual(seen, [(DESTINATION, ORIGIN, True)])

    def test_acceptMode(self) -> None:
        """
        In C{accept} mode the outgoing leg starts once the header is read.
        """
        harness = makeHarness(mode=ConnectMode.ACCEPT)
        driver = harness.accept()
        self.assertEqual(driver.attempts, [])
        driver.clientSends(header())
        self.assertEqual(driver.dialed, NextHop(DESTINATION))
        self.assertIs(driver.flow.startedBy, Moment.ACCEPT)

    def test_policyDenies(self) -> None:
        """
        A valid header naming a destination the policy does not allow is
        refused: no open relay.
        """
        harness = makeHarness()
        driver = harness.accept()
        driver.clientSends(header(destination=HostPort("192.0.2.10", 25)) + b"EHLO")
        flow = driver.flow
        self.assertIs(flow.outcome, Outcome.REFUSED)
        self.assertIn("denied by policy", flow.reason)
        self.assertEqual(driver.attempts, [])
        self.assertTrue(driver.clientLegClosed)
        self.assertEqual(driver.sentToClient(), b"")

    def test_policyByOrigin(self) -> None:
        """
        A policy rule with C{origins} decides by the client the trusted
        header names, not by the proxy that sent it.
        """
        byOrigin = {"rules": [{"action": "allow", "origins": ["198.51.100.0/24"]}]}
        driver = makeHarness(policy=byOrigin).accept()
        driver.clientSends(header() + b"hi")
        self.assertTrue(driver.flow.allowed)
        self.assertEqual(driver.dialed, NextHop(DESTINATION))
        driver = makeHarness(policy=byOrigin).accept()
        driver.clientSends(header(source=HostPort("203.0.113.9", 1)) + b"hi")
        self.assertIs(driver.flow.outcome, Outcome.REFUSED)
        self.assertEqual(driver.attempts, [])

    def test_noPolicyRefuses(self) -> None:
        """
        Without any function allowing it, an explicit destination is
        refused, even with a static C{to}.
        """
        harness = makeHarness(policy=None, to=SERVER)
        driver = harness.accept()
        driver.clientSends(header())
        self.assertIs(driver.flow.outcome, Outcome.REFUSED)
        self.assertIn("explicit destination 192.0.2.10:80 not allowed", driver.flow.reason)
        self.assertEqual(driver.attempts, [])

    def test_staticToStaysNextHop(self) -> None:
        """
        With a static C{to}, the header's destination is the flow's but the
        next hop is C{to}.
        """
        harness = makeHarness(to=SERVER)
        driver = harness.accept()
        driver.clientSends(header())
        self.assertEqual(driver.flow.destination, DESTINATION)
        self.assertEqual(driver.dialed, SERVER)

    def test_untrusted(self) -> None:
        """
        A peer outside C{trusted} is refused at accept, before it sends
        anything, and its header is never read: the client leg is closed,
        not reset, and nothing is dialed.
        """
        harness = makeHarness()
        driver = harness.accept(client=HostPort("172.16.0.1", 5000))
        flow = driver.flow
        self.assertIs(flow.outcome, Outcome.REFUSED)
        self.assertEqual(
            flow.reason, "peer 172.16.0.1 is not trusted to send a PROXY v2 header"
        )
        self.assertTrue(driver.clientLegClosed)
        self.assertFalse(driver.clientLegReset)
        self.assertEqual(harness.closedFlows, [flow])
        self.assertEqual(harness.table.flows, set())
        driver.clientSends(header())
        self.assertIsNone(flow.destination)
        self.assertIsNone(flow.proxyHeader)
        self.assertEqual(harness.dialer.attempts, [])

    def test_malformed(self) -> None:
        """
        Anything that is not a valid v2 header refuses the flow with a
        clear reason and a clean close.
        """
        good = header()
        cases = {
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n": "not a PROXY protocol v2 signature",
            b"GET / HTTP/1.1\r\n\r\n": "not a PROXY protocol v2 signature",
            SIGNATURE + b"\x11": "version 1, not 2",
            SIGNATURE + b"\x21\x11\x00\x0e" + bytes(12) + b"\x01\x00": "truncated TLV",
            good[:12] + b"\x2f" + good[13:]: "unknown command 15",
        }
        for data, message in cases.items():
            harness = makeHarness()
            driver = harness.accept()
            driver.clientSends(data)
            flow = driver.flow
            self.assertIs(flow.outcome, Outcome.REFUSED, data)
            self.assertIn("malformed PROXY v2 header", flow.reason)
            self.assertIn(message, flow.reason)
            self.assertTrue(driver.clientLegClosed)
            self.assertFalse(driver.clientLegReset)
            self.assertEqual(driver.attempts, [])
            self.assertEqual(harness.closedFlows, [flow])

    def test_oversize(self) -> None:
        """
        A header longer than L{MAX_HEADER_LENGTH} is refused as soon as its
        length is read, not after buffering it.
        """
        harness = makeHarness()
        driver = harness.accept()
        big = header(tlvs=((TLVType.NOOP, bytes(MAX_HEADER_LENGTH)),))
        driver.clientSends(big[:16])
        self.assertIs(driver.flow.outcome, Outcome.REFUSED)
        self.assertIn(f"exceeds {MAX_HEADER_LENGTH}", driver.flow.reason)
        # The largest accepted header is read.
        fits = header(tlvs=((TLVType.NOOP, bytes(MAX_HEADER_LENGTH - 16 - 12 - 3)),))
        self.assertEqual(len(fits), MAX_HEADER_LENGTH)
        driver = makeHarness().accept()
        driver.clientSends(fits)
        self.assertEqual(driver.dialed, NextHop(DESTINATION))

    def test_unusableHeaders(self) -> None:
        """
        Well-formed headers that name no usable TCP destination are
        refused, each with its reason.
        """
        unix = ProxyHeader(Command.PROXY, None, None, Family.UNIX, Transport.STREAM)
        body = bytes(216)
        unixBytes = SIGNATURE + b"\x21\x31" + struct.pack("!H", len(body)) + body
        dgram = bytearray(header())
        dgram[13] = 0x12
        cases = {
            unixBytes: "UNIX addresses",
            bytes(dgram): "DGRAM, not a TCP stream",
            header(destination=HostPort("0.0.0.0", 80)): "names no destination",
            header(destination=HostPort("192.0.2.10", 0)): "port 0",
            header(
                destination=HostPort("0.0.0.0", 80),
                tlvs=((TLVType.AUTHORITY, b"not a name!"),),
            ): "is not a host name",
        }
        self.assertEqual(unix.family, Family.UNIX)
        for data, message in cases.items():
            driver = makeHarness().accept()
            driver.clientSends(data)
            self.assertIs(driver.flow.outcome, Outcome.REFUSED, data)
            self.assertIn(message, driver.flow.reason)

    def test_authority(self) -> None:
        """
        An unspecified destination address with an C{AUTHORITY} TLV names
        the destination by host name; with a real address the TLV is only
        kept.
        """
        policy = {"rules": [{"action": "allow", "destinations": ["example.com"]}]}
        driver = makeHarness(policy=policy).accept()
        driver.clientSends(
            header(
                destination=HostPort("0.0.0.0", 443),
                tlvs=((TLVType.AUTHORITY, b"Example.COM."),),
            )
        )
        self.assertEqual(driver.flow.destination, HostPort("example.com", 443))
        self.assertEqual(driver.dialed, NextHop(HostPort("example.com", 443)))
        driver = makeHarness().accept()
        driver.clientSends(header(tlvs=((TLVType.AUTHORITY, b"sni.example"),)))
        self.assertEqual(driver.flow.destination, DESTINATION)
        self.assertEqual(driver.flow.proxyHeader.tlv(TLVType.AUTHORITY), b"sni.example")

    def test_mappedAddresses(self) -> None:
        """
        IPv4-mapped IPv6 addresses are taken as IPv4 (so IPv4 policy rules
        match them).
        """
        driver = makeHarness().accept()
        driver.clientSends(
            header(HostPort("::ffff:198.51.100.7", 1), HostPort("::ffff:192.0.2.10", 80))
        )
        self.assertEqual(driver.flow.origin, HostPort("198.51.100.7", 1))
        self.assertEqual(driver.dialed, NextHop(DESTINATION))

    def test_localWithStaticTo(self) -> None:
        """
        The LOCAL command (a health check) carries no destination: the flow
        goes to the listener's static C{to}, with no origin.
        """
        harness = makeHarness(policy=None, to=SERVER)
        driver = harness.accept()
        local = encode(ProxyHeader(Command.LOCAL, tlvs=((TLVType.NOOP, b"x"),)))
        driver.clientSends(local + b"ping")
        flow = driver.flow
        self.assertIsNone(flow.outcome)
        self.assertIs(flow.destinationSource, DestinationSource.STATIC)
        self.assertIsNone(flow.origin)
        self.assertIs(flow.proxyHeader.command, Command.LOCAL)
        self.assertEqual(flow.proxyHeader.tlvs, ((TLVType.NOOP, b"x"),))
        self.assertEqual(driver.dialed, SERVER)
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), b"ping")

    def test_localWithoutTo(self) -> None:
        """
        Without a static C{to} (nor a policy next hop), a LOCAL flow has no
        destination and is refused cleanly.  A PROXY command with the
        UNSPEC family is the same.
        """
        unspec = encode(ProxyHeader(Command.PROXY, None, None, Family.UNSPEC))
        for data in (encode(ProxyHeader(Command.LOCAL)), unspec):
            driver = makeHarness(policy=None).accept()
            driver.clientSends(data)
            self.assertIs(driver.flow.outcome, Outcome.REFUSED)
            self.assertIn("no destination", driver.flow.reason)
            self.assertTrue(driver.clientLegClosed)
            self.assertEqual(driver.attempts, [])

    def test_localWithPolicyNextHop(self) -> None:
        """
        A policy rule's next hop serves a LOCAL flow too.
        """
        policy = {"rules": [{"action": "allow", "next-hop": "tcp:203.0.113.99:9000"}]}
        driver = makeHarness(policy=policy).accept()
        driver.clientSends(encode(ProxyHeader(Command.LOCAL)))
        self.assertEqual(driver.dialed, SERVER)

    def test_finBeforeHeader(self) -> None:
        """
        A client that closes before its header is complete is refused.
        """
        driver = makeHarness().accept()
        driver.clientSends(header()[:10])
        driver.clientHalfCloses()
        self.assertIs(driver.flow.outcome, Outcome.REFUSED)
        self.assertIn("closed before its PROXY v2 header was complete", driver.flow.reason)
        self.assertTrue(driver.closed)
        driver = makeHarness().accept()
        driver.clientCloses()
        self.assertIs(driver.flow.outcome, Outcome.REFUSED)

    def test_resetBeforeHeader(self) -> None:
        """
        A client reset while the header is read ends the flow as a reset
        and cancels the header deadline.
        """
        harness = makeHarness()
        driver = harness.accept()
        self.assertEqual(len(harness.reactor.getDelayedCalls()), 2)  # idle, header
        driver.clientResets()
        self.assertIs(driver.flow.outcome, Outcome.RESET)
        self.assertEqual(harness.reactor.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        """
        A header not complete within C{limits.synTimeout} refuses the flow.
        """
        harness = makeHarness(limits=Limits(synTimeout=2.0))
        driver = harness.accept()
        driver.clientSends(header()[:5])
        harness.advance(1.9)
        self.assertIsNone(driver.flow.outcome)
        harness.advance(0.2)
        self.assertIs(driver.flow.outcome, Outcome.REFUSED)
        self.assertEqual(driver.flow.reason, "no complete PROXY v2 header within 2s")
        self.assertTrue(driver.clientLegClosed)
        # A header completed in time cancels the deadline.
        harness = makeHarness(limits=Limits(synTimeout=2.0, idleTimeout=0))
        driver = harness.accept()
        driver.clientSends(header())
        self.assertEqual(
            [c for c in harness.reactor.getDelayedCalls() if c.active()],
            [driver.attempt._timeoutCall],
        )

    def test_tableCountsWaitingFlows(self) -> None:
        """
        A flow waiting for its header counts against the flow limits.
        """
        harness = makeHarness(limits=Limits(maxFlowsPerSource=1))
        first = harness.accept()
        self.assertIn(first.flow, harness.table.flows)
        second = harness.accept(client=HostPort(PEER.host, 40001))
        self.assertTrue(second.refusedAtAccept)

    def test_readerIgnoresBugs(self) -> None:
        """
        An unexpected error while applying a header refuses the flow instead
        of escaping into the reactor's read loop.
        """
        from miniproxy import carriers

        def broken(flow: Any, header: Any) -> None:
            raise RuntimeError("bug")

        self.patch(carriers, "applyHeader", broken)
        driver = makeHarness().accept()
        driver.clientSends(header())
        self.assertIs(driver.flow.outcome, Outcome.REFUSED)
        self.assertIn("could not be read", driver.flow.reason)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_accessLog(self) -> None:
        """
        The access-log line shows the origin.
        """
        from miniproxy.accesslog import _FORMAT, flowFields

        driver = makeHarness().accept()
        driver.clientSends(header())
        driver.connectOutgoing()
        driver.clientHalfCloses()
        driver.serverHalfCloses()
        fields = flowFields(driver.flow)
        self.assertEqual(fields["origin"], str(ORIGIN))
        self.assertIn(f" origin={ORIGIN} ", _FORMAT.format(**fields) + " ")


class AtSynTests(unittest.TestCase):
    """
    A flow begun at its SYN (by the SYN tap) gets its destination at the
    SYN when the SYN carries the header as data (TCP Fast Open), and waits
    for it otherwise.
    """

    def setUp(self) -> None:
        self.harness = makeHarness(limits=Limits(synTimeout=3.0))
        self.early = EarlySyns(
            self.harness.reactor, self.harness.limits, makeTap=lambda *a: FakeTap(*a)
        )
        self.harness.context.early = self.early
        self.early.register(self.harness.context, None, {LOCAL.port})

    def syn(self, payload: bytes, client: HostPort = PEER) -> TCPSegment:
        segment = TCPSegment(client, LOCAL, 1, SYN, (), payload)
        self.early.synArrived(segment)
        return segment

    def test_headerInSyn(self) -> None:
        """
        The destination is known at the SYN: the outgoing leg starts there;
        the accepted leg strips the header, however it is split, and
        relays what follows.
        """
        head = header()
        self.syn(head + b"GET")
        [attempt] = self.harness.dialer.attempts
        self.assertEqual(attempt.nextHop, NextHop(DESTINATION))
        flow = attempt.factory.flow
        self.assertIs(flow.startedBy, Moment.SYN)
        self.assertEqual(flow.origin, ORIGIN)
        driver = self.harness.accept()
        self.assertIs(driver.flow, flow)
        for chunk in split(head + b"GET / HTTP/1.0\r\n\r\n", [5, 30]):
            driver.clientSends(chunk)
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(flow.bytesFromClient, len(b"GET / HTTP/1.0\r\n\r\n"))

    def test_streamDiffers(self) -> None:
        """
        A stream that does not begin with the header the SYN carried is
        refused, and the leg begun at the SYN is reset.
        """
        self.syn(header())
        driver = self.harness.accept()
        driver.connectOutgoing()
        driver.clientSends(header(destination=HostPort("192.0.2.11", 80)))
        self.assertIs(driver.flow.outcome, Outcome.REFUSED)
        self.assertIn("does not begin with the PROXY v2 header its SYN carried",
                      driver.flow.reason)
        self.assertTrue(driver.serverLegReset)
        self.assertEqual(driver.sentToServer(), b"")

    def test_noHeaderInSyn(self) -> None:
        """
        A SYN without data (or with part of a header): the flow waits for
        the header, and starts its outgoing leg when it is read.
        """
        head = header()
        for payload in (b"", head[:20]):
            self.syn(payload, client=HostPort(PEER.host, 41000 + len(payload)))
            self.assertEqual(self.harness.dialer.attempts, [])
            driver = self.harness.accept(client=HostPort(PEER.host, 41000 + len(payload)))
            flow = driver.flow
            self.assertIsNotNone(flow.times.synSeen)
            driver.clientSends(head + b"x")
            self.assertEqual(driver.dialed, NextHop(DESTINATION))
            self.assertIs(flow.startedBy, Moment.ACCEPT)
            driver.connectOutgoing()
            self.assertEqual(driver.sentToServer(), b"x")
            self.harness.dialer.attempts.clear()

    def test_refusedAtSyn(self) -> None:
        """
        An untrusted peer (with or without a header), a malformed header
        in the SYN, or a header policy denies: refused at the SYN, and the
        accepted leg is closed at once.
        """
        cases = [
            (HostPort("172.16.0.1", 1), header(), "not trusted"),
            (HostPort("172.16.0.1", 2), b"", "not trusted"),
            (HostPort(PEER.host, 3), b"PROXY TCP4", "malformed PROXY v2 header in the SYN"),
            (HostPort(PEER.host, 4), header(destination=HostPort("0.0.0.0", 1)),
             "names no destination"),
            (HostPort(PEER.host, 5), header(destination=HostPort("192.0.2.1", 25)),
             "denied by policy"),
        ]
        for client, payload, message in cases:
            self.syn(payload, client=client)
            flow = self.harness.closedFlows[-1]
            self.assertIs(flow.outcome, Outcome.REFUSED)
            self.assertIn(message, flow.reason)
            driver = self.harness.accept(client=client)
            self.assertIs(driver.flow, flow)
            self.assertTrue(driver.clientLegClosed)
        self.assertEqual(self.harness.dialer.attempts, [])

    def test_timeoutBeforeAccept(self) -> None:
        """
        The header deadline runs from the SYN.
        """
        self.syn(b"")
        self.harness.advance(2.0)
        driver = self.harness.accept()
        driver.clientSends(header()[:3])
        self.harness.advance(1.5)
        self.assertIs(driver.flow.outcome, Outcome.REFUSED)
        self.assertIn("no complete PROXY v2 header within 3s", driver.flow.reason)


class WritingTests(unittest.TestCase):
    """
    A next hop with C{carry=proxy-v2} gets the header as the first bytes
    of its outgoing leg.
    """

    def parse(self, data: bytes) -> tuple[ProxyHeader, bytes]:
        header, rest = ProxyV2Parser().feed(data)
        self.assertIsNotNone(header)
        return header, rest

    def test_staticTo(self) -> None:
        """
        A plain flow to a static C{to} with C{carry}: the header names the
        client and the next hop, before the bytes held while connecting.
        """
        to = NextHop.fromString("tcp:host=203.0.113.99:port=9000:carry=proxy-v2")
        harness = FlowHarness(to=to, client=ORIGIN)
        driver = harness.accept()
        driver.clientSends(b"early bytes")
        self.assertEqual(driver.sentToServer(), b"")
        driver.connectOutgoing()
        written, rest = self.parse(driver.sentToServer())
        self.assertEqual(written.source, ORIGIN)
        self.assertEqual(written.destination, to.address)
        self.assertEqual(rest, b"early bytes")
        driver.clientSends(b" later")
        self.assertEqual(self.parse(driver.sentToServer())[1], b"early bytes later")
        self.assertEqual(driver.flow.bytesFromClient, len(b"early bytes later"))

    def test_otherCarrier(self) -> None:
        """
        A carrier that is not in the stream (the TCP option) writes no
        preamble.
        """
        to = NextHop.fromString("tcp:host=203.0.113.99:port=9000:carry=tcp-option")
        driver = FlowHarness(to=to).accept()
        driver.clientSends(b"x")
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), b"x")

    def test_beforeHookWrites(self) -> None:
        """
        The header comes before bytes a function writes when the leg
        connects.
        """

        def connected(flow: Any) -> Any:
            flow.writeToServer(b"from a hook")
            return CONTINUE

        recorder = RecordingFunction("rec", verdicts={"outgoingConnected": connected})
        to = NextHop.fromString("tcp:host=203.0.113.99:port=9000:carry=proxy-v2")
        driver = FlowHarness([recorder], to=to).accept()
        driver.connectOutgoing()
        self.assertEqual(self.parse(driver.sentToServer())[1], b"from a hook")

    def test_noCarry(self) -> None:
        """
        Without C{carry}, nothing is added.
        """
        driver = FlowHarness().accept()
        driver.clientSends(b"x")
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), b"x")

    def test_relaysOrigin(self) -> None:
        """
        A flow that came with a header, sent on by a policy C{chain} whose
        first hop carries: that hop is told the origin and the final
        destination; the rest of the chain is not encoded.
        """
        policy = {"rules": [{
            "action": "allow", "destinations": ["192.0.2.0/24"],
            "chain": ["tcp:host=203.0.113.99:port=9000:carry=proxy-v2",
                      "tcp:host=203.0.113.100:port=9001:carry=proxy-v2"],
        }]}
        driver = makeHarness(policy=policy).accept()
        driver.clientSends(header(tlvs=((TLVType.UNIQUE_ID, b"id"),)) + b"data")
        self.assertEqual(driver.dialed.address, HostPort("203.0.113.99", 9000))
        self.assertEqual(len(driver.flow.chain), 1)
        driver.connectOutgoing()
        written, rest = self.parse(driver.sentToServer())
        self.assertEqual((written.source, written.destination), (ORIGIN, DESTINATION))
        self.assertEqual(written.tlvs, ())
        self.assertEqual(rest, b"data")

    def test_nameDestination(self) -> None:
        """
        A destination known by name is written as the unspecified address
        with an C{AUTHORITY} TLV, which a reading miniproxy turns back into
        the name.
        """
        policy = {"rules": [{
            "action": "allow", "destinations": ["example.com"],
            "next-hop": "tcp:host=203.0.113.99:port=9000:carry=proxy-v2",
        }]}
        driver = makeHarness(policy=policy).accept()
        driver.clientSends(
            header(destination=HostPort("0.0.0.0", 443),
                   tlvs=((TLVType.AUTHORITY, b"example.com"),))
        )
        driver.connectOutgoing()
        written, _ = self.parse(driver.sentToServer())
        self.assertEqual(written.destination, HostPort("0.0.0.0", 443))
        self.assertEqual(written.tlv(TLVType.AUTHORITY), b"example.com")
        flow = makeHarness(policy=policy).accept().flow
        self.assertIsNone(applyHeader(flow, written))
        self.assertEqual(flow.destination, HostPort("example.com", 443))

    def test_cannotWrite(self) -> None:
        """
        A destination that cannot be written refuses the flow before it
        dials.
        """
        policy = {"rules": [{
            "action": "allow",
            "next-hop": "tcp:host=203.0.113.99:port=9000:carry=proxy-v2",
        }]}
        harness = makeHarness(policy=policy, trusted=("0.0.0.0/0",))
        # A name no header can carry, set by a function before the policy.
        from miniproxy.flow import Flow

        flow = Flow(harness.context, PEER, LOCAL)
        flow.destination = HostPort("bad name!", 80)
        flow.destinationSource = DestinationSource.EXPLICIT
        flow.begin(Moment.ACCEPT)
        self.assertIs(flow.outcome, Outcome.REFUSED)
        self.assertIn("cannot write a proxy-v2 header", flow.reason)
        self.assertEqual(harness.dialer.attempts, [])

    @given(
        st.sampled_from(["v4", "v6"]),
        st.sampled_from(["v4", "v6", "mapped", "name"]),
        st.integers(1, 65535),
        st.integers(1, 65535),
        st.integers(1, 2**32 - 1),
    )
    def test_roundTrip(
        self, sourceKind: str, destinationKind: str, sport: int, dport: int, n: int
    ) -> None:
        """
        What the writer writes, the reader reads back: the same origin and
        destination (IPv4-mapped addresses as IPv4), whatever the families.
        """

        def host(kind: str) -> str:
            if kind == "v4":
                return str(ipaddress.IPv4Address(n))
            if kind == "v6":
                return str(ipaddress.IPv6Address(n << 64 | 1))
            if kind == "mapped":
                return f"::ffff:{ipaddress.IPv4Address(n)}"
            return f"h{n}.example"

        source = HostPort(host(sourceKind), sport)
        destination = HostPort(host(destinationKind), dport)
        data = headerBytes(source, destination)
        written, rest = self.parse(data)
        self.assertEqual(rest, b"")
        flow = makeHarness().accept().flow
        self.assertIsNone(applyHeader(flow, written))
        expected = destination
        if destinationKind == "mapped":
            expected = HostPort(str(ipaddress.IPv4Address(n)), dport)
        self.assertEqual(flow.destination, expected)
        self.assertEqual(flow.origin, source)

    def test_writerErrors(self) -> None:
        with self.assertRaises(MalformedInput):
            headerBytes(HostPort("a.name", 1), DESTINATION)
        with self.assertRaises(MalformedInput):
            headerBytes(ORIGIN, HostPort("-bad-", 1))


class SettingsTests(unittest.TestCase):
    """
    The C{carry} parameter of next hops and the C{proxy-v2} carrier of
    listeners.
    """

    def test_carry(self) -> None:
        hop = NextHop.fromString("tcp:host=127.0.0.1:port=80:carry=proxy-v2")
        self.assertEqual(hop.carry, "proxy-v2")
        self.assertIsNone(NextHop.fromString("tcp:127.0.0.1:80").carry)
        with self.assertRaises(ConfigError) as raised:
            NextHop.fromString("tcp:host=127.0.0.1:port=80:carry=proxy-v1")
        self.assertIn("carry must be one of proxy-v2", str(raised.exception))
        with self.assertRaises(ConfigError) as raised:
            NextHop.fromString("tls:host=example.com:port=443:carry=proxy-v2")
        self.assertIn("carry is for plain tcp next hops", str(raised.exception))

    def test_policyCarry(self) -> None:
        """
        Policy C{next-hop} and C{chain} entries take C{carry}.
        """
        policy = configurePolicy(
            {"rules": [{"action": "allow", "chain": [
                "tcp:host=10.0.0.1:port=1:carry=proxy-v2", "tcp:10.0.0.2:2"]}]},
            None,
        )
        [rule] = policy.rules
        self.assertEqual(rule.nextHop.carry, "proxy-v2")
        self.assertIsNone(rule.chain[0].carry)

    def test_listener(self) -> None:
        self.assertIn("proxy-v2", EXPLICIT_CARRIERS)
        config = buildConfig({"listeners": [{
            "endpoint": "tcp:0", "explicit": ["proxy-v2"], "trusted": ["127.0.0.0/8"],
        }]})
        [listener] = config.listeners
        self.assertEqual(listener.explicit, ("proxy-v2",))
        with self.assertRaises(ConfigError):
            buildConfig({"listeners": [{"endpoint": "tcp:0", "explicit": ["proxy-v2"]}]})

    def test_hostName(self) -> None:
        self.assertEqual(hostName(b"Example.COM."), "example.com")
        self.assertEqual(hostName("bücher.example".encode()), "xn--bcher-kva.example")
        for bad in (b"", b"a..b", b"-a.b", b"1.2.3.4", b"\xff", b"a" * 64 + b".b"):
            self.assertIsNone(hostName(bad), bad)

    def test_readerAfterDone(self) -> None:
        """
        A reader fed after it is done passes bytes through.
        """
        from twisted.internet.testing import MemoryReactorClock

        flow = makeHarness().accept().flow
        reader = ProxyV2Reader(flow, MemoryReactorClock(), 0)
        self.assertEqual(reader.feed(flow, header() + b"a"), b"a")
        self.assertEqual(reader.feed(flow, b"b"), b"b")


FASTOPEN_SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"


def _writeFastOpenSysctl(value: str) -> None:
    with open(FASTOPEN_SYSCTL, "w") as f:
        f.write(value)


class FastOpenSynTests(unittest.TestCase):
    """
    On real loopback sockets, a client whose Fast Open SYN carries the
    header (and its first bytes) has its flow's outgoing leg started at
    that SYN, by the SYN tap, to the destination the header names.
    """

    def setUp(self) -> None:
        import os

        from tests.support import Network

        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root: the SYN tap and the tcp_fastopen sysctl")
        with open(FASTOPEN_SYSCTL) as f:
            before = f.read().strip()
        self.addCleanup(_writeFastOpenSysctl, before)
        # Client and server Fast Open.
        _writeFastOpenSysctl("3")
        self.network = Network(self)

    def test_headerInSyn(self) -> Any:
        import socket

        from twisted.internet import defer, threads

        from miniproxy.tcpclient import TCP_FASTOPEN_CONNECT

        network = self.network
        head = headerBytes(ORIGIN, DESTINATION)

        def fastOpenClient(port: int, message: bytes) -> bytes:
            # Blocking, in a thread: connect() waits for the first write,
            # which rides in the SYN once the kernel holds a cookie.
            c = socket.socket()
            try:
                c.settimeout(10)
                c.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
                c.connect(("127.0.0.1", port))
                c.sendall(head + message)
                c.shutdown(socket.SHUT_WR)
                chunks = []
                while True:
                    data = c.recv(4096)
                    if not data:
                        return b"".join(chunks)
                    chunks.append(data)
            finally:
                c.close()

        @defer.inlineCallbacks
        def run() -> Any:
            echo, servers = network.server(echo=True)
            proxy = yield network.startProxy(
                to=None, listen=None,
                document={
                    "listeners": [{
                        "endpoint": "tcp:0:interface=127.0.0.1",
                        "to": f"tcp:host=127.0.0.1:port={echo}",
                        "explicit": ["proxy-v2"],
                        "trusted": ["127.0.0.0/8"],
                    }],
                    "functions": ["policy"],
                    "function": {"policy": ALLOW_192},
                },
            )
            flows = []
            for i in range(3):
                message = b"hello %d" % i
                got = yield threads.deferToThread(fastOpenClient, proxy.port, message)
                self.assertEqual(got, message)
                flow = yield proxy.nextClosed()
                self.assertIs(flow.outcome, Outcome.OK)
                self.assertEqual((flow.origin, flow.destination), (ORIGIN, DESTINATION))
                self.assertEqual(flow.bytesFromClient, len(message))
                flows.append(flow)
            # A first SYN may only ask for a cookie (unless the kernel holds
            # one from before): that flow waits for its header after
            # accept.  Once the cookie is held, the header is in the SYN
            # and the outgoing leg starts there, before the accept.
            self.assertIn(flows[0].startedBy, (Moment.ACCEPT, Moment.SYN))
            for flow in flows[1:]:
                self.assertIs(flow.startedBy, Moment.SYN)
                self.assertLessEqual(flow.times.outgoingStarted, flow.times.accepted)

        return run()
