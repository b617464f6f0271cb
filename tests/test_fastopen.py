"""
TCP Fast Open on both legs of real flows on loopback.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import defer
from twisted.trial import unittest

from miniproxy.flow import Moment, Outcome
from miniproxy.syntap import SynTap
from miniproxy.tcpclient import TCP_FASTOPEN_CONNECT
from tests.support import Network
from tests.test_syntap import Recorder
from tests.test_tcpclient import FASTOPEN_SYSCTL, _writeSysctl


class FastOpenFlowTests(unittest.TestCase):
    """
    With C{fastopen=yes} on the next hop, the client's first bytes ride in
    the outgoing leg's SYN; a Fast Open SYN to the listener begins its flow
    with its data.
    """

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root: the SYN tap and the tcp_fastopen sysctl")
        with open(FASTOPEN_SYSCTL) as f:
            before = f.read().strip()
        self.addCleanup(_writeSysctl, before)
        _writeSysctl("3")
        self.network = Network(self)

    @defer.inlineCallbacks
    def flow(self, proxy, servers, request: bytes):  # type: ignore[no-untyped-def]
        client = yield self.network.connect(proxy.port)
        client.transport.write(request)
        server = yield servers.nextPeer()
        yield server.waitForBytes(len(request))
        self.assertEqual(server.received, request)
        server.transport.write(b"answer")
        yield client.waitForBytes(6)
        self.assertEqual(client.received, b"answer")
        client.transport.loseConnection()
        server.transport.loseConnection()
        flow = yield proxy.nextClosed()
        self.assertIs(flow.outcome, Outcome.OK)
        return flow

    @defer.inlineCallbacks
    def test_outgoingSynCarriesRequest(self):  # type: ignore[no-untyped-def]
        from twisted.internet import reactor

        port, servers = self.network.server()
        proxy = yield self.network.startProxy(
            to=f"tcp:host=127.0.0.1:port={port}:fastopen=yes", mode="first-data"
        )
        recorder = Recorder()
        tap = SynTap(reactor, socket.AF_INET, [port], recorder)
        tap.start()
        self.addCleanup(tap.stop)
        for i in range(3):
            flow = yield self.flow(proxy, servers, b"request %d" % i)
            self.assertIs(flow.startedBy, Moment.FIRST_DATA)
        # A cookie is held after the first connection at the latest: from
        # then on the request is in the SYN.
        self.assertEqual(len(recorder.segments), 3)
        self.assertEqual(recorder.segments[2].payload, b"request 2")
        self.assertEqual(recorder.segments[1].payload, b"request 1")

    @defer.inlineCallbacks
    def test_fastOpenClient(self):  # type: ignore[no-untyped-def]
        """
        A client's Fast Open SYN with data is accepted at once; its flow
        begins at the SYN and its bytes are relayed.
        """
        from twisted.internet import threads

        port, servers = self.network.server()
        proxy = yield self.network.startProxy(to=f"tcp:host=127.0.0.1:port={port}", mode="early")

        def fastOpenClient(message: bytes) -> bytes:
            c = socket.socket()
            try:
                c.settimeout(10)
                c.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
                c.connect(("127.0.0.1", proxy.port))
                c.sendall(message)
                chunks = []
                while True:
                    data = c.recv(100)
                    if not data:
                        return b"".join(chunks)
                    chunks.append(data)
            finally:
                c.close()

        for i in range(2):
            answer = threads.deferToThread(fastOpenClient, b"hello %d" % i)
            server = yield servers.nextPeer()
            yield server.waitForBytes(7)
            server.transport.write(b"bye")
            server.transport.loseConnection()
            got = yield answer
            self.assertEqual(got, b"bye")
            self.assertEqual(server.received, b"hello %d" % i)
            flow = yield proxy.nextClosed()
            self.assertIs(flow.startedBy, Moment.SYN)
