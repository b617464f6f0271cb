# -*- test-case-name: tests.test_benchmarks -*-
"""
The CPython floor: the smallest TCP relay this interpreter can run, as a
benchmark peer.  It is not part of miniproxy and has none of its features
(no hooks, no policy, no limits, no log, no early SYN, no splice).

It answers one question for the targets of the performance page: how
fast can I{any} proxy written in CPython be on this machine?  It runs one
level-triggered C{epoll} loop on the C{socket} and C{select} modules
alone, with no framework between the system calls and the relay: each
event costs one C{epoll_wait} share, one dictionary lookup and one method
call.  It still relays exactly, with backpressure and half-close, so that
the benchmarks' exchanges (which end with the server's FIN) work through
it.

Usage: C{python -S -m benchmarks.pyfloor LISTEN_PORT BACKEND_PORT}.
"""

from __future__ import annotations

import errno
import select
import socket
import sys

#: The most bytes read from a socket at once.
CHUNK = 65536

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


class End:
    """
    One socket of a relayed pair.

    @ivar pending: Bytes read from the peer that this socket has not taken
        yet; while there are any, the peer is not read.
    @ivar readDone: Whether this socket's end of file was read.
    @ivar writeShut: Whether this socket's write side was shut down.
    @ivar connecting: Whether this (outgoing) socket's connect is pending.
    """

    __slots__ = ("sock", "fd", "peer", "pending", "readDone", "writeShut",
                 "connecting", "mask")

    def __init__(self, sock: socket.socket, connecting: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer: End = self
        self.pending = b""
        self.readDone = False
        self.writeShut = False
        self.connecting = connecting
        self.mask = 0


class FloorRelay:
    """
    The relay's loop: accept, connect, relay, half-close, close.
    """

    def __init__(self, listener: socket.socket, backend: tuple[str, int]) -> None:
        """
        @param listener: A listening socket; the relay makes it
            non-blocking and accepts from it.
        @param backend: The address every flow is relayed to.
        """
        self.backend = backend
        self.listener = listener
        self.listener.setblocking(False)
        self.poller = select.epoll()
        self.poller.register(self.listener.fileno(), _IN)
        self.ends: dict[int, End] = {}
        self._wake, self._waker = socket.socketpair()
        self.poller.register(self._wake.fileno(), _IN)
        self.running = True

    def stop(self) -> None:
        """
        Make L{run} return (from any thread), then close every socket but
        the listener.
        """
        self.running = False
        self._waker.send(b"x")

    def _update(self, end: End) -> None:
        # The events this end waits for: writable while it connects or has
        # bytes to take; readable while it may be read and its peer can
        # take bytes.
        peer = end.peer
        mask = 0
        if end.connecting or end.pending:
            mask |= _OUT
        if not (end.readDone or end.connecting or peer.connecting or peer.pending):
            mask |= _IN
        if mask != end.mask:
            end.mask = mask
            self.poller.modify(end.fd, mask)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                    return
                raise
            client.setblocking(False)
            server = socket.socket()
            server.setblocking(False)
            err = server.connect_ex(self.backend)
            if err not in (0, errno.EINPROGRESS):
                client.close()
                server.close()
                continue
            a = End(client, False)
            b = End(server, err != 0)
            a.peer, b.peer = b, a
            for end in (a, b):
                self.ends[end.fd] = end
                self.poller.register(end.fd, 0)
                self._update(end)

    def _close(self, end: End) -> None:
        for e in (end, end.peer):
            if self.ends.pop(e.fd, None) is not None:
                self.poller.unregister(e.fd)
                e.sock.close()

    def _shutdown(self, end: End) -> None:
        # The peer's end of file, after every byte: end's write side.
        end.writeShut = True
        try:
            end.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _readable(self, end: End) -> None:
        peer = end.peer
        try:
            data = end.sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._close(end)
            return
        if not data:
            end.readDone = True
            if not peer.pending:
                self._shutdown(peer)
            if peer.readDone:
                self._close(end)
                return
            self._update(end)
            return
        try:
            sent = peer.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(end)
            return
        if sent < len(data):
            peer.pending = data[sent:]
            self._update(end)
            self._update(peer)

    def _writable(self, end: End) -> None:
        peer = end.peer
        if end.connecting:
            if end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._close(end)
                return
            end.connecting = False
        elif end.pending:
            try:
                sent = end.sock.send(end.pending)
            except BlockingIOError:
                return
            except OSError:
                self._close(end)
                return
            end.pending = end.pending[sent:]
            if not end.pending and peer.readDone:
                self._shutdown(end)
                if end.readDone:
                    self._close(end)
                    return
        self._update(end)
        self._update(peer)

    def run(self) -> None:
        """
        Relay until L{stop} is called.
        """
        listenerFd = self.listener.fileno()
        ends = self.ends
        poll = self.poller.poll
        while self.running:
            for fd, events in poll():
                if fd == listenerFd:
                    self._accept()
                    continue
                end = ends.get(fd)
                if end is not None and events & _OUT:
                    self._writable(end)
                end = ends.get(fd)
                if end is not None and events & ~_OUT:
                    self._readable(end)
        for end in list(ends.values()):
            self._close(end)
        self.poller.close()
        self._wake.close()
        self._waker.close()


def main(argv: list[str]) -> None:
    """
    Run the relay: C{LISTEN_PORT BACKEND_PORT} on 127.0.0.1.
    """
    listenPort, backendPort = int(argv[0]), int(argv[1])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", listenPort))
    listener.listen(1024)
    FloorRelay(listener, ("127.0.0.1", backendPort)).run()


if __name__ == "__main__":
    main(sys.argv[1:])
