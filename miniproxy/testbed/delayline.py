# -*- test-case-name: tests.test_delayline -*-
"""
Delay lines: links between two network namespaces with a one-way delay, a
rate and a bounded queue, and optional random loss, emulated in userspace.

This kernel has no netem, so a link is two TUN devices, one in each
namespace, and a forwarder process between them::

    namespace A                 forwarder                namespace B
    10.0.0.1/24 --tun-- fd A --> [A->B: loss, queue, rate, delay] --> fd B --tun-- 10.0.0.2/24
                        fd A <-- [B->A: loss, queue, rate, delay] <-- fd B

The forwarder (C{python -m miniproxy.testbed.delayline}, L{forwarderMain})
opens C{/dev/net/tun} inside each namespace (entering it with C{setns(2)}
first: a TUN device belongs to the namespace its file was opened in), so it
holds both devices; they disappear when it exits, however it exits.  It
reads IP packets from one device and writes each to the other one when its
time has come.  A packet read at time M{t} with M{s} bytes, in a direction
with rate M{r} bit/s, one-way delay M{d} and a queue of M{q} bytes:

  1. is lost with probability C{loss} (a seeded random generator);
  2. is dropped if the bytes still waiting to be serialised, plus its own,
     would exceed M{q} (tail drop);
  3. finishes serialisation at M{f = max(t, f_prev) + 8s/r};
  4. is written to the other device at M{f + d}.

Without a rate, steps 2 and 3 are skipped and it is written at M{t + d}.
The queue bounds only the bytes waiting for serialisation, not those
"on the wire" during the delay (netem's C{limit} counts both).  As the
delay is constant per direction and serialisation is first in first out,
release times are nondecreasing in each direction: each direction's timer
queue is a FIFO (a heap whose order comes free), and the forwarder waits in
C{select(2)} with a timeout computed from the earliest head, with a
timer slack of 1 ns (C{PR_SET_TIMERSLACK}).  C{select} because its timeout
has microsecond resolution, where C{epoll_wait}'s is a millisecond.  Waking
up takes from tens of microseconds to a millisecond on a busy virtual
machine, so the forwarder sleeps until shortly before a release and polls
for the last stretch (L{nextWait}, C{--spin-us}); it runs with C{SCHED_FIFO}
priority when allowed, as netem runs in a softirq, ahead of the processes
whose packets it carries.

The forwarder reports C{ready {...}} on its standard output once both
devices exist, answers C{stats} on its standard input with a C{stats
{...}} line (JSON counters per direction), and exits with a last C{stats}
line on C{SIGTERM}, C{SIGINT} or when its standard input closes (so it
never outlives a crashed parent).

L{DelayLine} is the parent's side: it starts the forwarder in namespace A
(so that deleting A's namespace kills it too), waits for it, gives the
devices their addresses and brings them up; the L{Testbed} stops it at
teardown.  Typical use::

    bed = Testbed()
    self.addCleanup(bed.teardown)
    a, b = bed.addNamespace("a"), bed.addNamespace("b")
    line = DelayLine(bed, a, b, ["10.0.0.1/24"], ["10.0.0.2/24"],
                     aToB=Direction(delay=10, rate=100_000_000),
                     bToA=Direction(delay=10)).start()
    ...
    counters = line.stats()     # {"ab": {...}, "ba": {...}}

Accuracy and throughput, measured on the development machine, are in
C{docs/testbed.md}.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import gc
import json
import math
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from typing import IO, Any, Callable, Sequence

from attrs import field, frozen, validators

from miniproxy.testbed.netns import (
    CLONE_NEWNET,
    MAX_INTERFACE_NAME,
    Namespace,
    NetnsError,
    Testbed,
    _setns,
)

#: C{ioctl} request that attaches a TUN file to a (new) device.
TUNSETIFF = 0x400454CA
#: A layer 3 device: packets are IP packets.
IFF_TUN = 0x0001
#: No packet information header before each packet.
IFF_NO_PI = 0x1000
#: C{prctl(2)} option that sets the timer slack of the calling thread.
PR_SET_TIMERSLACK = 29

#: The default queue of a rate-limited direction, in bytes: a thousand
#: full-size packets, like netem's default C{limit} of 1000 packets.
DEFAULT_QUEUE = 1000 * 1500
#: Packets read from one device per wake-up at most, so that one direction
#: cannot starve the other or the timers.
READ_BATCH = 64
#: The largest packet read from a device.
READ_SIZE = 65535
#: The forwarder's niceness: ahead of the processes it carries packets for.
DEFAULT_NICE = -10
#: The forwarder's C{SCHED_FIFO} priority (0: the normal scheduler).  Like
#: netem in a softirq, it runs as soon as a timer expires or a packet
#: comes, whatever else the machine does.  It polls only for
#: L{DEFAULT_SPIN_US} before a release, and the kernel's real-time
#: throttling bounds it anyway.
DEFAULT_REALTIME = 1
#: Microseconds the forwarder polls before a release it slept for (see
#: L{nextWait}).
DEFAULT_SPIN_US = 300
#: Seconds the parent waits for the forwarder to report readiness.
READY_TIMEOUT = 10.0
#: The packets a TUN device holds for the forwarder to read (its
#: C{txqueuelen}, which sizes its ring): bursts must reach the modelled
#: queue, not be dropped before it.  The kernel's default is 500.
TX_QUEUE_LENGTH = 4096

_NS_PER_SECOND = 1_000_000_000
_BITS_NS = 8 * _NS_PER_SECOND


def _validLoss(instance: Any, attribute: Any, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"loss must be a probability in [0, 1], not {value!r}")


def _nonNegative(instance: Any, attribute: Any, value: float) -> None:
    if value < 0 or math.isnan(value) or math.isinf(value):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, not {value!r}")


def _positiveOrNone(instance: Any, attribute: Any, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name} must be > 0 (or None), not {value!r}")


@frozen
class Direction:
    """
    What one direction of a link does to packets.

    @ivar delay: The one-way delay, in milliseconds.
    @ivar rate: The rate, in bits per second (each packet takes
        C{len * 8 / rate} to serialise); L{None}: no limit, no queue.
    @ivar queue: The most bytes waiting for serialisation (rate-limited
        directions only); a packet that would exceed it is dropped.
    @ivar loss: The probability that a packet is lost, in C{[0, 1]}.
    """

    delay: float = field(default=0.0, validator=_nonNegative)
    rate: int | None = field(default=None, validator=_positiveOrNone)
    queue: int = field(default=DEFAULT_QUEUE, validator=[validators.instance_of(int), _nonNegative])
    loss: float = field(default=0.0, validator=_validLoss)

    def arguments(self, name: str) -> list[str]:
        """
        The forwarder's command line options for this direction.

        @param name: C{ab} or C{ba}.
        """
        args = [f"--delay-{name}", repr(float(self.delay)), f"--queue-{name}", str(self.queue)]
        if self.rate is not None:
            args += [f"--rate-{name}", str(self.rate)]
        if self.loss:
            args += [f"--loss-{name}", repr(float(self.loss))]
        return args


class Shaper:
    """
    The schedule of one direction: when each packet leaves, or that it is
    dropped.  See the module's description for the model.

    @ivar delayNs: The one-way delay, in nanoseconds.
    @ivar rate: Bits per second, or L{None}.
    @ivar queue: Bytes that may wait for serialisation.
    @ivar loss: The probability of a random loss.
    @ivar busyUntil: When the last admitted packet finishes serialisation
        (nanoseconds, the clock of the times given to L{admit}).
    @ivar admitted: Packets admitted.
    @ivar dropped: Packets dropped because the queue was full.
    @ivar lost: Packets lost at random.
    @ivar maxBacklog: The most bytes ever waiting, including the packet
        admitted.
    """

    __slots__ = (
        "delayNs", "rate", "queue", "loss", "_random", "busyUntil",
        "admitted", "dropped", "lost", "maxBacklog",
    )

    def __init__(self, direction: Direction, seed: int | str = 0) -> None:
        """
        @param direction: What to emulate.
        @param seed: Seeds the random losses.
        """
        self.delayNs = round(direction.delay * 1_000_000)
        self.rate = direction.rate
        self.queue = direction.queue
        self.loss = direction.loss
        self._random = random.Random(seed).random
        self.busyUntil = 0
        self.admitted = 0
        self.dropped = 0
        self.lost = 0
        self.maxBacklog = 0

    def admit(self, now: int, size: int) -> int:
        """
        A packet of C{size} bytes arrived at C{now} (nanoseconds).

        @return: When to deliver it (nanoseconds), or C{-1} if it is lost or
            dropped.
        """
        if self.loss and self._random() < self.loss:
            self.lost += 1
            return -1
        rate = self.rate
        if rate is None:
            self.admitted += 1
            return now + self.delayNs
        start = self.busyUntil
        if start < now:
            start = now
        backlog = (start - now) * rate // _BITS_NS + size
        if backlog > self.queue:
            self.dropped += 1
            return -1
        if backlog > self.maxBacklog:
            self.maxBacklog = backlog
        self.busyUntil = done = start + size * _BITS_NS // rate
        self.admitted += 1
        return done + self.delayNs

    def counters(self) -> dict[str, int]:
        """
        The counters, by name.
        """
        return {
            "admitted": self.admitted,
            "dropped": self.dropped,
            "lost": self.lost,
            "maxBacklog": self.maxBacklog,
        }


class _Way:
    """
    One direction in the forwarder: where packets come from and go, and the
    ones waiting.
    """

    __slots__ = (
        "name", "source", "sink", "shaper", "times", "packets",
        "delivered", "bytes", "writeErrors", "lateSum", "lateMax",
    )

    def __init__(self, name: str, source: int, sink: int, shaper: Shaper) -> None:
        self.name = name
        self.source = source
        self.sink = sink
        self.shaper = shaper
        # Two parallel FIFOs rather than one of tuples: no allocation per
        # packet beyond the packet itself, and nothing for the collector.
        self.times: collections.deque[int] = collections.deque()
        self.packets: collections.deque[bytes] = collections.deque()
        self.delivered = 0
        self.bytes = 0
        self.writeErrors = 0
        self.lateSum = 0
        self.lateMax = 0

    def counters(self) -> dict[str, int]:
        counters = self.shaper.counters()
        counters.update(
            delivered=self.delivered,
            bytes=self.bytes,
            writeErrors=self.writeErrors,
            waiting=len(self.times),
            lateMeanNs=self.lateSum // self.delivered if self.delivered else 0,
            lateMaxNs=self.lateMax,
        )
        return counters


def nextWait(head: int, now: int, spin: int, spinningFor: int) -> tuple[int, int]:
    """
    How long the forwarder waits for input before its next release.

    It sleeps until C{spin} before a release, then polls (waits 0) until
    the release is due; a wait shorter than twice C{spin} is slept whole.
    Woken early by a packet, it goes back to sleep: it polls only in the
    last C{spin} before a release it slept for.

    @param head: When the next release is due (ns).
    @param now: The time (ns).
    @param spin: How long to poll before a release (ns); 0: never.
    @param spinningFor: The release it last went to sleep for (to wake up
        C{spin} before it); -1: none.
    @return: The wait (ns), and the new C{spinningFor}.
    """
    remaining = head - now
    if remaining <= 0:
        return 0, spinningFor
    if head == spinningFor and remaining <= spin:
        return 0, spinningFor
    if spin and remaining > spin and (head == spinningFor or remaining > 2 * spin):
        return remaining - spin, head
    return remaining, spinningFor


class _Stop(Exception):
    """
    A signal asked the forwarder to stop.
    """


class Forwarder:
    """
    Moves packets between two packet file descriptors (TUN devices, or any
    descriptors that keep packet boundaries, such as datagram socket
    pairs) through two L{Shaper}s.

    @ivar ab: The direction from C{a} to C{b}.
    @ivar ba: The direction from C{b} to C{a}.
    """

    def __init__(
        self,
        a: int,
        b: int,
        aToB: Shaper,
        bToA: Shaper,
        control: int | None = None,
        output: IO[str] | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
        spin: int = 0,
    ) -> None:
        """
        @param a: The descriptor of side A (non-blocking).
        @param b: The descriptor of side B (non-blocking).
        @param control: A descriptor to read commands from (C{stats}); its
            end of file stops the forwarder.
        @param output: Where C{stats} lines go.
        @param clock: Nanoseconds, monotonic.
        @param spin: Nanoseconds: before a release with more than twice
            this to wait, sleep until this long before it, then poll
            (C{select} with no timeout) until it is due.  Waking up takes
            tens to hundreds of microseconds, more on a busy virtual
            machine; polling the last stretch puts packets on time at the
            cost of that much processor time per sleep.  0: never poll.
        """
        self.ab = _Way("ab", a, b, aToB)
        self.ba = _Way("ba", b, a, bToA)
        self.control = control
        self.output = output if output is not None else sys.stdout
        self.clock = clock
        self.spin = spin
        self._controlBuffer = b""
        self.running = False

    def counters(self) -> dict[str, dict[str, int]]:
        """
        The counters of both directions.
        """
        return {"ab": self.ab.counters(), "ba": self.ba.counters()}

    def writeStats(self) -> None:
        """
        Write a C{stats {...}} line.
        """
        self.output.write("stats " + json.dumps(self.counters(), sort_keys=True) + "\n")
        self.output.flush()

    def _readFrom(self, way: _Way) -> None:
        read, source = os.read, way.source
        admit = way.shaper.admit
        times, packets = way.times, way.packets
        now = self.clock()
        for _ in range(READ_BATCH):
            try:
                packet = read(source, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if not packet:
                # A socket pair's peer closed: nothing more will come.
                raise _Stop()
            at = admit(now, len(packet))
            if at >= 0:
                times.append(at)
                packets.append(packet)

    def _release(self, way: _Way, now: int) -> None:
        times, packets = way.times, way.packets
        write, sink = os.write, way.sink
        late = 0
        while times and times[0] <= now:
            due = times.popleft()
            packet = packets.popleft()
            lateness = now - due
            late += lateness
            if lateness > way.lateMax:
                way.lateMax = lateness
            try:
                write(sink, packet)
            except OSError:
                way.writeErrors += 1
            else:
                way.delivered += 1
                way.bytes += len(packet)
        way.lateSum += late

    def _command(self) -> None:
        assert self.control is not None
        data = os.read(self.control, 4096)
        if not data:
            raise _Stop()
        self._controlBuffer += data
        while b"\n" in self._controlBuffer:
            line, self._controlBuffer = self._controlBuffer.split(b"\n", 1)
            if line.strip() == b"stats":
                self.writeStats()

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """
        Forward until a signal raises L{_Stop}, the control descriptor
        closes, or C{until()} is true (checked at each wake-up).
        """
        ab, ba = self.ab, self.ba
        a, b = ab.source, ba.source
        control = self.control
        readable = [a, b] if control is None else [a, b, control]
        clock = self.clock
        spin = self.spin
        # The release time the forwarder woke up early for, to poll until.
        spinningFor = -1
        self.running = True
        try:
            while True:
                now = clock()
                self._release(ab, now)
                self._release(ba, now)
                if until is not None and until():
                    break
                head = -1
                if ab.times:
                    head = ab.times[0]
                if ba.times and (head < 0 or ba.times[0] < head):
                    head = ba.times[0]
                timeout: float | None
                if head >= 0:
                    pause, spinningFor = nextWait(head, clock(), spin, spinningFor)
                    timeout = pause / _NS_PER_SECOND
                else:
                    timeout = None if until is None else 0.05
                ready = select.select(readable, (), (), timeout)[0]
                if not ready:
                    continue
                if a in ready:
                    self._readFrom(ab)
                if b in ready:
                    self._readFrom(ba)
                if control is not None and control in ready:
                    self._command()
        except _Stop:
            pass
        finally:
            self.running = False


# -- the forwarder process ------------------------------------------------


def openTun(name: str, namespacePath: str | None = None) -> int:
    """
    Create the TUN device C{name} (layer 3, no packet information header)
    in a network namespace, and return its non-blocking file descriptor.
    The device exists as long as the descriptor is open.

    @param namespacePath: The namespace's file (C{/run/netns/NAME} or
        C{/proc/PID/ns/net}); L{None}: the calling thread's own.
    @raise OSError: If the namespace or the device cannot be opened.
    """
    if not 0 < len(name) <= MAX_INTERFACE_NAME:
        raise ValueError(f"bad interface name {name!r}")
    home = target = -1
    try:
        if namespacePath is not None:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            target = os.open(namespacePath, os.O_RDONLY | os.O_CLOEXEC)
            _setns(target, CLONE_NEWNET)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                request = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
                fcntl.ioctl(fd, TUNSETIFF, request)
            except BaseException:
                os.close(fd)
                raise
        finally:
            if home >= 0:
                _setns(home, CLONE_NEWNET)
    finally:
        for descriptor in (home, target):
            if descriptor >= 0:
                os.close(descriptor)
    return fd


def _setTimerSlack(nanoseconds: int = 1) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(nanoseconds), 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _setPriority(nice: int, realtime: int) -> None:
    # Like netem in a softirq, the forwarder should run when its timers
    # expire, also on a busy machine.  Best effort: without the privilege
    # it runs at the default priority.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    if realtime:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(realtime))


def forwarderArguments(
    aDevice: str,
    bDevice: str,
    aNamespace: str | None,
    bNamespace: str | None,
    aToB: Direction,
    bToA: Direction,
    seed: int | str = 0,
    watchStdin: bool = True,
    nice: int = DEFAULT_NICE,
    realtime: int = DEFAULT_REALTIME,
    spinMicroseconds: int = DEFAULT_SPIN_US,
) -> list[str]:
    """
    The arguments of C{python -m miniproxy.testbed.delayline} for a link.

    @param aDevice: Side A's TUN device name.
    @param bDevice: Side B's.
    @param aNamespace: The file of A's namespace (L{None}: the forwarder's).
    @param bNamespace: The same for B.
    @param seed: Seeds the random losses.
    @param watchStdin: Whether the end of standard input stops it.
    @param nice: Its niceness (when permitted).
    @param realtime: Its C{SCHED_FIFO} priority (0: the normal scheduler).
    @param spinMicroseconds: How long it polls before a release (see
        L{Forwarder}).
    """
    args = [
        "--a", aDevice, "--b", bDevice, "--seed", str(seed), "--nice", str(nice),
        "--spin-us", str(spinMicroseconds),
    ]
    if realtime:
        args += ["--realtime", str(realtime)]
    if aNamespace is not None:
        args += ["--a-netns", aNamespace]
    if bNamespace is not None:
        args += ["--b-netns", bNamespace]
    args += aToB.arguments("ab") + bToA.arguments("ba")
    if not watchStdin:
        args.append("--ignore-stdin")
    return args


def _parse(argv: Sequence[str]) -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m miniproxy.testbed.delayline",
        description="Forward IP packets between two TUN devices (or two packet "
        "file descriptors) with a one-way delay, a rate, a queue and loss in "
        "each direction.",
    )
    parser.add_argument("--a", help="side A's TUN device name (created)")
    parser.add_argument("--b", help="side B's TUN device name (created)")
    parser.add_argument("--a-netns", help="the file of A's network namespace")
    parser.add_argument("--b-netns", help="the file of B's network namespace")
    parser.add_argument("--a-fd", type=int, help="use this packet descriptor for A")
    parser.add_argument("--b-fd", type=int, help="use this packet descriptor for B")
    parser.add_argument("--seed", default="0", help="seeds the random losses")
    parser.add_argument(
        "--ignore-stdin", action="store_true",
        help="do not stop when standard input closes",
    )
    parser.add_argument(
        "--nice", type=int, default=DEFAULT_NICE,
        help=f"scheduling niceness, when permitted ({DEFAULT_NICE})",
    )
    parser.add_argument(
        "--realtime", type=int, default=0, metavar="PRIORITY",
        help="run with SCHED_FIFO at this priority (0: no)",
    )
    parser.add_argument(
        "--spin-us", type=int, default=DEFAULT_SPIN_US,
        help=f"poll this long before a release instead of sleeping ({DEFAULT_SPIN_US})",
    )
    for name in ("ab", "ba"):
        parser.add_argument(f"--delay-{name}", type=float, default=0.0, help="ms")
        parser.add_argument(f"--rate-{name}", type=int, default=None, help="bit/s")
        parser.add_argument(f"--queue-{name}", type=int, default=DEFAULT_QUEUE, help="bytes")
        parser.add_argument(f"--loss-{name}", type=float, default=0.0, help="probability")
    args = parser.parse_args(list(argv))
    for side in ("a", "b"):
        if (getattr(args, side) is None) == (getattr(args, f"{side}_fd") is None):
            parser.error(f"give one of --{side} and --{side}-fd")
    try:
        args.ab = Direction(args.delay_ab, args.rate_ab, args.queue_ab, args.loss_ab)
        args.ba = Direction(args.delay_ba, args.rate_ba, args.queue_ba, args.loss_ba)
    except ValueError as e:
        parser.error(str(e))
    return args


def forwarderMain(argv: Sequence[str] | None = None, output: IO[str] | None = None) -> int:
    """
    The forwarder process: C{python -m miniproxy.testbed.delayline --a DEV
    --a-netns FILE --b DEV --b-netns FILE [--delay-ab MS] [--rate-ab BPS]
    [--queue-ab BYTES] [--loss-ab P] [the same for ba] [--seed S]}.

    @return: The exit status (0 when stopped by a signal or the end of
        standard input).
    """
    args = _parse(sys.argv[1:] if argv is None else argv)
    output = output if output is not None else sys.stdout
    if args.a_fd is not None:
        a = args.a_fd
        os.set_blocking(a, False)
    else:
        a = openTun(args.a, args.a_netns)
    if args.b_fd is not None:
        b = args.b_fd
        os.set_blocking(b, False)
    else:
        b = openTun(args.b, args.b_netns)
    slack = _setTimerSlack()
    _setPriority(args.nice, args.realtime)

    def stop(signum: int, frame: Any) -> None:
        raise _Stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # Nothing here makes reference cycles; the collector would only pause
    # the forwarder.
    gc.disable()
    control = None if args.ignore_stdin else sys.stdin.fileno()
    forwarder = Forwarder(
        a, b, Shaper(args.ab, f"{args.seed}-ab"), Shaper(args.ba, f"{args.seed}-ba"),
        control=control, output=output, spin=max(0, args.spin_us) * 1000,
    )
    ready = {"pid": os.getpid(), "a": args.a, "b": args.b, "timerSlack": slack}
    output.write("ready " + json.dumps(ready, sort_keys=True) + "\n")
    output.flush()
    try:
        forwarder.run()
    except _Stop:
        pass
    # Ignore a second signal while the last line is written.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, ValueError):
        forwarder.writeStats()
    return 0


# -- the parent's side ----------------------------------------------------


def readLine(stream: IO[bytes], deadline: float) -> bytes:
    """
    Read one line from a process's pipe, without reading past it.

    @param stream: The pipe.
    @param deadline: When to give up, in L{time.monotonic} seconds.
    @return: The line with its newline; what there was (maybe C{b""}) if
        the pipe ended first.
    @raise NetnsError: At the deadline.
    """
    fd = stream.fileno()
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NetnsError("timed out waiting for the delay line's forwarder")
        if not select.select([fd], [], [], remaining)[0]:
            continue
        chunk = os.read(fd, 1)
        if not chunk:
            return line
        line += chunk
    return line


class DelayLine:
    """
    A delay line between two namespaces of a L{Testbed}: a TUN device in
    each and a forwarder process, started in namespace C{a}.

    @ivar a: The first namespace.
    @ivar b: The second.
    @ivar aName: The device's name in C{a}.
    @ivar bName: The device's name in C{b}.
    @ivar aToB: What the link does from C{a} to C{b}.
    @ivar bToA: What it does from C{b} to C{a}.
    @ivar process: The forwarder, once started.
    @ivar finalStats: The forwarder's counters when it stopped (L{None}
        before, or if it was killed).
    """

    def __init__(
        self,
        testbed: Testbed,
        a: Namespace,
        b: Namespace,
        aAddresses: Sequence[str] = (),
        bAddresses: Sequence[str] = (),
        aToB: Direction = Direction(),
        bToA: Direction | None = None,
        aName: str | None = None,
        bName: str | None = None,
        seed: int | str = 0,
        watchStdin: bool = True,
        txQueueLength: int = TX_QUEUE_LENGTH,
        nice: int = DEFAULT_NICE,
        realtime: int = DEFAULT_REALTIME,
        spinMicroseconds: int = DEFAULT_SPIN_US,
    ) -> None:
        """
        @param aAddresses: Addresses with prefix length for C{a}'s device
            (C{10.0.0.1/24}, C{fd00::1/64}).  A device given no IPv6
            address has IPv6 disabled, so that nothing but what is sent
            crosses the link.
        @param bAddresses: The same for C{b}'s.
        @param aToB: The direction from C{a} to C{b}.
        @param bToA: The other one (default: the same as C{aToB}).
        @param aName: C{a}'s device name (default: C{b}'s short name).
        @param bName: C{b}'s device name (default: C{a}'s short name).
        @param seed: Seeds the random losses.
        @param watchStdin: Whether the forwarder stops when this process's
            end of its standard input closes (when this process exits).
            L{False} for a link that outlives its maker (its namespace's
            deletion still kills it).
        @param txQueueLength: Each device's C{txqueuelen}: the packets
            waiting for the forwarder to read them.
        @param nice: The forwarder's niceness (when permitted).
        @param realtime: Its C{SCHED_FIFO} priority; 0: the normal
            scheduler.
        @param spinMicroseconds: How long it polls before a release instead
            of sleeping (see L{Forwarder}); 0: never.
        """
        self.testbed = testbed
        self.a, self.b = a, b
        self.aAddresses, self.bAddresses = list(aAddresses), list(bAddresses)
        self.aToB = aToB
        self.bToA = bToA if bToA is not None else aToB
        self.aName = aName if aName is not None else b.shortName[:MAX_INTERFACE_NAME]
        self.bName = bName if bName is not None else a.shortName[:MAX_INTERFACE_NAME]
        for name in (self.aName, self.bName):
            if not 0 < len(name) <= MAX_INTERFACE_NAME:
                raise NetnsError(
                    f"bad interface name {name!r}: 1 to {MAX_INTERFACE_NAME} characters"
                )
        self.seed = seed
        self.watchStdin = watchStdin
        self.txQueueLength = txQueueLength
        self.nice = nice
        self.realtime = realtime
        self.spinMicroseconds = spinMicroseconds
        self.process: subprocess.Popen[bytes] | None = None
        self.finalStats: dict[str, dict[str, int]] | None = None
        self._errors: IO[bytes] | None = None

    def __repr__(self) -> str:
        return (
            f"<DelayLine {self.a.name}/{self.aName} -- {self.b.name}/{self.bName} "
            f"ab={self.aToB} ba={self.bToA}>"
        )

    def arguments(self) -> list[str]:
        """
        The forwarder's arguments.
        """
        return forwarderArguments(
            self.aName, self.bName, self.a.path, self.b.path, self.aToB, self.bToA,
            self.seed, self.watchStdin, self.nice, self.realtime, self.spinMicroseconds,
        )

    def start(self, timeout: float = READY_TIMEOUT) -> DelayLine:
        """
        Start the forwarder, wait until it holds both devices, then address
        them and bring them up.

        @return: C{self}.
        @raise NetnsError: If the forwarder failed (with what it wrote).
        """
        if self.process is not None:
            raise NetnsError(f"{self!r} already started")
        for namespace in (self.a, self.b):
            if not namespace.exists():
                raise NetnsError(f"{namespace!r} does not exist")
        self._errors = tempfile.TemporaryFile()
        environment = dict(os.environ)
        package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (package, environment.get("PYTHONPATH")) if p
        )
        command = self.a.execArgs(
            [sys.executable, "-m", "miniproxy.testbed.delayline", *self.arguments()]
        )
        try:
            process = subprocess.Popen(
                command,
                env=environment,
                stdin=subprocess.PIPE if self.watchStdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._errors,
                start_new_session=not self.watchStdin,
            )
        except FileNotFoundError:
            raise NetnsError("'ip' is not installed") from None
        self.process = process
        # The testbed stops it at teardown, before deleting the namespaces.
        self.testbed.processes.append(process)
        assert process.stdout is not None
        line = readLine(process.stdout, time.monotonic() + timeout)
        if not line.startswith(b"ready "):
            self.stop()
            raise NetnsError(f"the forwarder of {self!r} failed: {self.errors() or line!r}")
        for namespace, device, addresses in (
            (self.a, self.aName, self.aAddresses),
            (self.b, self.bName, self.bAddresses),
        ):
            namespace.ip("link", "set", "dev", device, "txqueuelen", str(self.txQueueLength))
            if not any(":" in address for address in addresses):
                # No IPv6 here: no link-local address, router solicitations
                # or multicast reports on the link either.
                namespace.sysctl(f"net.ipv6.conf.{device}.disable_ipv6", 1)
            for address in addresses:
                namespace.addAddress(device, address)
            namespace.linkUp(device)
        return self

    def cpuSeconds(self) -> float:
        """
        The processor time the forwarder used so far (user and system), in
        seconds.

        @raise NetnsError: If it is not running.
        """
        if not self.running:
            raise NetnsError(f"{self!r} is not running")
        assert self.process is not None
        try:
            with open(f"/proc/{self.process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError as e:
            raise NetnsError(f"cannot read the forwarder's times: {e}") from None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def errors(self) -> str:
        """
        What the forwarder wrote to its standard error.
        """
        if self._errors is None:
            return ""
        self._errors.seek(0)
        return self._errors.read().decode("utf-8", "replace").strip()

    @property
    def running(self) -> bool:
        """
        Whether the forwarder runs.
        """
        return self.process is not None and self.process.poll() is None

    def stats(self, timeout: float = READY_TIMEOUT) -> dict[str, dict[str, int]]:
        """
        Ask the running forwarder for its counters: for C{ab} and C{ba},
        C{admitted}, C{dropped} (queue full), C{lost} (at random),
        C{delivered}, C{bytes} (delivered), C{writeErrors}, C{waiting},
        C{maxBacklog} (bytes), C{lateMeanNs} and C{lateMaxNs} (how late
        packets were written, against their schedule).
        """
        process = self.process
        if process is None or process.stdin is None or process.stdout is None or not self.running:
            raise NetnsError(f"{self!r} is not running with a control pipe")
        process.stdin.write(b"stats\n")
        process.stdin.flush()
        line = readLine(process.stdout, time.monotonic() + timeout)
        if not line.startswith(b"stats "):
            raise NetnsError(f"unexpected answer from {self!r}: {line!r}")
        return json.loads(line[6:])  # type: ignore[no-any-return]

    def stop(self) -> dict[str, dict[str, int]] | None:
        """
        Stop the forwarder (its devices go with it).  Safe to call again.

        @return: Its last counters, if it could report them.
        """
        process = self.process
        if process is not None:
            if process.returncode is None:
                self.testbed.stopProcess(process)
                if process.stdout is not None:
                    with contextlib.suppress(OSError, ValueError):
                        rest = process.stdout.read()
                        for line in rest.splitlines():
                            if line.startswith(b"stats "):
                                self.finalStats = json.loads(line[6:])
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            if process in self.testbed.processes:
                self.testbed.processes.remove(process)
        return self.finalStats

    def close(self) -> None:
        """
        Stop the forwarder and release the file keeping its errors.
        """
        self.stop()
        if self._errors is not None:
            self._errors.close()
            self._errors = None


if __name__ == "__main__":
    raise SystemExit(forwarderMain())
