# -*- test-case-name: tests.test_functions_splittcp -*-
"""
The split-TCP function: the relay's TCP tuning.

The relay itself is the core of miniproxy (L{miniproxy.flow}); this function
tunes the two legs' sockets the way the paper found best:

 - C{TCP_NODELAY} on both legs, so a relayed segment is sent at once
   instead of waiting for Nagle's algorithm;
 - a send buffer of twice the receive window (C{SO_SNDBUF = 2 *
   SO_RCVBUF}), so that the sending leg can keep a full window in flight
   while the other leg refills it.

Linux already starts every connection with an initial congestion window of
10 segments (RFC 6928), which the paper had to add to lwip; nothing needs
to be done for it here (C{ip route ... initcwnd} changes it per route).

Settings (C{[function.split-tcp]}):

 - C{nodelay} (bool, default true);
 - C{send-buffer}: C{"2x-receive-window"} (default), C{"auto"} (leave the
   kernel's autotuning alone), or a number of bytes.
"""

from __future__ import annotations

import socket
from typing import Any

from zope.interface import implementer

from miniproxy.errors import ConfigError
from miniproxy.interfaces import IFlowHandlerFactory, ISocketTuner

NAME = "split-tcp"


def _socketOf(transport: Any) -> socket.socket | None:
    handle = getattr(transport, "getHandle", None)
    if handle is None:
        return None
    sock = handle()
    return sock if isinstance(sock, socket.socket) else None


@implementer(IFlowHandlerFactory, ISocketTuner)
class SplitTCP:
    """
    The configured split-TCP function.  It needs no per-flow handler, so it
    costs nothing per chunk.

    @ivar nodelay: Whether to set C{TCP_NODELAY}.
    @ivar sendBuffer: C{"2x-receive-window"}, C{"auto"}, or bytes.
    """

    name = NAME

    def __init__(self, nodelay: bool = True, sendBuffer: str | int = "2x-receive-window"):
        self.nodelay = nodelay
        self.sendBuffer = sendBuffer

    def handlerForFlow(self, flow: Any) -> None:
        """
        No handler: the tuning happens on the sockets.
        """
        return None

    def _tune(self, transport: Any) -> None:
        sock = _socketOf(transport)
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        try:
            if self.nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.sendBuffer == "2x-receive-window":
                rcv = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                # The kernel reports (and stores) twice what is set, for its
                # bookkeeping; halve it back so the ratio is the paper's.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcv)
            elif isinstance(self.sendBuffer, int):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sendBuffer)
        except OSError:
            # The socket may already be closed by its peer: nothing to tune.
            pass

    def tuneAccepted(self, transport: Any) -> None:
        """
        See L{ISocketTuner.tuneAccepted}.
        """
        self._tune(transport)

    def tuneOutgoing(self, transport: Any) -> None:
        """
        See L{ISocketTuner.tuneOutgoing}.
        """
        self._tune(transport)


def configure(settings: dict, reactor: Any) -> SplitTCP:
    """
    Make the split-TCP function from its settings.

    @raise ConfigError: On an unknown key or a bad value.
    """
    settings = dict(settings)
    nodelay = settings.pop("nodelay", True)
    if not isinstance(nodelay, bool):
        raise ConfigError(f"nodelay: must be true or false, not {nodelay!r}")
    sendBuffer = settings.pop("send-buffer", "2x-receive-window")
    if isinstance(sendBuffer, bool) or not (
        sendBuffer in ("2x-receive-window", "auto")
        or (isinstance(sendBuffer, int) and sendBuffer > 0)
    ):
        raise ConfigError(
            "send-buffer: must be \"2x-receive-window\", \"auto\" or a "
            f"positive number of bytes, not {sendBuffer!r}"
        )
    if settings:
        raise ConfigError(f"{sorted(settings)[0]}: unknown setting of {NAME}")
    return SplitTCP(nodelay=nodelay, sendBuffer=sendBuffer)
