"""
A chain of three explicit proxies in network namespaces: the final
destination travels hop to hop in the SYN, by each carrier.

The line (L{LineTopology}, 2 ms each way on each link)::

    client == p1 == p2 == p3 == server

The client connects to p1, whose configuration sends its flows to the
server (a static destination) through p2 (a policy next hop with a
carrier); p2 and p3 read the destination from the carrier (only from the
previous proxy's network), their policy allows the server, p2 sends on to p3
with the same carrier, and p3 connects to the destination itself.  Each
proxy is the real C{twistd miniproxy} in its namespace.

With the TCP option the destination is in the SYN itself, so p2 and p3
begin every flow at its SYN.  With the PROXY v2 header it is in the first
bytes; with Fast Open on every hop (and cookies cached after the first
flow) those bytes ride in the SYN too, and from then on p2 and p3 begin at
the SYN as well.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer

from miniproxy.testbed.netns import namespacesUnavailable, pollUntil
from miniproxy.testbed.topology import CLIENT_SIDE, LineTopology

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY_PORT = 8080
SERVER_PORT = 9000
PAYLOAD = os.urandom(200_000)
FLOWS = 3


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """
    Echoes everything, and closes after the client's FIN.
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """
    Sends the payload, half-closes, and collects the echo until EOF.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(PAYLOAD)
        self.transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self.chunks))


def proxyConfig(index: int, line: LineTopology, carrier: str, fastOpen: bool) -> str:
    server = line.serverAddress
    nextHop = ""
    if index < 3:
        after = line.address(line.proxies[index], CLIENT_SIDE)  # p(index+1)
        extra = ":fastopen=yes" if fastOpen else ""
        nextHop = f'next-hop = "tcp:host={after}:port={PROXY_PORT}:carry={carrier}{extra}"'
    if index == 1:
        return f"""
mode = "early"
to = "tcp:host={server}:port={SERVER_PORT}"
listen = ["tcp:{PROXY_PORT}:interface=0.0.0.0"]
functions = ["policy"]
[[function.policy.rules]]
action = "allow"
{nextHop}
"""
    return f"""
mode = "early"
functions = ["policy"]
[[listeners]]
endpoint = "tcp:{PROXY_PORT}:interface=0.0.0.0"
explicit = ["{carrier}"]
trusted = ["10.0.0.0/8"]
[[function.policy.rules]]
action = "allow"
destinations = ["{server}/32"]
ports = [{SERVER_PORT}]
{nextHop}
"""


class ChainTests(unittest.TestCase):
    """
    Three proxies relay byte-exact and pass the destination on.
    """

    def setUp(self) -> None:
        reason = namespacesUnavailable(tools=("ip", "iptables"))
        if reason is not None:
            raise unittest.SkipTest(reason)
        self.line = LineTopology(proxies=3, delays=[2, 2, 2, 2]).build()
        self.addCleanup(self.line.teardown)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    @defer.inlineCallbacks
    def runChain(self, carrier: str, fastOpen: bool):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        line = self.line
        logs = []
        for i, proxy in enumerate(line.proxies, start=1):
            if fastOpen:
                proxy.sysctl("net.ipv4.tcp_fastopen", 3)
            config = os.path.join(self.directory, f"p{i}.toml")
            with open(config, "w") as f:
                f.write(proxyConfig(i, line, carrier, fastOpen))
            log = os.path.join(self.directory, f"p{i}.log")
            logs.append(log)
            proxy.spawnPython(
                ["-c", "from twisted.scripts.twistd import run; run()", "-n",
                 "--pidfile=", f"--logfile={log}", "miniproxy", "--config", config],
                pythonPath=[REPO],
            )
        with line.server.entered():
            port = reactor.listenTCP(SERVER_PORT, Factory.forProtocol(Echo), interface="0.0.0.0")
        self.addCleanup(port.stopListening)
        for proxy in line.proxies:
            yield pollUntil(
                reactor, lambda proxy=proxy: PROXY_PORT in proxy.listeningTCPPorts(),
                timeout=20, what=f"twistd miniproxy listening in {proxy}",
            )
        first = line.address(line.proxies[0], CLIENT_SIDE)
        for flow in range(FLOWS):
            client = Client()
            with line.client.entered():
                reactor.connectTCP(first, PROXY_PORT, ClientFactory.forProtocol(lambda: client))
            echoed = yield client.done
            self.assertEqual(len(echoed), len(PAYLOAD), f"flow {flow}")
            self.assertEqual(echoed, PAYLOAD, f"flow {flow}")

        def accessLines(path: str) -> list[str]:
            with open(path) as f:
                return [l for l in f if "[miniproxy.access#info]" in l]

        for log in logs:
            yield pollUntil(
                reactor, lambda log=log: len(accessLines(log)) >= FLOWS,
                timeout=20, what=f"{FLOWS} access lines in {log}",
            )
        destination = f"-> {line.serverAddress}:{SERVER_PORT} "
        starts = []
        for log in logs:
            lines = accessLines(log)
            self.assertEqual(len(lines), FLOWS, lines)
            for text in lines:
                self.assertIn(destination, text)
                self.assertIn("outcome=ok", text)
                self.assertIn(f"up={len(PAYLOAD)}", text)
                self.assertIn(f"down={len(PAYLOAD)}", text)
            starts.append([re.search(r"started-by=(\S+)", t).group(1) for t in lines])
        return starts

    @defer.inlineCallbacks
    def test_tcpOption(self):  # type: ignore[no-untyped-def]
        """
        With the TCP option, p2 and p3 begin every flow at its SYN.
        """
        starts = yield self.runChain("tcp-option", fastOpen=False)
        self.assertEqual(starts[0], ["syn"] * FLOWS)
        self.assertEqual(starts[1], ["syn"] * FLOWS)
        self.assertEqual(starts[2], ["syn"] * FLOWS)

    @defer.inlineCallbacks
    def test_proxyV2FastOpen(self):  # type: ignore[no-untyped-def]
        """
        With the PROXY v2 header and Fast Open on every hop, once cookies
        are cached the header rides in the SYN and p2 and p3 begin at the
        SYN too.
        """
        starts = yield self.runChain("proxy-v2", fastOpen=True)
        self.assertEqual(starts[0], ["syn"] * FLOWS)
        self.assertEqual(starts[1][-1], "syn")
        self.assertEqual(starts[2][-1], "syn")

    @defer.inlineCallbacks
    def test_proxyV2(self):  # type: ignore[no-untyped-def]
        """
        Without Fast Open the header comes after the handshake: the chain
        still delivers, and p2 and p3 begin when the header arrives.
        """
        starts = yield self.runChain("proxy-v2", fastOpen=False)
        self.assertEqual(starts[1], ["accept"] * FLOWS)
        self.assertEqual(starts[2], ["accept"] * FLOWS)
