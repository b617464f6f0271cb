# -*- test-case-name: tests.test_syntap -*-
"""
A raw socket read by the reactor: what the SYN tap and the netfilter queue
reader share.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IReadDescriptor)
class SocketReader:
    """
    Owns one socket and registers itself with the reactor as its reader.
    Subclasses open the socket in C{start} and hand it to L{_listen}, and
    implement C{doRead}.

    @ivar reactor: The reactor.
    """

    #: What the reactor's log lines about this reader say.
    prefix = "SocketReader"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._sock: socket.socket | None = None

    def _listen(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.reactor.addReader(self)

    @property
    def running(self) -> bool:
        """
        Whether the socket is open and read.
        """
        return self._sock is not None

    def stop(self) -> None:
        """
        Stop reading and close the socket.  Stopping twice is harmless.
        """
        sock, self._sock = self._sock, None
        if sock is not None:
            self.reactor.removeReader(self)
            sock.close()

    def fileno(self) -> int:
        """
        See L{IReadDescriptor}.
        """
        return self._sock.fileno() if self._sock is not None else -1

    def logPrefix(self) -> str:
        """
        See L{twisted.internet.interfaces.ILoggingContext}.
        """
        return self.prefix

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor dropped the descriptor.
        """
        self.stop()
