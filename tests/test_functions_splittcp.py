"""
Tests for L{miniproxy.functions.splittcp}.
"""

from __future__ import annotations

import socket

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from miniproxy.errors import ConfigError
from miniproxy.functions.splittcp import SplitTCP, configure
from miniproxy.interfaces import IFlowHandlerFactory, ISocketTuner


class SocketTransport(StringTransport):
    """
    A transport whose handle is a real (unconnected) TCP socket.
    """

    def __init__(self, family: int = socket.AF_INET) -> None:
        super().__init__()
        self.sock = socket.socket(family, socket.SOCK_STREAM)

    def getHandle(self) -> socket.socket:
        return self.sock


class SplitTCPTests(unittest.TestCase):
    """
    Split-TCP tunes both legs' sockets and costs nothing per flow.
    """

    def transport(self, family: int = socket.AF_INET) -> SocketTransport:
        t = SocketTransport(family)
        self.addCleanup(t.sock.close)
        return t

    def test_interfaces(self) -> None:
        function = configure({}, MemoryReactorClock())
        verifyObject(IFlowHandlerFactory, function)
        verifyObject(ISocketTuner, function)
        self.assertIsNone(function.handlerForFlow(object()))

    def test_defaults(self) -> None:
        """
        Both legs get TCP_NODELAY and a send buffer twice the receive
        buffer.
        """
        function = configure({}, MemoryReactorClock())
        for tune in (function.tuneAccepted, function.tuneOutgoing):
            for family in (socket.AF_INET, socket.AF_INET6):
                t = self.transport(family)
                tune(t)
                self.assertEqual(
                    t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1
                )
                rcv = t.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                snd = t.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                self.assertEqual(snd, 2 * rcv)

    def test_auto(self) -> None:
        """
        C{send-buffer = "auto"} and C{nodelay = false} leave the socket as
        the kernel made it.
        """
        t = self.transport()
        before = t.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        configure({"send-buffer": "auto", "nodelay": False}, None).tuneOutgoing(t)
        self.assertEqual(t.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), before)
        self.assertEqual(t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)

    def test_bytes(self) -> None:
        t = self.transport()
        configure({"send-buffer": 65536}, None).tuneOutgoing(t)
        # Linux doubles the value for its bookkeeping.
        self.assertEqual(t.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), 131072)

    def test_notASocket(self) -> None:
        """
        A transport without a socket (a test double, a Unix pipe) is left
        alone, and a closed socket is no error.
        """
        SplitTCP().tuneAccepted(StringTransport())
        t = self.transport()
        t.sock.close()
        SplitTCP().tuneAccepted(t)

    def test_badSettings(self) -> None:
        for settings, message in [
            ({"nodelay": "yes"}, "nodelay: must be true or false"),
            ({"send-buffer": "big"}, "send-buffer: must be"),
            ({"send-buffer": 0}, "send-buffer: must be"),
            ({"send-buffer": True}, "send-buffer: must be"),
            ({"window": 1}, "window: unknown setting of split-tcp"),
        ]:
            with self.assertRaises(ConfigError) as raised:
                configure(settings, None)
            self.assertTrue(str(raised.exception).startswith(message))
