# -*- test-case-name: tests.test_functions_policy -*-
"""
The policy function: per-flow decisions at the early-SYN hook.

Rules are tried in order; the first that matches decides.  A rule matches a
flow when its source, destination and port lists all match (an empty or
missing list matches anything).  An C{allow} rule may choose the next hop or
a chain of proxies, and may limit the flows it admits per source.  When no
rule matches, C{default} decides (C{"deny"} unless configured).

Settings (C{[function.policy]})::

    default = "deny"                 # or "allow"
    max-flows-per-source = 0         # 0: no limit beyond the service's

    [[function.policy.rules]]
    action = "allow"                 # or "deny"
    sources = ["127.0.0.0/8"]        # CIDRs of the connecting peer
    origins = ["192.0.2.0/24"]       # CIDRs of the original client
    destinations = ["10.0.0.0/8"]    # CIDRs or host names of the destination
    ports = [80, "8000-8099"]        # destination ports or ranges
    next-hop = "tcp:host=10.0.0.2:port=3128"   # optional
    chain = ["tcp:host=p1:port=9000", "tcp:host=p2:port=9000"]  # optional
    max-flows-per-source = 10        # optional

A flow whose destination is not configured statically (a transparent or
explicit destination) is only relayed when a rule allows it: that is what
keeps miniproxy from being an open relay.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Sequence

from attrs import frozen
from zope.interface import implementer

from miniproxy.address import NextHop
from miniproxy.errors import ConfigError
from miniproxy.functions.base import FlowHandler
from miniproxy.interfaces import IFlowHandlerFactory
from miniproxy.verdict import CONTINUE, STOP, Verdict

NAME = "policy"

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


@frozen
class PortRange:
    """
    An inclusive range of ports.
    """

    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high


@frozen
class Rule:
    """
    One policy rule.

    @ivar index: The rule's position, for messages.
    @ivar allow: Whether it allows (or denies) what it matches.
    @ivar sources: Networks of the connecting peer (the client, or the
        previous proxy of a chain); empty matches any.
    @ivar origins: Networks of the original client: the one a trusted
        PROXY header or flow address option named (C{flow.origin}), else
        the connecting peer; empty matches any.
    @ivar destinations: Destination networks; empty matches any.
    @ivar destinationNames: Destination host names (lower case).
    @ivar ports: Destination port ranges; empty matches any.
    @ivar nextHop: The next hop to use, or L{None} to keep the flow's.
    @ivar chain: Proxies after C{nextHop}, in order.
    @ivar maxFlowsPerSource: Flows this rule admits at once per source; 0
        for no limit.
    """

    index: int
    allow: bool
    sources: tuple[_Network, ...] = ()
    origins: tuple[_Network, ...] = ()
    destinations: tuple[_Network, ...] = ()
    destinationNames: tuple[str, ...] = ()
    ports: tuple[PortRange, ...] = ()
    nextHop: NextHop | None = None
    chain: tuple[NextHop, ...] = ()
    maxFlowsPerSource: int = 0

    def matches(self, flow: Any) -> bool:
        """
        Whether the rule matches C{flow}.
        """
        if self.sources:
            ip = flow.client.ipAddress()
            if ip is None or not any(ip in net for net in self.sources):
                return False
        if self.origins:
            ip = (getattr(flow, "origin", None) or flow.client).ipAddress()
            if ip is None or not any(ip in net for net in self.origins):
                return False
        destination = flow.destination
        if self.destinations or self.destinationNames:
            if destination is None:
                return False
            ip = destination.ipAddress()
            if ip is not None:
                if not any(ip in net for net in self.destinations):
                    return False
            elif destination.host.lower() not in self.destinationNames:
                return False
        if self.ports:
            if destination is None or not any(
                destination.port in r for r in self.ports
            ):
                return False
        return True


def _where(index: int, key: str) -> str:
    return f"rules[{index}].{key}"


def _list(value: object, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be a list, not {value!r}")
    return value


def _networks(table: dict[str, Any], index: int, key: str) -> tuple[_Network, ...]:
    """
    Pop the list of CIDRs at C{key} from a rule's C{table}.
    """
    where = _where(index, key)
    return tuple(
        _network(v, f"{where}[{i}]")
        for i, v in enumerate(_list(table.pop(key, []), where))
    )


def _network(value: object, key: str) -> _Network:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a CIDR string, not {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as e:
        raise ConfigError(f"{key}: bad CIDR {value!r}: {e}") from None


def _portRange(value: object, key: str) -> PortRange:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: bad port {value!r}")
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, str) and value.count("-") == 1:
        a, b = value.split("-")
        try:
            low, high = int(a), int(b)
        except ValueError:
            raise ConfigError(f"{key}: bad port range {value!r}") from None
    else:
        raise ConfigError(
            f"{key}: must be a port or a range like \"8000-8099\", not {value!r}"
        )
    if not (0 < low <= high < 65536):
        raise ConfigError(f"{key}: ports must be 1 to 65535, low to high: {value!r}")
    return PortRange(low, high)


def _limit(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}: must be a whole number >= 0, not {value!r}")
    return value


def _nextHop(value: object, key: str) -> NextHop:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be an endpoint string, not {value!r}")
    try:
        return NextHop.fromString(value)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def parseRule(index: int, table: object) -> Rule:
    """
    Parse one rule's table.

    @raise ConfigError: Naming the key, as C{rules[INDEX].KEY}.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"rules[{index}]: must be a table, not {table!r}")
    table = dict(table)
    action = table.pop("action", None)
    if action not in ("allow", "deny"):
        raise ConfigError(
            f"{_where(index, 'action')}: must be \"allow\" or \"deny\", not {action!r}"
        )
    sources = _networks(table, index, "sources")
    origins = _networks(table, index, "origins")
    networks: list[_Network] = []
    names: list[str] = []
    for i, v in enumerate(
        _list(table.pop("destinations", []), _where(index, "destinations"))
    ):
        key = f"{_where(index, 'destinations')}[{i}]"
        if isinstance(v, str) and _HOSTNAME.fullmatch(v) and not v[-1].isdigit():
            names.append(v.lower())
        else:
            networks.append(_network(v, key))
    ports = tuple(
        _portRange(v, f"{_where(index, 'ports')}[{i}]")
        for i, v in enumerate(_list(table.pop("ports", []), _where(index, "ports")))
    )
    nextHop = None
    if "next-hop" in table:
        nextHop = _nextHop(table.pop("next-hop"), _where(index, "next-hop"))
    chain: tuple[NextHop, ...] = ()
    if "chain" in table:
        hops = [
            _nextHop(v, f"{_where(index, 'chain')}[{i}]")
            for i, v in enumerate(_list(table.pop("chain"), _where(index, "chain")))
        ]
        if not hops:
            raise ConfigError(f"{_where(index, 'chain')}: must not be empty")
        if nextHop is not None:
            raise ConfigError(
                f"{_where(index, 'chain')}: give either next-hop or chain, not both"
            )
        nextHop, chain = hops[0], tuple(hops[1:])
    maxPerSource = _limit(
        table.pop("max-flows-per-source", 0), _where(index, "max-flows-per-source")
    )
    if table:
        raise ConfigError(f"{_where(index, sorted(table)[0])}: unknown key")
    if action == "deny" and (nextHop is not None or maxPerSource):
        raise ConfigError(
            f"rules[{index}]: a deny rule takes no next-hop, chain or limit"
        )
    return Rule(
        index=index,
        allow=(action == "allow"),
        sources=sources,
        origins=origins,
        destinations=tuple(networks),
        destinationNames=tuple(names),
        ports=ports,
        nextHop=nextHop,
        chain=chain,
        maxFlowsPerSource=maxPerSource,
    )


