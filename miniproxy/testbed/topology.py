# -*- test-case-name: tests.test_topology -*-
"""
A line of test hosts, C{client -- p1 -- ... -- pn -- server}, joined by
delay lines (L{miniproxy.testbed.delayline}): the testbed of the paper's
evaluation (its Figures 4 and 5).

Each host is a network namespace of one L{Testbed}, so their names share a
prefix unique to the run.  Link M{i} (from 0, the client's) joins node M{i}
and node M{i+1}; on it node M{i} has C{10.0.i.1/24} and C{fd00:0:i::1/64}
(M{i} in hex), node M{i+1} has C{.2} and C{::2}.  In each host the device
towards a neighbour is named after the neighbour's short name (in C{p1}:
C{client} and C{server} for one proxy, C{client} and C{p2} for more)::

    client 10.0.0.1 ==link 0== 10.0.0.2 p1 10.0.1.1 ==link 1== 10.0.1.2 server
                    (delay)                         (delay)

Routes make every address reachable from every host through the line: the
client's default route points at the next host, the server's at the
previous one, and each proxy has a default route towards the server and a
route to each subnet on the client's side.  The proxies forward IP (flows
simply go through them), so a flow can be addressed to the server and
intercepted on its way by a proxy (L{LineTopology.interceptTCP} sets up
TPROXY), or addressed to a proxy explicitly.  The hosts keep the kernel's
TCP defaults.

As a context manager::

    with LineTopology(proxies=1, rtt=40) as line:       # 10 ms per link and way
        line.proxies[0].spawn([...])                    # a Namespace
        with line.client.entered():
            sock = socket.create_connection((line.serverAddress, 80))

or in a test: C{line = LineTopology(...).build()} and
C{self.addCleanup(line.teardown)}.  Teardown removes the forwarders, the
TUN devices (they go with their forwarder), the processes started with the
namespaces' C{spawn} and the namespaces; it is idempotent, and runs at exit
if nobody called it.  From a shell::

    python -m miniproxy.testbed.topology up --proxies 2 --rtt 40 --rate 100000000
    python -m miniproxy.testbed.topology down PREFIX

C{up} prints the hosts and their addresses and keeps the line up until
Ctrl-C, C{SIGTERM} or C{down} (with C{--watch-stdin}, also until its
standard input ends).  See C{docs/testbed.md}.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
from typing import IO, Any, Iterable, Sequence

from attrs import field, frozen

from miniproxy.testbed.delayline import DEFAULT_QUEUE, DelayLine, Direction
from miniproxy.testbed.netns import (
    NAME_START,
    PREFIX_PATTERN,
    Namespace,
    NetnsError,
    Testbed,
    VethPair,
    cleanupStale,
)

#: The side of a host: towards the client or towards the server.
CLIENT_SIDE = "client"
SERVER_SIDE = "server"
#: The policy routing table and firewall mark of TPROXY interception.
TPROXY_TABLE = 100
TPROXY_MARK = 1
#: Seconds C{down} waits for an C{up} process to tear its line down.
DOWN_TIMEOUT = 30.0


@frozen
class Link:
    """
    What one link of the line does.

    @ivar toServer: The direction from the client's side to the server's.
    @ivar toClient: The other direction (L{None}: the same as C{toServer}).
    @ivar veth: Whether to use a plain veth pair instead (no delay, no
        rate, no forwarder): a reference for measurements.
    """

    toServer: Direction = field(factory=Direction)
    toClient: Direction | None = None
    veth: bool = False

    @classmethod
    def symmetric(
        cls,
        delay: float = 0.0,
        rate: int | None = None,
        queue: int = DEFAULT_QUEUE,
        loss: float = 0.0,
    ) -> Link:
        """
        A link that does the same both ways.

        @param delay: One-way delay, in milliseconds.
        @param rate: Bits per second (L{None}: no limit).
        @param queue: Bytes waiting for serialisation at most.
        @param loss: Probability of random loss, each way.
        """
        return cls(Direction(delay=delay, rate=rate, queue=queue, loss=loss))

    @property
    def directions(self) -> tuple[Direction, Direction]:
        """
        C{(toServer, toClient)}.
        """
        return self.toServer, self.toClient if self.toClient is not None else self.toServer


def _linkSpecs(
    hops: int,
    links: Sequence[Link] | None,
    delays: Sequence[float] | None,
    rtt: float | None,
    rate: int | None,
    queue: int,
    loss: float,
) -> list[Link]:
    given = [x is not None for x in (links, delays, rtt)]
    if sum(given) > 1:
        raise ValueError("give at most one of links, delays and rtt")
    if links is not None:
        if len(links) != hops:
            raise ValueError(f"{hops} links needed, {len(links)} given")
        return list(links)
    if delays is not None:
        if len(delays) != hops:
            raise ValueError(f"{hops} delays needed, {len(delays)} given")
        return [Link.symmetric(d, rate, queue, loss) for d in delays]
    each = (rtt or 0.0) / (2 * hops)
    return [Link.symmetric(each, rate, queue, loss) for _ in range(hops)]


class LineTopology:
    """
    C{client -- p1 -- ... -- pn -- server}, joined by delay lines.

    @ivar testbed: The L{Testbed} owning the namespaces.
    @ivar nodes: The hosts in order, client first.
    @ivar client: The first host.
    @ivar server: The last host.
    @ivar proxies: The hosts between them.
    @ivar specs: What each link does, client's side first.
    @ivar links: The links made, in the same order (L{DelayLine} or
        L{VethPair}).
    """

    def __init__(
        self,
        proxies: int = 1,
        links: Sequence[Link] | None = None,
        delays: Sequence[float] | None = None,
        rtt: float | None = None,
        rate: int | None = None,
        queue: int = DEFAULT_QUEUE,
        loss: float = 0.0,
        seed: int | str = 0,
        ipv6: bool = True,
        forwarding: bool = True,
        prefix: str | None = None,
        watchStdin: bool = True,
    ) -> None:
        """
        Describe the line; L{build} makes it.

        @param proxies: How many hosts between client and server (0: the
            client and the server share one link).
        @param links: What each of the C{proxies + 1} links does.
        @param delays: Instead: the one-way delay of each link, in
            milliseconds (with C{rate}, C{queue} and C{loss} for all).
        @param rtt: Instead: the client-server round trip time, in
            milliseconds, split evenly over the links and ways.
        @param rate: Bits per second of every link, both ways, when
            C{links} is not given.
        @param queue: Bytes queued for serialisation at most, likewise.
        @param loss: Probability of loss each way, likewise.
        @param seed: Seeds the random losses (each link gets its own
            stream).
        @param ipv6: Whether the hosts get IPv6 addresses and routes too.
        @param forwarding: Whether the proxies forward IP.
        @param prefix: The namespaces' name prefix (default: a new one).
        @param watchStdin: Whether each forwarder stops when this process
            exits (see L{DelayLine}).
        """
        if proxies < 0:
            raise ValueError("the number of proxies cannot be negative")
        if proxies > 200:
            raise ValueError("at most 200 proxies (one /24 per link)")
        self.proxyCount = proxies
        self.specs = _linkSpecs(proxies + 1, links, delays, rtt, rate, queue, loss)
        self.seed = seed
        self.ipv6 = ipv6
        self.forwarding = forwarding
        self.watchStdin = watchStdin
        self._prefix = prefix
        self.testbed: Testbed | None = None
        self.nodes: list[Namespace] = []
        self.links: list[DelayLine | VethPair] = []

    def __repr__(self) -> str:
        prefix = self.testbed.prefix if self.testbed is not None else "(not built)"
        return f"<LineTopology {prefix} {' -- '.join(self.names)}>"

    @property
    def names(self) -> list[str]:
        """
        The hosts' short names: C{client}, C{p1} ... C{pn}, C{server}.
        """
        return ["client", *(f"p{k}" for k in range(1, self.proxyCount + 1)), "server"]

    @property
    def prefix(self) -> str:
        """
        The namespaces' name prefix.

        @raise NetnsError: Before L{build}.
        """
        if self.testbed is None:
            raise NetnsError(f"{self!r} is not built")
        return self.testbed.prefix

    # -- hosts and addresses -------------------------------------------

    @property
    def client(self) -> Namespace:
        """
        The client host.
        """
        return self._built()[0]

    @property
    def server(self) -> Namespace:
        """
        The server host.
        """
        return self._built()[-1]

    @property
    def proxies(self) -> list[Namespace]:
        """
        The proxy hosts, C{p1} first.
        """
        return self._built()[1:-1]

    def _built(self) -> list[Namespace]:
        if not self.nodes:
            raise NetnsError(f"{self!r} is not built")
        return self.nodes

    def index(self, node: Namespace | str | int) -> int:
        """
        The position of a host in the line (0: the client).

        @param node: The host, its short name, or its position.
        """
        if isinstance(node, int):
            if not 0 <= node < len(self.specs) + 1:
                raise ValueError(f"no host {node} in {self!r}")
            return node
        name = node.shortName if isinstance(node, Namespace) else node
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"no host {name!r} in {self!r}") from None

    @staticmethod
    def linkAddress(link: int, end: int, family: int = 4) -> str:
        """
        The address of one end of a link.

        @param link: The link's position (0: the client's).
        @param end: 1 for the end nearer the client, 2 for the other.
        @param family: 4 or 6.
        """
        if family == 6:
            return f"fd00:0:{link:x}::{end}"
        return f"10.0.{link}.{end}"

    def address(self, node: Namespace | str | int, towards: str = CLIENT_SIDE, family: int = 4) -> str:
        """
        A host's address on its device towards one side.

        @param towards: L{CLIENT_SIDE} or L{SERVER_SIDE}; the client has
            only the latter, the server only the former.
        @param family: 4 or 6.
        """
        i = self.index(node)
        if towards == CLIENT_SIDE:
            if i == 0:
                raise ValueError("the client has nothing towards the client")
            return self.linkAddress(i - 1, 2, family)
        if towards == SERVER_SIDE:
            if i == len(self.specs):
                raise ValueError("the server has nothing towards the server")
            return self.linkAddress(i, 1, family)
        raise ValueError(f"towards must be {CLIENT_SIDE!r} or {SERVER_SIDE!r}, not {towards!r}")

    def interface(self, node: Namespace | str | int, towards: str = CLIENT_SIDE) -> str:
        """
        The name of a host's device towards one side (its neighbour's short
        name).
        """
        i = self.index(node)
        names = self.names
        if towards == CLIENT_SIDE and i > 0:
            return names[i - 1]
        if towards == SERVER_SIDE and i < len(names) - 1:
            return names[i + 1]
        raise ValueError(f"host {names[i]!r} has no device towards the {towards}")

    @property
    def clientAddress(self) -> str:
        """
        The client's IPv4 address.
        """
        return self.address(0, SERVER_SIDE)

    @property
    def serverAddress(self) -> str:
        """
        The server's IPv4 address.
        """
        return self.address(len(self.specs), CLIENT_SIDE)

    def oneWayDelay(self, start: int, end: int) -> float:
        """
        The configured one-way delay from host C{start} to host C{end}, in
        milliseconds (without serialisation and the forwarders' own time).
        """
        lo, hi = sorted((self.index(start), self.index(end)))
        way = 0 if self.index(start) <= self.index(end) else 1
        return sum(0.0 if s.veth else s.directions[way].delay for s in self.specs[lo:hi])

    # -- life ---------------------------------------------------------

    def __enter__(self) -> LineTopology:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def build(self) -> LineTopology:
        """
        Make the namespaces, links, addresses and routes.  On a failure,
        what was made is removed before the error propagates.

        @return: C{self}.
        """
        if self.testbed is not None:
            raise NetnsError(f"{self!r} is already built")
        self.testbed = Testbed(prefix=self._prefix)
        try:
            self._build(self.testbed)
        except BaseException:
            self.teardown()
            raise
        return self

    def _build(self, bed: Testbed) -> None:
        nodes = self.nodes = [bed.addNamespace(name) for name in self.names]
        families = (4, 6) if self.ipv6 else (4,)
        for i, spec in enumerate(self.specs):
            a, b = nodes[i], nodes[i + 1]
            aAddresses = [f"{self.linkAddress(i, 1, f)}/{24 if f == 4 else 64}" for f in families]
            bAddresses = [f"{self.linkAddress(i, 2, f)}/{24 if f == 4 else 64}" for f in families]
            if spec.veth:
                self.links.append(bed.connect(a, b, aAddresses, bAddresses))
            else:
                toServer, toClient = spec.directions
                line = DelayLine(
                    bed, a, b, aAddresses, bAddresses, aToB=toServer, bToA=toClient,
                    seed=f"{self.seed}-link{i}", watchStdin=self.watchStdin,
                )
                self.links.append(line)
                line.start()
        last = len(nodes) - 1
        for j, node in enumerate(nodes):
            for family in families:
                if j < last:
                    node.addRoute("default", via=self.linkAddress(j, 2, family))
                else:
                    node.addRoute("default", via=self.linkAddress(j - 1, 1, family))
                if 0 < j < last:
                    # Subnets on the client's side, beyond the neighbour.
                    for i in range(j - 1):
                        length = 24 if family == 4 else 64
                        subnet = self.linkAddress(i, 0, family) + f"/{length}"
                        node.addRoute(subnet, via=self.linkAddress(j - 1, 1, family))
        if self.forwarding:
            for node in nodes[1:-1]:
                node.sysctl("net.ipv4.ip_forward", 1)
                if self.ipv6:
                    node.sysctl("net.ipv6.conf.all.forwarding", 1)

    def teardown(self) -> None:
        """
        Stop the forwarders and processes and delete the namespaces.  Safe
        to call again, and after a failed L{build}.
        """
        for link in self.links:
            if isinstance(link, DelayLine):
                link.close()
        if self.testbed is not None:
            self.testbed.teardown()

    def forwarders(self) -> list[DelayLine]:
        """
        The delay lines (the links that are not veth pairs).
        """
        return [link for link in self.links if isinstance(link, DelayLine)]

    # -- interception ----------------------------------------------------

    def interceptTCP(
        self, proxy: Namespace | str | int, ports: Iterable[int], listenPort: int
    ) -> None:
        """
        In a proxy host, send TCP flows to C{ports} that arrive from the
        client's side to a local transparent listener on C{listenPort}
        (nftables TPROXY, a firewall mark and a local route).  The
        listener needs C{IP_TRANSPARENT} (miniproxy's C{tproxy:} endpoint);
        it sees the flow's real destination as its local address.
        """
        i = self.index(proxy)
        if not 0 < i < len(self.specs):
            raise ValueError("only a proxy host can intercept")
        node = self.nodes[i]
        device = self.interface(i, CLIENT_SIDE)
        portSet = ", ".join(str(p) for p in sorted(set(ports)))
        families = [("ip", "0.0.0.0/0", False)] + ([("ip6", "::/0", True)] if self.ipv6 else [])
        ruleset = "".join(
            f"""
table {family} mptopology {{
    chain pre {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "{device}" tcp dport {{ {portSet} }} tproxy to :{listenPort} meta mark set {TPROXY_MARK} accept
    }}
}}
"""
            for family, _, _ in families
        )
        node.nft(ruleset)
        for _, everything, v6 in families:
            node.addRule("fwmark", str(TPROXY_MARK), table=TPROXY_TABLE, ipv6=v6)
            node.addRoute(everything, device="lo", table=TPROXY_TABLE, kind="local")

    def describe(self) -> str:
        """
        The hosts, their namespaces and addresses, and the links: a few
        lines of text.
        """
        lines = []
        families = (4, 6) if self.ipv6 else (4,)
        for j, node in enumerate(self._built()):
            addresses = []
            for side in (CLIENT_SIDE, SERVER_SIDE):
                with contextlib.suppress(ValueError):
                    device = self.interface(j, side)
                    shown = " ".join(self.address(j, side, f) for f in families)
                    addresses.append(f"{device}: {shown}")
            lines.append(f"{node.shortName:<8} {node.name:<28} {'; '.join(addresses)}")
        for i, (spec, link) in enumerate(zip(self.specs, self.links)):
            toServer, toClient = spec.directions
            kind = "veth" if spec.veth else f"toServer={toServer} toClient={toClient}"
            lines.append(f"link {i}: {self.names[i]} -- {self.names[i + 1]}: {kind}")
        return "\n".join(lines) + "\n"


# -- command line ---------------------------------------------------------


def _waitForExit(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _isUpProcess(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"miniproxy.testbed.topology" in f.read()
    except OSError:
        return False


def down(prefix: str | None, out: IO[str]) -> int:
    """
    Take a line down: stop the C{up} process that owns C{prefix} (named by
    the prefix's pid) and delete whatever is left with that prefix; with no
    prefix, delete the namespaces of every run that is gone.

    @return: The exit status.
    """
    if prefix is None:
        deleted = cleanupStale()
    else:
        match = PREFIX_PATTERN.match(prefix)
        if match is None:
            out.write(f"refusing prefix {prefix!r}: not one made by this testbed\n")
            return 2
        pid = int(match.group(1))
        if pid != os.getpid() and _isUpProcess(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _waitForExit(pid, DOWN_TIMEOUT):
                out.write(f"process {pid} did not exit; deleting its namespaces\n")
        deleted = cleanupStale(prefix)
    for name in deleted:
        out.write(f"deleted {name}\n")
    out.write("down\n")
    out.flush()
    return 0


def up(line: LineTopology, out: IO[str], watch: int | None = None) -> int:
    """
    Build C{line}, print it, and keep it until C{SIGTERM}, C{SIGINT}, or
    until a forwarder exits (C{down} deleted a namespace); then tear it
    down.

    @param watch: A descriptor whose end (or any input) also ends it, such
        as standard input when a program runs C{up} through a pipe.
    @return: The exit status.
    """

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        line.build()
        out.write(f"up {line.prefix}\n")
        out.write(line.describe())
        out.flush()
        # A forwarder writes nothing unasked: readable means it ended.
        waitFor: list[Any] = [
            f.process.stdout for f in line.forwarders() if f.process and f.process.stdout
        ]
        if watch is not None:
            waitFor.append(watch)
        if waitFor:
            select.select(waitFor, [], [])
        else:
            signal.pause()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        line.teardown()
        signal.signal(signal.SIGTERM, previous)
    out.write(f"down {line.prefix if line.testbed else ''}\n")
    out.flush()
    return 0


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    """
    C{python -m miniproxy.testbed.topology up|down ...}; C{--help} says
    more.

    @return: The exit status.
    """
    out = out if out is not None else sys.stdout
    parser = argparse.ArgumentParser(
        prog="python -m miniproxy.testbed.topology",
        description="A line of network namespaces, client -- p1 -- ... -- pn -- server, "
        "joined by delay lines.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    upParser = commands.add_parser("up", help="build a line and keep it until Ctrl-C or down")
    upParser.add_argument("--proxies", type=int, default=1, help="proxy hosts (1)")
    delays = upParser.add_mutually_exclusive_group()
    delays.add_argument("--rtt", type=float, help="client-server RTT in ms, split evenly")
    delays.add_argument("--delays", help="one-way delay of each link in ms: D0,D1,...")
    upParser.add_argument("--rate", type=int, help="bits per second of every link")
    upParser.add_argument("--queue", type=int, default=DEFAULT_QUEUE, help="queue bytes")
    upParser.add_argument("--loss", type=float, default=0.0, help="loss probability")
    upParser.add_argument("--seed", default="0", help="seeds the losses")
    upParser.add_argument("--no-ipv6", action="store_true", help="IPv4 only")
    upParser.add_argument("--no-forwarding", action="store_true", help="proxies do not forward IP")
    upParser.add_argument(
        "--watch-stdin", action="store_true",
        help="also stop when standard input ends (for programs that run up through a pipe)",
    )
    downParser = commands.add_parser("down", help="take a line down")
    downParser.add_argument(
        "prefix", nargs="?",
        help=f"the prefix printed by up ({NAME_START}PID-HEX-); none: every run that is gone",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command == "down":
        return down(args.prefix, out)
    try:
        line = LineTopology(
            proxies=args.proxies,
            rtt=args.rtt,
            delays=[float(d) for d in args.delays.split(",")] if args.delays else None,
            rate=args.rate,
            queue=args.queue,
            loss=args.loss,
            seed=args.seed,
            ipv6=not args.no_ipv6,
            forwarding=not args.no_forwarding,
        )
    except ValueError as e:
        parser.error(str(e))
    return up(line, out, sys.stdin.fileno() if args.watch_stdin else None)


if __name__ == "__main__":
    raise SystemExit(main())
