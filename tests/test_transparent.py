"""
Transparent mode end to end: C{twistd miniproxy} intercepting flows in
network namespaces, with TPROXY and with a NAT redirect.

The topology, built for each test by L{Topology}::

    client 10.0.1.1 --veth-- 10.0.1.2 proxy 10.0.2.1 --veth-- 10.0.2.2 server
           fd00:1::1          fd00:1::2      fd00:2::1          10.0.2.3
                                                                fd00:2::2

The client's and the server's default routes go through the proxy, whose
forwarding is off: a byte gets from one to the other only through the
proxy's sockets.  In the proxy namespace nftables sends TCP to port 80 to
the C{tproxy} listeners (8080, and 8086 for IPv6), and redirects (NAT) port
81 to plain listeners marked transparent, which learn the destination from
C{SO_ORIGINAL_DST} (8081, and 8082, a dual-stack IPv6 socket, which also
gets IPv4 port 82).  The policy allows only the server's first address on
ports 80 to 82.

The client and the server are protocols in this test's reactor, whose
sockets are made in their namespaces (L{Namespace.entered}).
"""

from __future__ import annotations

import ipaddress
import os
import random
import subprocess
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from miniproxy.testbed.netns import (
    NetnsError,
    Testbed,
    namespacesUnavailable,
    pollUntil,
)

#: The repository's root, which C{twistd} needs on its path for its dropins.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Seconds for the proxy to start, and for each flow.
START_TIMEOUT = 20.0
FLOW_TIMEOUT = 15.0

CLIENT4, CLIENT6 = "10.0.1.1", "fd00:1::1"
PROXY_CLIENT_SIDE4, PROXY_CLIENT_SIDE6 = "10.0.1.2", "fd00:1::2"
PROXY_SERVER_SIDE4, PROXY_SERVER_SIDE6 = "10.0.2.1", "fd00:2::1"
SERVER4, SERVER6 = "10.0.2.2", "fd00:2::2"
#: An address of the server the policy does not allow.
FORBIDDEN4 = "10.0.2.3"

#: The proxy's listening ports.
TPROXY4, NAT4, NAT_DUAL, TPROXY6 = 8080, 8081, 8082, 8086
#: The server's ports.
SERVER_PORTS = (80, 81, 82)

RULESET = f"""
table ip mp {{
    chain pre {{
        type filter hook prerouting priority mangle; policy accept;
        tcp dport 80 tproxy to :{TPROXY4} meta mark set 1 accept
    }}
}}
table ip6 mp {{
    chain pre {{
        type filter hook prerouting priority mangle; policy accept;
        tcp dport 80 tproxy to :{TPROXY6} meta mark set 1 accept
    }}
}}
table ip mpnat {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport 81 redirect to :{NAT4}
        tcp dport 82 redirect to :{NAT_DUAL}
    }}
}}
table ip6 mpnat {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport 81 redirect to :{NAT_DUAL}
    }}
}}
"""

CONFIG = rf"""
mode = "early"
functions = ["policy"]

[[listeners]]
endpoint = "tproxy:port={TPROXY4}:interface=0.0.0.0"

[[listeners]]
endpoint = 'tproxy:port={TPROXY6}:interface=\:\:'

[[listeners]]
endpoint = "tcp:port={NAT4}:interface=0.0.0.0"
transparent = true

[[listeners]]
endpoint = 'tcp6:port={NAT_DUAL}:interface=\:\:'
transparent = true

[function.policy]
default = "deny"

[[function.policy.rules]]
action = "allow"
destinations = ["{SERVER4}/32", "{SERVER6}/128"]
ports = ["80-82"]
"""


def unmapped(host: str) -> str:
    """
    An IPv4-mapped IPv6 address as IPv4; any other address unchanged.
    """
    mapped = ipaddress.ip_address(host.split("%")[0])
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped:
        return str(mapped.ipv4_mapped)
    return host


