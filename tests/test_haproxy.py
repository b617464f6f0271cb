"""
Interoperability of miniproxy's PROXY v2 carrier with a real HAProxy (the
C{haproxy} package), on loopback: HAProxy's C{send-proxy-v2} into a
miniproxy listener that reads headers, and miniproxy's C{carry=proxy-v2}
into HAProxy's C{accept-proxy}.

HAProxy runs as a child process (C{haproxy -f CONFIG -db}) with a config
file in the test's temporary directory; it is ready once its probe port
accepts connections, and it is killed in the test's cleanup.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from miniproxy.address import DestinationSource, HostPort
from miniproxy.flow import Outcome
from miniproxy.wire.proxyv2 import Command
from tests.support import TEST_TIMEOUT, Network, waitUntil, withTimeout

HAPROXY = shutil.which("haproxy")


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that nothing uses now, for HAProxy to bind.

    It is taken below the kernel's ephemeral range, so that no connection
    made meanwhile (by this test or any other process) takes it as its
    local port and makes HAProxy's bind fail.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = (int(n) for n in f.read().split())
    if low > 11024:
        candidates = range(10000, low)
    else:
        candidates = range(high + 1, 65536)
    for _ in range(100):
        port = random.choice(candidates)
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            sock.close()
    raise AssertionError("no free port outside the ephemeral range")


def accepting(port: int) -> bool:
    """
    Whether something accepts connections on 127.0.0.1:C{port} (a loopback
    connect is answered at once, so this does not block).
    """
    sock = socket.socket()
    try:
        return sock.connect_ex(("127.0.0.1", port)) == 0
    finally:
        sock.close()


class _HAProxyProcess(ProcessProtocol):
    """
    Collects HAProxy's output and tells when it ends.
    """

    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.ended: defer.Deferred = defer.Deferred()
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        self.ended.callback(None)


class HAProxy:
    """
    One HAProxy process for one test.

    @ivar probePort: The port whose accepting connections says HAProxy is
        ready (a frontend that rejects every connection).
    """

    def __init__(self, testCase: unittest.TestCase, sections: str) -> None:
        """
        @param sections: The config's proxies (frontends, backends), after
            the C{global}, C{defaults} and probe sections written here.
        """
        self.testCase = testCase
        self.probePort = freePort()
        directory = testCase.mktemp()
        os.makedirs(directory)
        self.configPath = os.path.join(directory, "haproxy.cfg")
        with open(self.configPath, "w") as f:
            f.write(
                "global\n"
                "    nbthread 1\n"
                "defaults\n"
                "    timeout connect 5s\n"
                "    timeout client 20s\n"
                "    timeout server 20s\n"
                "frontend probe\n"
                "    mode tcp\n"
                f"    bind 127.0.0.1:{self.probePort}\n"
                "    tcp-request connection reject\n"
                + sections
            )
        self.process = _HAProxyProcess()

    def output(self) -> str:
        """
        What HAProxy wrote so far.
        """
        return b"".join(self.process.output).decode("utf-8", "replace")

    @defer.inlineCallbacks
    def start(self) -> Any:
        """
        Start HAProxy and wait until it accepts connections.
        """
        from twisted.internet import reactor

        assert HAPROXY is not None
        reactor.spawnProcess(
            self.process,
            HAPROXY,
            [HAPROXY, "-f", self.configPath, "-db"],
            env=dict(os.environ),
        )
        self.testCase.addCleanup(self.stop)

        def ready() -> bool:
            if self.process.reason is not None:
                raise AssertionError(f"haproxy exited: {self.output()}")
            return accepting(self.probePort)

        yield waitUntil(ready, f"haproxy to listen on {self.probePort}", timeout=10)

    def stop(self) -> defer.Deferred:
        """
        Kill HAProxy and wait until it is gone.
        """
        if self.process.reason is None:
            self.process.transport.signalProcess("KILL")  # type: ignore[union-attr]
        return withTimeout(self.process.ended, 10, "haproxy to exit")


def sendProxyV2(frontPort: int, miniproxyPort: int, destination: HostPort) -> str:
    """
    A TCP frontend that sets the destination HAProxy reports, and sends
    its connections to miniproxy with a PROXY v2 header.
    """
    return (
        "frontend fe\n"
        "    mode tcp\n"
        f"    bind 127.0.0.1:{frontPort}\n"
        f"    tcp-request connection set-dst ipv4({destination.host})\n"
        f"    tcp-request connection set-dst-port int({destination.port})\n"
        "    default_backend to_miniproxy\n"
        "backend to_miniproxy\n"
        "    mode tcp\n"
        f"    server miniproxy 127.0.0.1:{miniproxyPort} send-proxy-v2\n"
    )


def acceptProxy(port: int) -> str:
    """
    An HTTP frontend that reads PROXY headers and answers with the client
    and destination it believes, as C{SRC:PORT DST:PORT}.
    """
    return (
        "frontend web\n"
        "    mode http\n"
        f"    bind 127.0.0.1:{port} accept-proxy\n"
        "    http-request return status 200 content-type text/plain "
        'lf-string "%[src]:%[src_port] %[dst]:%[dst_port]"\n'
    )


DESTINATION = HostPort("192.0.2.10", 80)


def policy(**rule: Any) -> dict[str, Any]:
    return {"rules": [dict(action="allow", destinations=["192.0.2.10/32"], ports=[80], **rule)]}


def reading(
    to: str | None = None, trusted: tuple[str, ...] = ("127.0.0.0/8",), **rule: Any
) -> dict[str, Any]:
    """
    A config document: one listener that reads PROXY v2 headers from
    C{trusted}, with a policy allowing L{DESTINATION}.
    """
    listener: dict[str, Any] = {
        "endpoint": "tcp:0:interface=127.0.0.1",
        "explicit": ["proxy-v2"],
        "trusted": list(trusted),
    }
    if to is not None:
        listener["to"] = to
    return {
        "listeners": [listener],
        "functions": ["policy"],
        "function": {"policy": policy(**rule)},
    }


class HAProxyTests(unittest.TestCase):
    """
    miniproxy and HAProxy understand each other's PROXY v2 headers.
    """

    timeout = TEST_TIMEOUT

    def setUp(self) -> None:
        if HAPROXY is None:
            raise unittest.SkipTest("haproxy is not installed (apt-get install haproxy)")
        self.network = Network(self)

    @defer.inlineCallbacks
    def httpThrough(self, port: int) -> Any:
        """
        An HTTP/1.0 request through C{port}.

        @return: The client's own port and the response's body.
        """
        client = yield self.network.connect(port)
        clientPort = client.transport.getHost().port
        client.transport.write(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        yield withTimeout(client.eof, 10, "the response")
        client.transport.loseConnection()
        head, _, body = client.received.partition(b"\r\n\r\n")
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        return clientPort, body.decode("ascii")

    @defer.inlineCallbacks
    def test_sendProxyIntoMiniproxy(self):  # type: ignore[no-untyped-def]
        """
        HAProxy's C{send-proxy-v2} header tells miniproxy the original
        client and the destination; bytes are relayed exactly both ways.
        """
        echo, servers = self.network.server(echo=True)
        proxy = yield self.network.startProxy(
            to=None, listen=None, document=reading(to=f"tcp:host=127.0.0.1:port={echo}")
        )
        front = freePort()
        haproxy = HAProxy(self, sendProxyV2(front, proxy.port, DESTINATION))
        yield haproxy.start()
        client = yield self.network.connect(front)
        clientPort = client.transport.getHost().port
        payload = os.urandom(200_000)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        # The client closes once its FIN is sent and the echo's FIN came.
        yield withTimeout(client.lost, 15, "the echo and its FIN")
        self.assertTrue(client.sawEOF)
        self.assertFalse(client.wasReset())
        self.assertEqual(client.received, payload)
        server = servers.peers[0]
        self.assertEqual(server.received, payload)
        flow = yield proxy.nextClosed()
        self.assertEqual(flow.origin, HostPort("127.0.0.1", clientPort))
        self.assertEqual(flow.destination, DESTINATION)
        self.assertIs(flow.destinationSource, DestinationSource.EXPLICIT)
        self.assertIs(flow.proxyHeader.command, Command.PROXY)
        self.assertNotEqual(flow.client, flow.origin)
        self.assertEqual(flow.bytesFromClient, len(payload))
        self.assertEqual(flow.bytesFromServer, len(payload))
        self.assertIs(flow.outcome, Outcome.OK)
        self.assertEqual(len(servers.peers), 1)

    @defer.inlineCallbacks
    def test_carryIntoAcceptProxy(self):  # type: ignore[no-untyped-def]
        """
        miniproxy's C{carry=proxy-v2} header makes HAProxy see the client
        as miniproxy saw it.
        """
        web = freePort()
        haproxy = HAProxy(self, acceptProxy(web))
        yield haproxy.start()
        proxy = yield self.network.startProxy(
            to=f"tcp:host=127.0.0.1:port={web}:carry=proxy-v2"
        )
        clientPort, body = yield self.httpThrough(proxy.port)
        self.assertEqual(body, f"127.0.0.1:{clientPort} 127.0.0.1:{web}")
        flow = yield proxy.nextClosed()
        self.assertIs(flow.outcome, Outcome.OK)
        self.assertEqual(flow.client.port, clientPort)

    @defer.inlineCallbacks
    def test_chain(self):  # type: ignore[no-untyped-def]
        """
        HAProxy -> miniproxy -> HAProxy: the last one sees the first one's
        client and the destination the first one set, passed on by
        miniproxy's policy next hop.
        """
        web = freePort()
        front = freePort()
        proxy = yield self.network.startProxy(
            to=None, listen=None,
            document=reading(**{"next-hop": f"tcp:host=127.0.0.1:port={web}:carry=proxy-v2"}),
        )
        haproxy = HAProxy(
            self, sendProxyV2(front, proxy.port, DESTINATION) + acceptProxy(web)
        )
        yield haproxy.start()
        clientPort, body = yield self.httpThrough(front)
        self.assertEqual(body, f"127.0.0.1:{clientPort} {DESTINATION.host}:{DESTINATION.port}")
        flow = yield proxy.nextClosed()
        self.assertEqual(flow.origin, HostPort("127.0.0.1", clientPort))

    @defer.inlineCallbacks
    def assertRefused(self, document: dict[str, Any], destination: HostPort, reason: str) -> Any:
        echo, servers = self.network.server(echo=True)
        document["listeners"][0]["to"] = f"tcp:host=127.0.0.1:port={echo}"
        proxy = yield self.network.startProxy(to=None, listen=None, document=document)
        front = freePort()
        haproxy = HAProxy(self, sendProxyV2(front, proxy.port, destination))
        yield haproxy.start()
        client = yield self.network.connect(front)
        client.transport.write(b"hello")
        flow = yield proxy.nextClosed()
        # HAProxy passes the close on (a FIN, or a reset if miniproxy closed
        # with the header unread).
        yield withTimeout(
            defer.DeferredList([client.eof, client.lost], fireOnOneCallback=True,
                               consumeErrors=True),
            10, "haproxy to close the client",
        )
        self.assertIs(flow.outcome, Outcome.REFUSED)
        self.assertIn(reason, flow.reason)
        self.assertEqual(client.received, b"")
        self.assertEqual(servers.peers, [])
        self.assertIsNone(flow.startedBy)
        return flow

    @defer.inlineCallbacks
    def test_untrustedPeer(self):  # type: ignore[no-untyped-def]
        """
        A header from a peer outside C{trusted} is refused: no open relay.
        """
        flow = yield self.assertRefused(
            reading(trusted=("10.0.0.0/8",)), DESTINATION, "is not trusted"
        )
        self.assertIsNone(flow.origin)

    @defer.inlineCallbacks
    def test_destinationNotAllowed(self):  # type: ignore[no-untyped-def]
        """
        A valid header from a trusted peer naming a destination the policy
        does not allow is refused.
        """
        flow = yield self.assertRefused(reading(), HostPort("192.0.2.10", 25), "denied by policy")
        self.assertEqual(flow.destination, HostPort("192.0.2.10", 25))

    def test_readinessDeadline(self) -> Any:
        """
        A config HAProxy rejects fails the start quickly with its message,
        instead of waiting forever.
        """
        haproxy = HAProxy(self, "frontend broken\n    bind 127.0.0.1:1 nonsense-keyword\n")
        d = haproxy.start()
        return self.assertFailure(d, AssertionError).addCallback(
            lambda e: self.assertIn("haproxy exited", str(e))
        )
