"""
Tests for L{miniproxy.functions.policy}.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from miniproxy.address import HostPort, NextHop
from miniproxy.errors import ConfigError
from miniproxy.functions.policy import Policy, configure
from miniproxy.interfaces import IFlowHandler, IFlowHandlerFactory
from miniproxy.verdict import CONTINUE, STOP


class FakeFlow:
    """
    Just what the policy reads and calls of a flow.
    """

    def __init__(self, client: str, destination: HostPort | None) -> None:
        self.client = HostPort(client, 40000)
        self.destination = destination
        self.origin: HostPort | None = None
        self.nextHop: NextHop | None = None
        self.chain: tuple[NextHop, ...] = ()
        self.allowed = False
        self.refusal: str | None = None

    def allow(self) -> None:
        self.allowed = True

    def refuse(self, reason: str) -> None:
        self.refusal = reason


def policy(settings: dict[str, Any]) -> Policy:
    return configure(settings, MemoryReactorClock())


def decide(p: Policy, client: str, host: str | None, port: int = 80) -> tuple[FakeFlow, Any]:
    flow = FakeFlow(client, HostPort(host, port) if host else None)
    handler = p.handlerForFlow(flow)
    return flow, (handler, handler.earlySyn(flow))


class PolicyTests(unittest.TestCase):
    """
    The policy allows, denies, chooses next hops and limits flows.
    """

    def test_interfaces(self) -> None:
        p = policy({})
        verifyObject(IFlowHandlerFactory, p)
        verifyObject(IFlowHandler, p.handlerForFlow(FakeFlow("1.2.3.4", None)))

    def test_defaultDenies(self) -> None:
        flow, (_, verdict) = decide(policy({}), "10.0.0.1", "10.0.0.2")
        self.assertIs(verdict, STOP)
        self.assertEqual(flow.refusal, "denied by policy (the default)")
        self.assertFalse(flow.allowed)

    def test_defaultAllow(self) -> None:
        flow, (_, verdict) = decide(policy({"default": "allow"}), "10.0.0.1", "10.0.0.2")
        self.assertIs(verdict, CONTINUE)
        self.assertTrue(flow.allowed)
        self.assertIsNone(flow.refusal)

    def test_firstMatchWins(self) -> None:
        p = policy({"rules": [
            {"action": "deny", "sources": ["10.0.0.0/24"], "ports": [22]},
            {"action": "allow", "sources": ["10.0.0.0/8"], "destinations": ["192.0.2.0/24"],
             "ports": [22, "8000-8099"]},
        ]})
        flow, (_, verdict) = decide(p, "10.0.0.5", "192.0.2.1", 22)
        self.assertEqual(flow.refusal, "denied by policy (rule 0)")
        flow, (_, verdict) = decide(p, "10.1.0.5", "192.0.2.1", 22)
        self.assertTrue(flow.allowed)
        flow, (_, verdict) = decide(p, "10.1.0.5", "192.0.2.1", 8050)
        self.assertTrue(flow.allowed)
        flow, (_, verdict) = decide(p, "10.1.0.5", "192.0.2.1", 8100)
        self.assertEqual(flow.refusal, "denied by policy (the default)")
        flow, (_, verdict) = decide(p, "10.1.0.5", "198.51.100.1", 22)
        self.assertEqual(flow.refusal, "denied by policy (the default)")
        flow, (_, verdict) = decide(p, "11.0.0.1", "192.0.2.1", 22)
        self.assertIsNotNone(flow.refusal)

    def test_unknownDestinationMatchesOnlyRulesWithout(self) -> None:
        p = policy({"rules": [
            {"action": "allow", "destinations": ["0.0.0.0/0"]},
        ]})
        flow, _ = decide(p, "10.0.0.1", None)
        self.assertIsNotNone(flow.refusal)
        p = policy({"rules": [{"action": "allow", "sources": ["10.0.0.0/8"]}]})
        flow, _ = decide(p, "10.0.0.1", None)
        self.assertTrue(flow.allowed)

    def test_hostNames(self) -> None:
        p = policy({"rules": [{"action": "allow", "destinations": ["Example.COM"]}]})
        flow, _ = decide(p, "10.0.0.1", "example.com")
        self.assertTrue(flow.allowed)
        flow, _ = decide(p, "10.0.0.1", "other.example")
        self.assertIsNotNone(flow.refusal)

    def test_ipv6(self) -> None:
        p = policy({"rules": [{"action": "allow", "sources": ["::1/128"],
                               "destinations": ["2001:db8::/32"]}]})
        flow, _ = decide(p, "::1", "2001:db8::5")
        self.assertTrue(flow.allowed)
        flow, _ = decide(p, "::2", "2001:db8::5")
        self.assertIsNotNone(flow.refusal)

    def test_origins(self) -> None:
        """
        C{origins} matches the original client a trusted carrier named
        (C{flow.origin}), or the connecting peer when none did; C{sources}
        always matches the connecting peer.
        """
        p = policy({"rules": [
            {"action": "allow", "origins": ["192.0.2.0/24"], "ports": [80]},
            {"action": "allow", "sources": ["192.0.2.0/24"], "ports": [81]},
        ]})

        def decideFrom(peer: str, origin: str | None, port: int) -> FakeFlow:
            flow = FakeFlow(peer, HostPort("198.51.100.1", port))
            flow.origin = HostPort(origin, 5000) if origin else None
            p.handlerForFlow(flow).earlySyn(flow)
            return flow

        self.assertTrue(decideFrom("10.0.0.1", "192.0.2.7", 80).allowed)
        self.assertTrue(decideFrom("192.0.2.7", None, 80).allowed)
        self.assertIsNotNone(decideFrom("192.0.2.7", "10.0.0.1", 80).refusal)
        self.assertIsNotNone(decideFrom("10.0.0.1", None, 80).refusal)
        self.assertTrue(decideFrom("192.0.2.7", "10.0.0.1", 81).allowed)
        self.assertIsNotNone(decideFrom("10.0.0.1", "192.0.2.7", 81).refusal)

    def test_nextHopAndChain(self) -> None:
        p = policy({"rules": [
            {"action": "allow", "ports": [80], "next-hop": "tcp:host=10.9.9.9:port=3128"},
            {"action": "allow", "ports": [81],
             "chain": ["tcp:host=10.0.0.1:port=1", "tcp:host=10.0.0.2:port=2"]},
        ]})
        flow, _ = decide(p, "10.0.0.1", "192.0.2.1", 80)
        self.assertEqual(flow.nextHop, NextHop(HostPort("10.9.9.9", 3128)))
        self.assertEqual(flow.chain, ())
        flow, _ = decide(p, "10.0.0.1", "192.0.2.1", 81)
        self.assertEqual(flow.nextHop, NextHop(HostPort("10.0.0.1", 1)))
        self.assertEqual(flow.chain, (NextHop(HostPort("10.0.0.2", 2)),))

    def test_limitsPerSource(self) -> None:
        """
        A per-source limit refuses flows past it, and a closed flow frees its
        place; limits count per source.
        """
        p = policy({"default": "allow", "max-flows-per-source": 2, "rules": [
            {"action": "allow", "ports": [22], "max-flows-per-source": 1},
        ]})
        a, (ha, _) = decide(p, "10.0.0.1", "192.0.2.1", 22)
        b, _ = decide(p, "10.0.0.1", "192.0.2.1", 22)
        self.assertTrue(a.allowed)
        self.assertIn("rule 0: more than 1 flows", b.refusal)
        c, (hc, _) = decide(p, "10.0.0.1", "192.0.2.1", 80)
        self.assertTrue(c.allowed)
        d, _ = decide(p, "10.0.0.1", "192.0.2.1", 80)
        self.assertIn("more than 2 flows from 10.0.0.1", d.refusal)
        other, _ = decide(p, "10.0.0.2", "192.0.2.1", 22)
        self.assertTrue(other.allowed)
        ha.closed(a)
        ha.closed(a)  # twice is harmless
        self.assertEqual(p.flowsFrom("10.0.0.1"), 1)
        e, _ = decide(p, "10.0.0.1", "192.0.2.1", 22)
        self.assertTrue(e.allowed)
        hc.closed(c)
        self.assertEqual(p.flowsFrom("10.0.0.1"), 1)

    @given(st.lists(st.tuples(st.sampled_from(["10.0.0.1", "10.0.0.2"]), st.booleans()),
                    max_size=40))
    def test_countsReturnToZero(self, events: list[tuple[str, bool]]) -> None:
        """
        However flows open and close, the counts never exceed the limit and
        are zero once every flow closed.
        """
        p = policy({"default": "allow", "max-flows-per-source": 3})
        open_: list[tuple[Any, FakeFlow]] = []
        for source, opening in events:
            if opening or not open_:
                flow, (handler, _) = decide(p, source, "192.0.2.1")
                if flow.allowed:
                    open_.append((handler, flow))
            else:
                handler, flow = open_.pop(0)
                handler.closed(flow)
            self.assertLessEqual(p.flowsFrom(source), 3)
        for handler, flow in open_:
            handler.closed(flow)
        self.assertEqual(p.flowsFrom("10.0.0.1") + p.flowsFrom("10.0.0.2"), 0)


class PolicyConfigTests(unittest.TestCase):
    """
    Bad settings raise L{ConfigError} naming the key.
    """

    def assertBad(self, settings: dict[str, Any], key: str) -> None:
        with self.assertRaises(ConfigError) as raised:
            policy(settings)
        self.assertTrue(str(raised.exception).startswith(key), str(raised.exception))

    def test_errors(self) -> None:
        self.assertBad({"default": "maybe"}, "default: must be")
        self.assertBad({"colour": 1}, "colour: unknown setting of policy")
        self.assertBad({"max-flows-per-source": -1}, "max-flows-per-source: must be")
        self.assertBad({"rules": {}}, "rules: must be a list")
        self.assertBad({"rules": [5]}, "rules[0]: must be a table")
        self.assertBad({"rules": [{}]}, "rules[0].action: must be")
        self.assertBad({"rules": [{"action": "allow", "sources": "10.0.0.0/8"}]},
                       "rules[0].sources: must be a list")
        self.assertBad({"rules": [{"action": "allow", "sources": ["10.0.0.0/33"]}]},
                       "rules[0].sources[0]: bad CIDR")
        self.assertBad({"rules": [{"action": "allow", "origins": ["10.0.0.0/8", 7]}]},
                       "rules[0].origins[1]: must be a CIDR")
        self.assertBad({"rules": [{"action": "allow", "origins": "10.0.0.0/8"}]},
                       "rules[0].origins: must be a list")
        self.assertBad({"rules": [{"action": "allow", "destinations": ["1.2.3.4/40"]}]},
                       "rules[0].destinations[0]: bad CIDR")
        self.assertBad({"rules": [{"action": "allow", "ports": [0]}]}, "rules[0].ports[0]")
        self.assertBad({"rules": [{"action": "allow", "ports": ["90-80"]}]}, "rules[0].ports[0]")
        self.assertBad({"rules": [{"action": "allow", "ports": ["a-b"]}]}, "rules[0].ports[0]: bad port range")
        self.assertBad({"rules": [{"action": "allow", "ports": [True]}]}, "rules[0].ports[0]: bad port")
        self.assertBad({"rules": [{"action": "allow", "next-hop": "udp:a:1"}]}, "rules[0].next-hop: bad next hop")
        self.assertBad({"rules": [{"action": "allow", "chain": []}]}, "rules[0].chain: must not be empty")
        self.assertBad({"rules": [{"action": "allow", "chain": ["tcp:a:1"], "next-hop": "tcp:b:2"}]},
                       "rules[0].chain: give either")
        self.assertBad({"rules": [{"action": "deny", "next-hop": "tcp:b:2"}]}, "rules[0]: a deny rule")
        self.assertBad({"rules": [{"action": "allow", "colour": 1}]}, "rules[0].colour: unknown key")
