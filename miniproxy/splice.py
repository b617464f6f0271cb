# -*- test-case-name: tests.test_splice -*-
"""
The zero-copy relay: bytes go from one leg's socket to the other's through a
pipe with C{splice(2)}, never entering userspace.

A flow relays this way while no function of it looks at the bytes (no
handler wants data, see L{miniproxy.interfaces.IFlowHandler.wantsData})
and both legs are plain TCP sockets (not TLS, not the in-memory transports
of L{miniproxy.testing}), and only in a direction that has carried enough
bytes for splicing to pay (the C{splice-after} limit,
L{miniproxy.limits.Limits.spliceAfter}): until then the direction relays in
userspace, so an idle or short flow has no relay, no pipe and no replaced
method at all.  Each spliced direction has its own pipe, made when its
first byte is spliced and closed when the direction ends (or the flow
does).

The relay plugs into Twisted's reactor the way Twisted's own
C{abortConnection} does: it replaces methods on the transport instance.
The source transport's C{doRead} splices from the socket into the pipe,
then from the pipe into the sink's socket, and again, until the source has
nothing more (C{EAGAIN}) or C{ROUNDS} chunks went through (then the other
descriptors have their turn).  When the sink's socket cannot take
everything, the source stops being read (the pause bit
L{miniproxy.flow.PAUSED_SPLICE}) and the sink's transport waits to be
writable (C{startWriting}); its C{doWrite} drains the pipe first, then goes
on splicing from the source, still paused, while the sink takes the bytes
(so a relay bound by its sink changes no C{epoll} interest: no
C{epoll_ctl} per pipe), and once the source has nothing more runs
Twisted's own C{doWrite} for what the transport itself holds and for its
half-close and close, and reads the source again once both are empty.
While the sink's transport holds bytes, the source waits the same way.
While a direction is spliced, its sink's socket takes bytes only while it
holds less than the bound unsent (C{TCP_NOTSENT_LOWAT}; put back
when the direction leaves the splice path): the rest waits in the pipe or
in the source's socket, and the proxy sends it when the sink is writable,
instead of the receiver's acknowledgements clocking it out of a long send
queue on the receiver's CPU.
The epoll reactor keys descriptors by their number,
so the relay registers no object of its own: it only uses the two
transports.

The semantics of the userspace relay hold:

 - bytes arrive exactly and in order: bytes enter the pipe only while the
   sink's transport holds nothing (so a direction that switches from
   userspace splices nothing until what it wrote there is written out),
   and the flow writes to a sink only once its pipe is empty
   (L{SpliceRelay.beforeWrite} moves what the pipe holds into the
   transport first);
 - backpressure: a pipe holds at most the flow's buffer bound
   (C{max-buffer}); while it holds anything, the source is not read
   through the reactor (the sink's writability splices on from it only
   once the pipe is empty), and the sink's socket takes bytes only while
   it holds less than the bound unsent;
 - half-close: the source's end of file is read only once its pipe is
   empty, so the FIN it becomes follows every byte;
 - resets, idle timeouts, byte counts, first-byte times and the access log
   are the userspace relay's (see L{miniproxy.flow.Flow.noteSpliced}).

A flow leaves the splice path (L{SpliceRelay.suspend}) when a function
asks for the bytes (L{miniproxy.interfaces.IFlow.wantsDataChanged}): what
the pipes hold is written on first, then the userspace relay goes on.  If
the kernel refuses C{splice} on these sockets (C{EINVAL}, C{ENOSYS}), the
process relays in userspace from then on, with one log line; a flow that
cannot have a pipe (out of descriptors) does for the rest of its life.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import main, tcp
from twisted.logger import Logger

from miniproxy.flow import PAUSED_SPLICE, buffered

if TYPE_CHECKING:
    from miniproxy.flow import Flow
    from miniproxy.legs import Leg

_log = Logger(namespace="miniproxy.splice")

#: The flags of every C{splice} call: move pages rather than copy them
#: where the kernel can, and never block on the pipe (the sockets are
#: non-blocking themselves).
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

#: The errors that say the kernel cannot splice these descriptors at all.
UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS})

#: The most times one event splices a chunk in and out before letting the
#: reactor serve other descriptors.
ROUNDS = 4

#: The socket option that bounds the bytes a TCP socket holds unsent
#: (Linux 3.12); 0 is the kernel's default (no bound).
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)

# What _Direction._pump ended with.
_EMPTY = object()  # the source had nothing more (EAGAIN)
_SINK_FULL = object()  # the pipe holds bytes the sink did not take
_BUDGET = object()  # ROUNDS chunks went through
_END = object()  # the source's end of file
_LOST = object()  # the source's connection broke
_REFUSED = object()  # the kernel cannot splice: the flow relays in userspace

# The system call, looked up at each call so that tests can replace it.
splice: Callable[..., int] | None = getattr(os, "splice", None)


class SpliceStats:
    """
    What the splice path did in this process.

    @ivar available: Whether the splice path may be used: C{os.splice}
        exists and the kernel has not refused it.
    @ivar relays: The flows that switched to the splice path.
    @ivar spliced: The bytes written to a socket from a pipe.
    @ivar suspended: The times a flow left the splice path for a function
        that asked for the bytes.
    @ivar unsupported: The error that turned the splice path off, or
        L{None}.
    """

    def __init__(self) -> None:
        self.available = splice is not None
        self.relays = 0
        self.spliced = 0
        self.suspended = 0
        self.unsupported: str | None = None


#: The process's splice statistics and switch.
stats = SpliceStats()


def turnOff(why: str) -> None:
    """
    The kernel cannot splice these sockets: relay in userspace from now on,
    in every flow of the process, and say so once.
    """
    if not stats.available:
        return
    stats.available = False
    stats.unsupported = why
    _log.warn(
        "splice(2) is not supported here ({why}): relaying in userspace",
        why=why,
    )


def _plainTCP(transport: Any) -> bool:
    # A connected plain TCP socket, not closing, not being aborted.
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return False
    if (
        not transport.connected
        or transport.disconnecting
        or transport.disconnected
        or transport._aborting
    ):
        return False
    sock = getattr(transport, "socket", None)
    return (
        sock is not None
        and sock.family in (socket.AF_INET, socket.AF_INET6)
        and sock.type == socket.SOCK_STREAM
    )


def _own(transport: Any, name: str) -> bool:
    """
    Whether C{transport}'s method C{name} is its class's own: nobody (a
    connect in progress, C{abortConnection}, a splice direction) replaced
    it on the instance.  Asked without C{vars()}, which would make the
    instance's C{__dict__} (CPython keeps an instance's attributes without
    one until somebody asks for it).
    """
    return getattr(getattr(transport, name), "__func__", None) is getattr(
        type(transport), name
    )


def spliceable(transport: object) -> bool:
    """
    Whether a leg's transport is a connected, plain TCP socket whose
    methods nobody replaced: what the splice path can relay.
    """
    return (
        _plainTCP(transport)
        and _own(transport, "doRead")
        and _own(transport, "doWrite")
    )


class _Direction:
    """
    One direction of a spliced flow: from the C{source} leg's socket through
    a pipe to the C{sink} leg's socket.

    It keeps no bound method: the transports' own methods are their
    classes', called as such, and the ones it puts on the transports are
    made when it attaches.

    @ivar held: Bytes in the pipe now.
    @ivar spliced: Bytes written from the pipe to the sink so far.
    @ivar flushed: Bytes read out of the pipe into the sink's transport
        (see L{flush}) so far.
    @ivar attached: Whether the transports' methods are replaced.
    @ivar ended: Whether the source's end of file was read.
    @ivar sinkError: The sink's connection broke during a splice: its
        C{doWrite} reports this (C{main.CONNECTION_LOST}), or L{None}.
    @ivar sourceError: The source's connection broke during a splice made
        from the sink's C{doWrite}: the source's C{doRead} reports this, or
        L{None}.
    """

    __slots__ = (
        "relay",
        "source",
        "sink",
        "fromClient",
        "bound",
        "held",
        "spliced",
        "flushed",
        "attached",
        "ended",
        "sinkError",
        "sourceError",
        "_pipe",
        "_sourceFd",
        "_sinkFd",
        "_unsentBefore",
    )

    def __init__(
        self, relay: SpliceRelay, source: Leg, sink: Leg, fromClient: bool, bound: int
    ) -> None:
        self.relay = relay
        self.source = source
        self.sink = sink
        self.fromClient = fromClient
        self.bound = bound
        self.held = 0
        self.spliced = 0
        self.flushed = 0
        self.attached = False
        self.ended = False
        self.sinkError: Any = None
        self.sourceError: Any = None
        self._pipe: tuple[int, int] | None = None
        self._sourceFd = -1
        self._sinkFd = -1
        self._unsentBefore: int | None = None

    def __repr__(self) -> str:
        way = "client->server" if self.fromClient else "server->client"
        return f"<splice {way} held={self.held} spliced={self.spliced}>"

    def usable(self) -> bool:
        """
        Whether this direction can be spliced now: its source may still
        send and its sink may still be written to, both are connected plain
        TCP sockets, and the methods it would replace are their own.
        """
        source, sink = self.source, self.sink
        if (
            self.ended
            or source.readClosed
            or source.disconnected
            or sink.writeClosed
            or sink.disconnected
        ):
            return False
        sourceTransport: Any = source.transport
        sinkTransport: Any = sink.transport
        return (
            _plainTCP(sourceTransport)
            and _plainTCP(sinkTransport)
            and not sinkTransport._writeDisconnecting
            and _own(sourceTransport, "doRead")
            and _own(sinkTransport, "doWrite")
        )

    def attach(self) -> None:
        """
        Replace the source transport's C{doRead} and the sink transport's
        C{doWrite} with this direction's.
        """
        source: Any = self.source.transport
        sink: Any = self.sink.transport
        self._sourceFd = source.fileno()
        self._sinkFd = sink.fileno()
        source.doRead = self.doRead
        sink.doWrite = self.doWrite
        self.attached = True
        # While spliced, the sink's socket takes bytes only while it holds
        # less than the bound unsent: the rest waits in the pipe (or
        # the source's socket), and this process sends it when the sink is
        # writable, rather than the peer's acknowledgements clocking it out
        # of a long send queue (on the peer's CPU, for a local peer).
        try:
            self._unsentBefore = sink.socket.getsockopt(
                socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT
            )
            sink.socket.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, self.bound)
        except OSError:
            self._unsentBefore = None

    def detach(self) -> None:
        """
        Put the transports' own methods back (unless someone replaced ours
        since, as C{abortConnection} does).
        """
        if not self.attached:
            return
        self.attached = False
        source: Any = self.source.transport
        sink: Any = self.sink.transport
        if source is not None and getattr(source.doRead, "__self__", None) is self:
            del source.doRead
        if sink is not None and getattr(sink.doWrite, "__self__", None) is self:
            del sink.doWrite
        unsent, self._unsentBefore = self._unsentBefore, None
        if unsent is not None and sink is not None and sink.connected:
            try:
                sink.socket.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, unsent)
            except OSError:
                pass

    def closePipe(self) -> None:
        """
        Close the pipe, discarding what it holds.
        """
        pipe, self._pipe = self._pipe, None
        self.held = 0
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])

    def _openPipe(self) -> tuple[int, int]:
        readEnd, writeEnd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # The kernel rounds the size up to a power of two pages; what
            # the pipe holds is bounded by the splice lengths anyway.
            fcntl.fcntl(writeEnd, fcntl.F_SETPIPE_SZ, self.bound)
        except OSError:
            pass
        self._pipe = (readEnd, writeEnd)
        return self._pipe

    def _read(self) -> Any:
        # The source transport's own doRead: the userspace relay.
        transport: Any = self.source.transport
        return type(transport).doRead(transport)

    # -- the reactor's calls ---------------------------------------------

    def doRead(self) -> Any:
        """
        The source is readable: splice what it has into the pipe and on
        into the sink, as much as the sink takes.
        """
        if self.sourceError is not None:
            return self.sourceError
        if self.held:
            # Read again while the pipe still holds bytes (another reason
            # to pause went away): the sink's writability resumes reading.
            self._waitForSink()
            return None
        sink: Any = self.sink.transport
        if sink._writeDisconnecting or not sink.connected:
            # A sink being closed is the userspace relay's business.
            return self._read()
        if buffered(sink):
            # What the sink's transport holds goes first (the bytes a
            # direction relayed before it switched, or bytes the flow
            # wrote): read again once it is written.
            self._waitForSink()
            return None
        if self._pipe is None:
            try:
                self._openPipe()
            except OSError as e:
                # Out of descriptors: relay this flow in userspace.
                _log.info("no pipe for a spliced flow ({error}): userspace", error=e)
                self.relay.suspend()
                self.relay.off = True
                return self._read()
        outcome = self._pump()
        if outcome is _SINK_FULL:
            self._waitForSink()
        elif outcome is _END:
            # End of file, with the pipe empty: the FIN follows every
            # byte.  Twisted reports it to the leg (a half-close).
            self.ended = True
            self.closePipe()
            return main.CONNECTION_DONE
        elif outcome is _LOST:
            return main.CONNECTION_LOST
        elif outcome is _REFUSED:
            return self._read()
        return None

    def doWrite(self) -> Any:
        """
        The sink is writable: drain the pipe into it, and go on splicing
        from the source while the sink takes it (the source stays paused,
        so a sink that keeps up costs no C{epoll_ctl}); once the source has
        nothing more, let the transport write what it holds itself (and
        half-close or close) and read the source again.
        """
        if self.sinkError is not None:
            return self.sinkError
        if self.held:
            self._drain()
            if self.sinkError is not None:
                return self.sinkError
            if self.held:
                return None
        transport: Any = self.sink.transport
        source = self.source
        if (
            self.attached
            and self._pipe is not None
            # Paused for the pipe alone: what would read it again now.
            and source._paused == PAUSED_SPLICE
            and not (source.readClosed or source.disconnected or source.aborting)
            and not source.transport.disconnecting  # type: ignore[union-attr]
            and self.sourceError is None
            and not self.ended
            and not buffered(transport)
            and not transport.disconnecting
            and not transport._writeDisconnecting
        ):
            outcome = self._pump()
            if outcome is _SINK_FULL:
                if self.sinkError is not None:
                    return self.sinkError
                return None
            if outcome is _BUDGET:
                # The source has more: the sink, still writable, is
                # called again once the reactor served the others.
                return None
            if outcome is _LOST:
                # The source's reset, reported where Twisted would: by the
                # source's doRead, once it is read again below.
                self.sourceError = main.CONNECTION_LOST
            # _EMPTY, _END (the source reads its end of file again) and
            # _REFUSED (the userspace relay has taken over): on below.
        result = type(transport).doWrite(transport)
        if not result and not buffered(transport):
            # The pipe and the transport are empty: read the source again.
            self.source.resumeReading(PAUSED_SPLICE)
        return result

    # -- moving bytes ----------------------------------------------------

    def _pump(self) -> object:
        """
        Splice from the source into the pipe and on into the sink until the
        source has nothing more, the sink takes no more, or C{ROUNDS}
        chunks went through (the other descriptors' turn).

        @return: C{_EMPTY}, C{_SINK_FULL} (the pipe holds bytes, or the
            sink's connection broke: L{sinkError}), C{_BUDGET}, C{_END}
            (the source's end of file, with the pipe empty), C{_LOST} (the
            source's connection broke) or C{_REFUSED} (the kernel refused
            to splice: the flow relays in userspace now).
        """
        writeEnd = self._pipe[1]  # type: ignore[index]
        sourceFd = self._sourceFd
        bound = self.bound
        moved = 0
        outcome: object = _BUDGET
        for _ in range(ROUNDS):
            try:
                size = splice(sourceFd, writeEnd, bound, flags=SPLICE_FLAGS)  # type: ignore[misc]
            except BlockingIOError:
                outcome = _EMPTY
                break
            except OSError as e:
                if e.errno in UNSUPPORTED:
                    turnOff(os.strerror(e.errno))
                    self.relay.suspend()
                    outcome = _REFUSED
                else:
                    outcome = _LOST
                break
            if not size:
                outcome = _END
                break
            moved += size
            self.held = size
            self._drain()
            if self.held:
                outcome = _SINK_FULL if self.attached else _REFUSED
                break
            if not self.attached:
                outcome = _REFUSED
                break
        if moved:
            self.relay.flow.noteSpliced(self.fromClient, moved)
        return outcome

    def _drain(self) -> None:
        readEnd = self._pipe[0]  # type: ignore[index]
        sinkFd = self._sinkFd
        while self.held:
            try:
                size = splice(readEnd, sinkFd, self.held, flags=SPLICE_FLAGS)  # type: ignore[misc]
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in UNSUPPORTED:
                    turnOff(os.strerror(e.errno))
                    # Read out of the pipe and written by the transport.
                    self.relay.suspend()
                    return
                # The sink's connection is broken: its transport reports
                # it from doWrite, as it would a failed send.
                self.sinkError = main.CONNECTION_LOST
                return
            if not size:
                raise RuntimeError(f"{self!r}: the pipe is short of its bytes")
            self.held -= size
            self.spliced += size
            stats.spliced += size

    def _waitForSink(self) -> None:
        self.source.pauseReading(PAUSED_SPLICE)
        self.sink.transport.startWriting()  # type: ignore[union-attr]

    def flush(self) -> None:
        """
        Move what the pipe holds into the sink's transport, so that bytes
        written to the sink from now on follow it; the source is read
        again (the userspace relay's backpressure holds it from then on).
        """
        if self.held:
            readEnd = self._pipe[0]  # type: ignore[index]
            chunks = []
            while self.held:
                data = os.read(readEnd, self.held)
                if not data:
                    raise RuntimeError(f"{self!r}: the pipe is short of its bytes")
                chunks.append(data)
                self.held -= len(data)
                self.flushed += len(data)
            if not self.sink.disconnected:
                self.sink.transport.write(b"".join(chunks))  # type: ignore[union-attr]
        self.source.resumeReading(PAUSED_SPLICE)


class SpliceRelay:
    """
    The splice path of one flow: its directions, each made when it first
    switches to splicing (after C{after} bytes).

    A flow has a relay only once one of its directions has carried
    C{after} bytes; an idle or short flow has none.

    @ivar flow: The flow.
    @ivar accepted: Its accepted leg.
    @ivar outgoing: Its outgoing leg.
    @ivar bound: The most bytes a pipe holds.
    @ivar toServer: The direction from the client to the server, or
        L{None} while it relays in userspace and never spliced.
    @ivar toClient: The direction from the server to the client, or
        L{None} likewise.
    @ivar after: The bytes a direction carries in userspace before it
        switches (the C{splice-after} limit).
    @ivar off: Whether this flow gave up splicing (it could not have a
        pipe).
    """

    __slots__ = ("flow", "accepted", "outgoing", "bound", "after", "toServer",
                 "toClient", "off")

    def __init__(
        self, flow: Flow, accepted: Leg, outgoing: Leg, bound: int, after: int = 0
    ) -> None:
        """
        @param bound: The most bytes a pipe holds: the flow's buffer bound
            per direction.
        @param after: The bytes a direction carries (the flow's byte count
            that way) before it switches to splicing; 0 switches at once.
        """
        self.flow = flow
        self.accepted = accepted
        self.outgoing = outgoing
        self.bound = bound
        self.after = after
        self.toServer: _Direction | None = None
        self.toClient: _Direction | None = None
        self.off = False

    def __repr__(self) -> str:
        return f"<SpliceRelay active={self.active} {self.toServer!r} {self.toClient!r}>"

    @property
    def active(self) -> bool:
        """
        Whether a direction of the flow relays on the splice path now.
        """
        toServer, toClient = self.toServer, self.toClient
        return (toServer is not None and toServer.attached) or (
            toClient is not None and toClient.attached
        )

    @property
    def spliced(self) -> int:
        """
        The bytes relayed both ways on the splice path so far.
        """
        return sum(d.spliced for d in (self.toServer, self.toClient) if d is not None)

    @staticmethod
    def possible(accepted: Leg, outgoing: Leg) -> bool:
        """
        Whether a flow with these legs can switch to the splice path now.
        """
        return (
            stats.available
            and not accepted.disconnected
            and not outgoing.disconnected
            and spliceable(accepted.transport)
            and spliceable(outgoing.transport)
        )

    def start(self) -> bool:
        """
        Switch each direction that has carried C{after} bytes and is still
        open to the splice path (a direction that is spliced already stays
        so).

        @return: Whether any direction is on the splice path now.
        """
        if self.off or not stats.available:
            return False
        flow = self.flow
        after = self.after
        if flow.bytesFromClient >= after:
            self._start(True)
        if flow.bytesFromServer >= after:
            self._start(False)
        return self.active

    def _start(self, toServer: bool) -> None:
        direction = self.toServer if toServer else self.toClient
        if direction is None:
            if toServer:
                source, sink = self.accepted, self.outgoing
            else:
                source, sink = self.outgoing, self.accepted
            direction = _Direction(self, source, sink, toServer, self.bound)
            if not direction.usable():
                return
            if self.toServer is None and self.toClient is None:
                # The flow's first direction on the splice path.
                stats.relays += 1
            if toServer:
                self.toServer = direction
            else:
                self.toClient = direction
        elif direction.attached or not direction.usable():
            return
        direction.attach()

    def beforeWrite(self, toServer: bool) -> None:
        """
        The flow is about to write to a leg itself: what that direction's
        pipe holds goes into the leg's transport first.
        """
        direction = self.toServer if toServer else self.toClient
        if direction is not None and direction.held:
            direction.flush()

    def _directions(self) -> tuple[_Direction, ...]:
        return tuple(d for d in (self.toServer, self.toClient) if d is not None)

    def suspend(self) -> None:
        """
        Leave the splice path: the transports' own methods are back, what
        the pipes hold is written on, and the userspace relay goes on from
        there.
        """
        if not self.active:
            return
        stats.suspended += 1
        for direction in self._directions():
            direction.detach()
            direction.flush()
            direction.closePipe()

    def close(self) -> None:
        """
        The flow is over: put the methods back and close the pipes.
        """
        for direction in self._directions():
            direction.detach()
            direction.closePipe()