def hostPort(host: str, port: int) -> str:
    """
    C{host:port}, with brackets around an IPv6 host, as the access log
    writes it.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IHalfCloseableProtocol)
class Responder(Protocol):
    """
    The server: reads the request until the FIN, records it, then sends
    the factory's response and closes.
    """

    def connectionMade(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.factory.connections.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def readConnectionLost(self) -> None:
        transport: Any = self.transport
        self.factory.requests.append(  # type: ignore[attr-defined]
            (
                unmapped(transport.getPeer().host),
                transport.getHost().port,
                b"".join(self.chunks),
            )
        )
        transport.write(self.factory.response)  # type: ignore[attr-defined]
        transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


class Client(Protocol):
    """
    Sends C{payload} and a FIN (when there is a payload), and fires C{done}
    with what it read and why the connection closed.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[tuple[bytes, Failure]] = defer.Deferred()
        self.localPort = 0

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.localPort = transport.getHost().port
        if self.payload:
            transport.write(self.payload)
            transport.loseWriteConnection()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback((b"".join(self.chunks), reason))


class Topology:
    """
    The namespaces, the proxy process and the server of one test.

    @ivar bed: The testbed.
    @ivar client: The client's namespace.
    @ivar proxy: The proxy's namespace.
    @ivar server: The server's namespace.
    @ivar logPath: The proxy's twistd log file.
    @ivar serverFactory: Makes the server's L{Responder}s; records what they
        read.
    """

    def __init__(self, testCase: unittest.TestCase) -> None:
        self.testCase = testCase
        self.bed = Testbed()
        testCase.addCleanup(self.bed.teardown)
        bed = self.bed
        self.client = bed.addNamespace("client")
        self.proxy = bed.addNamespace("proxy")
        self.server = bed.addNamespace("server")
        bed.connect(
            self.client,
            self.proxy,
            [f"{CLIENT4}/24", f"{CLIENT6}/64"],
            [f"{PROXY_CLIENT_SIDE4}/24", f"{PROXY_CLIENT_SIDE6}/64"],
        )
        bed.connect(
            self.proxy,
            self.server,
            [f"{PROXY_SERVER_SIDE4}/24", f"{PROXY_SERVER_SIDE6}/64"],
            [f"{SERVER4}/24", f"{FORBIDDEN4}/24", f"{SERVER6}/64"],
        )
        self.client.addRoute("default", via=PROXY_CLIENT_SIDE4)
        self.client.addRoute("default", via=PROXY_CLIENT_SIDE6)
        self.server.addRoute("default", via=PROXY_SERVER_SIDE4)
        self.server.addRoute("default", via=PROXY_SERVER_SIDE6)
        proxy = self.proxy
        # No forwarding: what crosses the proxy, its sockets carried.
        proxy.sysctl("net.ipv4.ip_forward", 0)
        proxy.sysctl("net.ipv6.conf.all.forwarding", 0)
        proxy.nft(RULESET)
        proxy.addRule("fwmark", "1", table=100)
        proxy.addRule("fwmark", "1", table=100, ipv6=True)
        proxy.addRoute("0.0.0.0/0", device="lo", table=100, kind="local")
        proxy.addRoute("::/0", device="lo", table=100, kind="local")

        self.directory = os.path.abspath(testCase.mktemp())
        os.makedirs(self.directory)
        self.configPath = os.path.join(self.directory, "miniproxy.toml")
        with open(self.configPath, "w") as f:
            f.write(CONFIG)
        self.logPath = os.path.join(self.directory, "twistd.log")
        self.outputPath = os.path.join(self.directory, "twistd.out")
        self.process: subprocess.Popen[bytes] | None = None

        self.serverFactory = Factory.forProtocol(Responder)
        self.serverFactory.connections = []  # type: ignore[attr-defined]
        self.serverFactory.requests = []  # type: ignore[attr-defined]
        self.serverFactory.response = b""  # type: ignore[attr-defined]

    def startServer(self, reactor: Any) -> None:
        """
        Listen on the server's ports (IPv4 and IPv6 on one socket each).
        """
        for port in SERVER_PORTS:
            with self.server.entered():
                listening = reactor.listenTCP(port, self.serverFactory, interface="::")
            self.testCase.addCleanup(listening.stopListening)

    def startProxy(self, reactor: Any) -> defer.Deferred[None]:
        """
        Run C{twistd -n miniproxy --config FILE} in the proxy namespace.

        @return: A L{Deferred} that fires once every listener listens, or
            fails with the proxy's output if it exits or is too slow.
        """
        with open(self.outputPath, "wb") as output:
            self.process = self.proxy.spawnPython(
                [
                    "-c",
                    "import sys; sys.argv[0] = 'twistd'; "
                    "from twisted.scripts.twistd import run; run()",
                    "-n",
                    "--pidfile=",
                    f"--logfile={self.logPath}",
                    "miniproxy",
                    "--config",
                    self.configPath,
                ],
                pythonPath=[REPO],
                cwd=self.directory,
                stdout=output,
            )
        wanted = {TPROXY4, NAT4, NAT_DUAL, TPROXY6}

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"twistd exited with {self.process.returncode}:\n{self.output()}"
                )
            return wanted <= self.proxy.listeningTCPPorts()

        d = pollUntil(reactor, ready, START_TIMEOUT, what="the proxy's listeners")

        def tooSlow(f: Failure) -> Failure:
            f.trap(NetnsError)
            raise AssertionError(f"{f.value}\n{self.output()}")

        return d.addErrback(tooSlow)

    def output(self) -> str:
        """
        What the proxy wrote, to its output and its log.
        """
        text = []
        for path in (self.outputPath, self.logPath):
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    text.append(f.read())
        return "\n".join(text)

    def accessLine(self, client: str) -> str | None:
        """
        The access log line of the flow from C{client} (C{host:port}), or
        L{None} if there is none yet.  An IPv4 client of a dual-stack
        listener may be written IPv4-mapped.
        """
        if not os.path.exists(self.logPath):
            return None
        host, port = client.rsplit(":", 1)
        forms = {f" {client} "}
        if ":" not in host:
            forms.add(f" [::ffff:{host}]:{port} ")
        with open(self.logPath, encoding="utf-8", errors="replace") as f:
            for line in f:
                if "miniproxy.access" in line and any(form in line for form in forms):
                    return line
        return None

    def waitForAccessLine(self, reactor: Any, client: str) -> defer.Deferred[str]:
        """
        Wait for the access log line of the flow from C{client}.
        """
        d = pollUntil(
            reactor,
            lambda: self.accessLine(client) is not None,
            FLOW_TIMEOUT,
            what=f"the access log line of {client}",
        )
        return d.addCallback(lambda _: self.accessLine(client))

    def connect(
        self, reactor: Any, host: str, port: int, payload: bytes
    ) -> defer.Deferred[Client]:
        """
        Connect from the client namespace to C{host:port}, send C{payload}.

        @return: A L{Deferred} firing with the connected L{Client}.
        """
        endpointClass = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        client = Client(payload)
        with self.client.entered():
            d = connectProtocol(
                endpointClass(reactor, host, port, timeout=FLOW_TIMEOUT), client
            )
        return d