class _PolicyHandler(FlowHandler):
    """
    Counts a flow admitted under a per-source limit until it closes.
    """

    __slots__ = ("_policy", "_keys")

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._keys: tuple[tuple[int, str], ...] = ()

    def earlySyn(self, flow: Any) -> Verdict:
        """
        Decide: allow (maybe choosing the next hop) or refuse.
        """
        return self._policy.decide(flow, self)

    def closed(self, flow: Any) -> Verdict:
        """
        Release the flow's place under its limits.
        """
        keys, self._keys = self._keys, ()
        self._policy.release(keys)
        return CONTINUE


@implementer(IFlowHandlerFactory)
class Policy:
    """
    The configured policy function.

    @ivar rules: The rules, in order.
    @ivar defaultAllow: Whether a flow no rule matches is allowed.
    @ivar maxFlowsPerSource: Flows allowed at once per source, over all
        rules; 0 for no limit.
    """

    name = NAME

    def __init__(
        self, rules: Sequence[Rule], defaultAllow: bool = False, maxFlowsPerSource: int = 0
    ) -> None:
        self.rules = tuple(rules)
        self.defaultAllow = defaultAllow
        self.maxFlowsPerSource = maxFlowsPerSource
        self._counts: dict[tuple[int, str], int] = {}

    def handlerForFlow(self, flow: Any) -> _PolicyHandler:
        """
        See L{IFlowHandlerFactory.handlerForFlow}.
        """
        return _PolicyHandler(self)

    def _over(self, key: tuple[int, str], limit: int) -> bool:
        return bool(limit) and self._counts.get(key, 0) >= limit

    def decide(self, flow: Any, handler: _PolicyHandler) -> Verdict:
        """
        Apply the first matching rule (or the default) to C{flow}.
        """
        rule = next((r for r in self.rules if r.matches(flow)), None)
        allow = self.defaultAllow if rule is None else rule.allow
        which = "the default" if rule is None else f"rule {rule.index}"
        if not allow:
            flow.refuse(f"denied by policy ({which})")
            return STOP
        source = flow.client.host
        overall = (-1, source)
        if self._over(overall, self.maxFlowsPerSource):
            flow.refuse(
                f"policy: more than {self.maxFlowsPerSource} flows from {source}"
            )
            return STOP
        keys = [overall]
        if rule is not None and rule.maxFlowsPerSource:
            key = (rule.index, source)
            if self._over(key, rule.maxFlowsPerSource):
                flow.refuse(
                    f"policy rule {rule.index}: more than "
                    f"{rule.maxFlowsPerSource} flows from {source}"
                )
                return STOP
            keys.append(key)
        for key in keys:
            self._counts[key] = self._counts.get(key, 0) + 1
        handler._keys = tuple(keys)
        flow.allow()
        if rule is not None and rule.nextHop is not None:
            flow.nextHop = rule.nextHop
            flow.chain = rule.chain
        return CONTINUE

    def release(self, keys: Sequence[tuple[int, str]]) -> None:
        """
        A flow counted under C{keys} closed.
        """
        for key in keys:
            count = self._counts.get(key, 0) - 1
            if count > 0:
                self._counts[key] = count
            else:
                self._counts.pop(key, None)

    def flowsFrom(self, source: str) -> int:
        """
        Flows from C{source} this policy allowed that are still open.
        """
        return self._counts.get((-1, source), 0)


def configure(settings: dict, reactor: Any) -> Policy:
    """
    Make the policy function from its settings.

    @raise ConfigError: Naming the bad key.
    """
    settings = dict(settings)
    default = settings.pop("default", "deny")
    if default not in ("allow", "deny"):
        raise ConfigError(f"default: must be \"allow\" or \"deny\", not {default!r}")
    maxPerSource = _limit(settings.pop("max-flows-per-source", 0), "max-flows-per-source")
    rules = [
        parseRule(i, table)
        for i, table in enumerate(_list(settings.pop("rules", []), "rules"))
    ]
    if settings:
        raise ConfigError(f"{sorted(settings)[0]}: unknown setting of {NAME}")
    return Policy(rules, defaultAllow=(default == "allow"), maxFlowsPerSource=maxPerSource)
