"""
Tests for L{miniproxy.optionemitter}: the flow address TCP option written
into outgoing SYNs, and a chain of proxies that learns its destination from
it.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from miniproxy.address import DestinationSource, HostPort, NextHop
from miniproxy.connect import flowAddressOption
from miniproxy.errors import ConfigError
from miniproxy.flow import Moment, Outcome
from miniproxy.optionemitter import OptionEmitter
from miniproxy.wire import tcpoption
from miniproxy.wire.packet import SYN, ACK, parseIP
from tests.support import Network
from tests.test_wire_packet import ipv4, tcp, tcpChecksumValid

LINUX_OPTIONS = bytes.fromhex("020405b40402080a0000000100000000" "01030307")


class EmitterPacketTests(unittest.TestCase):
    """
    The emitter adds the option to exactly the SYNs it expects.
    """

    def setUp(self) -> None:
        self.emitter = OptionEmitter(MemoryReactorClock())
        self.option = tcpoption.FlowAddressOption(HostPort("192.0.2.9", 80), HostPort("10.0.0.1", 4000))
        self.emitter.expect(40000, HostPort("10.0.0.2", 9000), self.option)

    def syn(self, sport: int = 40000, flags: int = SYN) -> bytes:
        return ipv4("10.0.0.1", "10.0.0.2", tcp(sport, 9000, 1, flags, LINUX_OPTIONS, b""))

    def test_expected(self) -> None:
        changed = self.emitter._packet(self.syn())
        self.assertEqual(tcpoption.find(list(parseIP(changed).options)), self.option)
        self.assertTrue(tcpChecksumValid(changed))
        # A retransmitted SYN gets it too, until the leg is forgotten.
        self.assertNotEqual(self.emitter._packet(self.syn()), self.syn())
        self.assertEqual(self.emitter.emitted, 2)
        self.emitter.forget(40000, HostPort("10.0.0.2", 9000))
        packet = self.syn()
        self.assertIs(self.emitter._packet(packet), packet)

    def test_others(self) -> None:
        for packet in (self.syn(sport=40001), self.syn(flags=SYN | ACK), b"\x45garbage"):
            self.assertIs(self.emitter._packet(packet), packet)
        self.assertEqual(self.emitter.emitted, 0)

    def test_noRoom(self) -> None:
        self.emitter.expect(40000, HostPort("10.0.0.2", 9000),
                            tcpoption.FlowAddressOption(HostPort("::1", 80), HostPort("::2", 1)))
        packet = self.syn()
        self.assertIs(self.emitter._packet(packet), packet)
        self.assertEqual(self.emitter.skipped, 1)

    def test_optionForm(self) -> None:
        """
        IPv4 flows carry the 4-tuple; IPv6 ones the destination only; a
        name cannot be carried.
        """
        self.assertEqual(
            flowAddressOption(HostPort("10.0.0.1", 1), HostPort("10.0.0.2", 2)).source,
            HostPort("10.0.0.1", 1),
        )
        self.assertIsNone(flowAddressOption(HostPort("::1", 1), HostPort("::2", 2)).source)
        self.assertIsNone(flowAddressOption(HostPort("::1", 1), HostPort("10.0.0.2", 2)).source)
        with self.assertRaises(OSError):
            flowAddressOption(HostPort("::1", 1), HostPort("example.com", 2))

    def test_rules(self) -> None:
        """
        start() installs an iptables rule (and an ip6tables one where it
        can) and stop() removes exactly them.
        """
        if os.geteuid() != 0:
            raise unittest.SkipTest("the netfilter queue needs CAP_NET_ADMIN (run as root)")
        commands: list[list[str]] = []

        def run(command: list[str], **kwargs: Any) -> Any:
            commands.append(command)
            return subprocess.CompletedProcess(command, 0, "", "")

        emitter = OptionEmitter(MemoryReactorClock(), queue=0x4D51, run=run)
        emitter.start()
        self.addCleanup(emitter.stop)
        emitter.start()
        added = [c for c in commands if "-A" in c]
        self.assertEqual([c[0] for c in added], ["iptables", "ip6tables"])
        self.assertIn("--queue-bypass", added[0])
        emitter.stop()
        removed = [c for c in commands if "-D" in c]
        self.assertEqual(
            removed, [["-D" if part == "-A" else part for part in c] for c in added]
        )
        self.assertFalse(emitter.running)

    def test_staleRules(self) -> None:
        """
        A rule left by a miniproxy process that is gone (killed before it
        could remove it) is removed when an emitter starts; one of a live
        process, and anything not miniproxy's, is left alone.
        """
        dead = subprocess.Popen(["true"])
        dead.wait()
        listing = "\n".join([
            "-P OUTPUT ACCEPT",
            f'-A OUTPUT -p tcp -m mark --mark 0x4d50 -m comment --comment miniproxy-{dead.pid} -j NFQUEUE --queue-num 19792 --queue-bypass',
            f'-A OUTPUT -p tcp -m comment --comment "miniproxy-{os.getpid()}" -j NFQUEUE --queue-num 19792',
            "-A OUTPUT -p udp -j ACCEPT",
        ])
        commands: list[list[str]] = []

        def run(command: list[str], **kwargs: Any) -> Any:
            commands.append(command)
            return subprocess.CompletedProcess(command, 0, listing if "-S" in command else "", "")

        emitter = OptionEmitter(MemoryReactorClock(), run=run)
        self.assertEqual(emitter.removeStale("iptables"), 1)
        [deletion] = [c for c in commands if "-D" in c]
        self.assertEqual(deletion[:5], ["iptables", "-t", "mangle", "-D", "OUTPUT"])
        self.assertIn(f"miniproxy-{dead.pid}", deletion)

    def test_carryParsed(self) -> None:
        self.assertEqual(NextHop.fromString("tcp:host=10.0.0.1:port=1:carry=tcp-option").carry, "tcp-option")
        with self.assertRaises(ConfigError):
            NextHop.fromString("tcp:host=10.0.0.1:port=1:carry=pigeon")


def mangleRules() -> str:
    return subprocess.run(
        ["iptables", "-t", "mangle", "-S", "OUTPUT"], capture_output=True, text=True
    ).stdout


class ChainTests(unittest.TestCase):
    """
    Two proxies in a chain on loopback: the first one's outgoing SYN
    carries the flow's destination in the TCP option, and the second one
    learns it at that SYN.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root: SYN tap, SO_MARK, iptables, netfilter queue")
        self.network = Network(self)

    @defer.inlineCallbacks
    def test_destinationAtSyn(self):  # type: ignore[no-untyped-def]
        port, servers = self.network.server()
        second = yield self.network.startProxy(
            to=None,
            mode="early",
            listen=None,
            document={
                "listeners": [{
                    "endpoint": "tcp:0:interface=127.0.0.1",
                    "explicit": ["tcp-option"],
                    "trusted": ["127.0.0.0/8"],
                }],
                "functions": ["policy"],
                "function": {"policy": {"rules": [
                    {"action": "allow", "destinations": ["127.0.0.1/32"], "ports": [port]},
                ]}},
            },
        )
        first = yield self.network.startProxy(
            to=f"tcp:host=127.0.0.1:port={port}",
            mode="early",
            functionNames=["policy"],
            document={"function": {"policy": {"rules": [{
                "action": "allow",
                "next-hop": f"tcp:host=127.0.0.1:port={second.port}:carry=tcp-option",
            }]}}},
        )
        client = yield self.network.connect(first.port)
        client.transport.write(b"through two proxies")
        server = yield servers.nextPeer()
        yield server.waitForBytes(19)
        self.assertEqual(server.received, b"through two proxies")
        server.transport.write(b"back")
        yield client.waitForBytes(4)
        self.assertEqual(client.received, b"back")
        client.transport.loseConnection()
        server.transport.loseConnection()
        near = yield first.nextClosed()
        far = yield second.nextClosed()
        self.assertIs(near.outcome, Outcome.OK)
        self.assertIs(far.outcome, Outcome.OK)
        self.assertEqual(far.destination, HostPort("127.0.0.1", port))
        self.assertIs(far.destinationSource, DestinationSource.EXPLICIT)
        self.assertIs(far.startedBy, Moment.SYN)
        emitter = first.service.optionEmitter
        self.assertGreaterEqual(emitter.emitted, 1)
        self.assertIn(emitter.comment, mangleRules())
        # The proxies of one process share the queue; the last one to stop
        # removes the rule.
        self.assertIs(second.service.optionEmitter, emitter)
        yield first.stop()
        self.assertIn(emitter.comment, mangleRules())
        yield second.stop()
        self.assertNotIn(emitter.comment, mangleRules())