def _payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


class TransparentTests(unittest.TestCase):
    """
    C{twistd miniproxy} intercepting flows between namespaces.
    """

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        from twisted.internet import reactor

        reason = namespacesUnavailable(tools=("ip", "nft"))
        if reason is not None:
            raise unittest.SkipTest(reason)
        self.reactor = reactor
        self.topology = Topology(self)
        self.topology.startServer(reactor)
        yield self.topology.startProxy(reactor)
        self.addCleanup(self.stopProxy)

    def stopProxy(self) -> None:
        process = self.topology.process
        if process is not None:
            self.topology.bed.stopProcess(process)

    @defer.inlineCallbacks
    def relay(
        self, destination: str, port: int, clientHost: str, serverSidePeer: str
    ) -> Any:
        """
        Send a request from the client to C{destination:port} and check the
        proxy relays it: the server reads every byte, from the proxy's
        address, and the client reads every byte of the response; the access
        log line says where the flow went and that it went well.
        """
        topology = self.topology
        request = _payload(port, 256 * 1024 + 17)
        response = _payload(port + 1, 384 * 1024 + 3)
        topology.serverFactory.response = response  # type: ignore[attr-defined]
        client = yield topology.connect(self.reactor, destination, port, request)
        received, reason = yield client.done
        line = yield topology.waitForAccessLine(
            self.reactor, hostPort(clientHost, client.localPort)
        )
        [connection] = topology.serverFactory.connections  # type: ignore[attr-defined]
        yield connection.lost
        [(peer, serverPort, got)] = topology.serverFactory.requests  # type: ignore[attr-defined]
        self.assertEqual(
            (len(got), len(received)), (len(request), len(response)), line
        )
        self.assertTrue(got == request, "the request was altered")
        self.assertTrue(received == response, "the response was altered")
        self.assertEqual(serverPort, port)
        # The server's peer is the proxy, not the client: intercepted.
        self.assertEqual(peer, serverSidePeer)
        self.assertIn(f"-> {hostPort(destination, port)} ", line)
        self.assertIn("outcome=ok", line)
        self.assertIn(f"up={len(request)} ", line)
        self.assertIn(f"down={len(response)} ", line)
        return line

    def test_tproxyIPv4(self) -> Any:
        """
        A client connecting to the server's IPv4 address on port 80 is
        intercepted by the C{tproxy} listener and relayed to that address,
        byte for byte both ways.
        """
        return self.relay(SERVER4, 80, CLIENT4, PROXY_SERVER_SIDE4)

    def test_tproxyIPv6(self) -> Any:
        """
        The same over IPv6, through the IPv6 C{tproxy} listener.
        """
        return self.relay(SERVER6, 80, CLIENT6, PROXY_SERVER_SIDE6)

    def test_natRedirectIPv4(self) -> Any:
        """
        A flow NAT-redirected to a plain listener marked transparent goes to
        its original destination (C{SO_ORIGINAL_DST}), not to the proxy's
        own address.
        """
        return self.relay(SERVER4, 81, CLIENT4, PROXY_SERVER_SIDE4)

    def test_natRedirectIPv6(self) -> Any:
        """
        The same over IPv6 (C{IP6T_SO_ORIGINAL_DST}, a C{sockaddr_in6}).
        """
        return self.relay(SERVER6, 81, CLIENT6, PROXY_SERVER_SIDE6)

    @defer.inlineCallbacks
    def test_natRedirectIPv4ToDualStack(self) -> Any:
        """
        An IPv4 flow redirected to a dual-stack IPv6 listener goes to its
        IPv4 original destination, written as IPv4.
        """
        line = yield self.relay(SERVER4, 82, CLIENT4, PROXY_SERVER_SIDE4)
        self.assertNotIn("::ffff:", line.split(" via ")[0].split("->")[1])

    @defer.inlineCallbacks
    def assertRefused(self, destination: str, port: int, clientHost: str) -> Any:
        """
        A flow to a destination the policy does not allow is closed with no
        byte, never reaches the server, and is logged as refused.
        """
        topology = self.topology
        client = yield topology.connect(self.reactor, destination, port, b"")
        received, reason = yield client.done
        self.assertEqual(received, b"")
        line = yield topology.waitForAccessLine(
            self.reactor, hostPort(clientHost, client.localPort)
        )
        self.assertIn(f"-> {hostPort(destination, port)} ", line)
        self.assertIn("outcome=refused", line)
        self.assertIn("denied by policy", line)
        self.assertEqual(topology.serverFactory.connections, [])  # type: ignore[attr-defined]

    def test_refusedTproxy(self) -> Any:
        """
        No open relay: an intercepted flow to an address the policy does not
        allow is refused, although a server listens there.
        """
        return self.assertRefused(FORBIDDEN4, 80, CLIENT4)

    def test_refusedNat(self) -> Any:
        """
        No open relay through the NAT listeners either.
        """
        return self.assertRefused(FORBIDDEN4, 81, CLIENT4)


if sys.platform != "linux":  # pragma: no cover
    TransparentTests.skip = "network namespaces are Linux only"  # type: ignore[attr-defined]
