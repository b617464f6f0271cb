"""
Tests for L{miniproxy.testbed.delayline}: userspace delay lines between
network namespaces.

The schedule (L{Shaper}) and the forwarder's loop are tested without root,
on socket pairs.  As root, real delay lines between namespaces are measured
against a veth pair (the same path without the forwarder): their delay,
rate, queue, loss, and what the forwarder holds at 100 Mb/s each way.  The
measured numbers are logged (C{_trial_temp/test.log}, lines starting with
C{delayline:}); C{docs/testbed.md} records them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any, Iterator

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import Logger
from twisted.trial import unittest

from miniproxy.testbed.delayline import (
    DEFAULT_QUEUE,
    DelayLine,
    Direction,
    Forwarder,
    Shaper,
    _parse,
    forwarderArguments,
    nextWait,
    openTun,
    readLine,
)
from miniproxy.testbed.netns import (
    CommandError,
    Namespace,
    NetnsError,
    Testbed,
    namespacesUnavailable,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_log = Logger(namespace="delayline")

#: Seconds to wait for a subprocess or a packet.
WAIT = 10.0
#: The bytes of a full-size IPv4/UDP packet, and its UDP payload.
PACKET = 1500
PAYLOAD = PACKET - 28
#: SO_TIMESTAMPNS (the old, struct timespec one) and SO_RCVBUFFORCE.
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33

#: A UDP echo server on a dual-stack port, run in a namespace.  It echoes
#: each datagram, or only its first 8 bytes with "ack".
ECHO = r"""
import socket, sys
port, mode = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
s.bind(("::", port))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data[:8] if mode == "ack" else data, peer)
"""

#: A TCP server, run in a namespace: reads until end of file, answers how
#: many bytes it read, and closes.
SINK = r"""
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        data = c.recv(1 << 20)
        if not data:
            break
        n += len(data)
    c.sendall(str(n).encode())
    c.close()
"""

#: A UDP load generator, run in a namespace: once a line arrives on its
#: standard input, it sends full-size datagrams to its peer at a steady
#: rate for some seconds, each stamped with the time it is sent, while
#: receiving its peer's and measuring their one-way delay against the
#: kernel's receive timestamp (so that when the generator gets to read
#: does not count); then it prints a JSON summary.
LOAD = r"""
import json, select, socket, struct, sys, time
bind, peer, port, rate, seconds, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
s.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)
s.setsockopt(socket.SOL_SOCKET, 35, 1)
s.bind((bind, port))
s.setblocking(False)
pad = b"\0" * (size - 28 - 12)
interval = size * 8 * 10**9 // rate
mono, real, space = time.monotonic_ns, time.time_ns, socket.CMSG_SPACE(16)
print("ready", flush=True)
sys.stdin.readline()
start = mono()
end = start + int(seconds * 1e9)
drain = end + 300_000_000
next_, seq, delays, errors = start, 0, [], 0
while True:
    now = mono()
    if now >= drain:
        break
    while next_ <= now and next_ < end:
        try:
            s.sendto(struct.pack("!IQ", seq, real()) + pad, (peer, port))
            seq += 1
        except OSError:
            errors += 1
        next_ += interval
    while True:
        try:
            data, ancillary, _, _ = s.recvmsg(65535, space)
        except BlockingIOError:
            break
        sec, nsec = struct.unpack("@qq", ancillary[0][2][:16])
        delays.append(sec * 10**9 + nsec - struct.unpack_from("!IQ", data)[1])
    wake = next_ if next_ < end else drain
    select.select([s], [], [], max(0.0, (wake - mono()) / 1e9))
delays.sort()
n = len(delays)
pick = lambda q: delays[min(n - 1, int(n * q))] if n else None
print(json.dumps({"sent": seq, "sendErrors": errors, "received": n,
                  "median": pick(0.5), "p99": pick(0.99), "max": delays[-1] if n else None}), flush=True)
"""


def needNamespaces() -> None:
    """
    Skip unless network namespaces can be made (root, C{ip}).
    """
    reason = namespacesUnavailable()
    if reason is not None:
        raise unittest.SkipTest(reason)


def percentile(values: list[float], q: float) -> float:
    """
    The C{q} quantile of C{values} (nearest rank).
    """
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def startHelper(
    namespace: Namespace, code: str, *args: str, stdin: bool = False
) -> subprocess.Popen[bytes]:
    """
    Run a helper script in a namespace and wait for its C{ready} line; the
    testbed stops it at teardown.
    """
    process = subprocess.Popen(
        namespace.execArgs([sys.executable, "-c", code, *args]),
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    namespace.testbed.processes.append(process)
    assert process.stdout is not None
    line = readLine(process.stdout, time.monotonic() + WAIT)
    if line != b"ready\n":
        raise AssertionError(f"helper did not start: {line!r}")
    return process


def closePipes(process: subprocess.Popen[bytes]) -> None:
    """
    Close a stopped helper's pipes.
    """
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pingTimes(namespace: Namespace, host: str, count: int, size: int = 56) -> list[float]:
    """
    Ping C{host} C{count} times, one after the other, like C{ping}: ICMP
    echo requests, answered by the peer's kernel.  Each answer's time is the
    kernel's receive timestamp, so neither the peer's nor this process's
    scheduling counts: only the path does.

    @return: The round trip times, in milliseconds.
    """
    sock = namespace.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.settimeout(WAIT)
        ident = os.getpid() & 0xFFFF
        times = []
        for seq in range(count):
            body = struct.pack("!HH", ident, seq) + b"\x5a" * size
            request = struct.pack("!BBH", 8, 0, _checksum(b"\x08\0\0\0" + body)) + body
            sent = time.time_ns()
            sock.sendto(request, (host, 0))
            while True:
                data, ancillary, _, _ = sock.recvmsg(65535, socket.CMSG_SPACE(16))
                icmp = data[(data[0] & 0x0F) * 4:]
                if icmp[0] == 0 and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
                    break
            seconds, nanoseconds = struct.unpack("@qq", ancillary[0][2][:16])
            times.append((seconds * 10**9 + nanoseconds - sent) / 1e6)
        return times
    finally:
        sock.close()


def udpRoundTrips(
    namespace: Namespace, host: str, port: int, count: int, size: int = 64
) -> list[float]:
    """
    Send C{count} datagrams one after the other to an echo server and time
    each answer.

    @return: The round trip times, in milliseconds.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = namespace.socket(family, socket.SOCK_DGRAM)
    try:
        sock.settimeout(WAIT)
        times = []
        for seq in range(count):
            payload = struct.pack("!I", seq) + b"\0" * (size - 4)
            start = time.monotonic_ns()
            sock.sendto(payload, (host, port))
            while True:
                answer = sock.recv(65535)
                if answer[:4] == payload[:4]:
                    break
            times.append((time.monotonic_ns() - start) / 1e6)
        return times
    finally:
        sock.close()


class DirectionTests(unittest.TestCase):
    """
    L{Direction} validates what it is given and becomes forwarder
    arguments.
    """

    def test_defaults(self) -> None:
        """
        By default a direction does nothing: no delay, no rate, no loss.
        """
        direction = Direction()
        self.assertEqual(
            (direction.delay, direction.rate, direction.queue, direction.loss),
            (0.0, None, DEFAULT_QUEUE, 0.0),
        )

    def test_invalid(self) -> None:
        """
        Negative, infinite or NaN delays, a rate that is not positive and a
        loss that is not a probability are refused.
        """
        for bad in (
            dict(delay=-1), dict(delay=float("nan")), dict(delay=float("inf")),
            dict(rate=0), dict(rate=-5), dict(loss=1.5), dict(loss=-0.1),
            dict(queue=-1),
        ):
            self.assertRaises(ValueError, Direction, **bad)

    @given(
        st.builds(
            Direction,
            delay=st.floats(0, 10_000),
            rate=st.none() | st.integers(1, 10**11),
            queue=st.integers(0, 10**9),
            loss=st.floats(0, 1),
        ),
        st.builds(Direction, delay=st.floats(0, 1000)),
        st.integers(0, 2**31) | st.text("abc-0123456789", min_size=1),
    )
    def test_argumentsRoundTrip(self, ab: Direction, ba: Direction, seed: Any) -> None:
        """
        The forwarder parses the arguments made for two directions back into
        the same directions.
        """
        args = _parse(forwarderArguments("x", "y", "/run/netns/a", None, ab, ba, seed))
        self.assertEqual((args.ab, args.ba), (ab, ba))
        self.assertEqual((args.a, args.b, args.a_netns, args.b_netns), ("x", "y", "/run/netns/a", None))
        self.assertEqual(args.seed, str(seed))
        self.assertFalse(args.ignore_stdin)

    def test_badInterfaceName(self) -> None:
        """
        A device name longer than the kernel allows is refused before
        anything is made.
        """
        self.assertRaises(ValueError, openTun, "x" * 16)


#: Packet arrivals: gaps (ns) before each and sizes (bytes).
arrivals = st.lists(
    st.tuples(st.integers(0, 2_000_000), st.integers(20, 9000)), min_size=1, max_size=200
)


class ShaperTests(unittest.TestCase):
    """
    L{Shaper}: delay, serialisation at the rate, a bounded queue, seeded
    losses.
    """

    @given(st.floats(0, 100), arrivals)
    def test_delayOnly(self, delay: float, packets: list[tuple[int, int]]) -> None:
        """
        Without a rate every packet leaves exactly C{delay} after it came,
        and none is dropped.
        """
        shaper = Shaper(Direction(delay=delay))
        now = 10**9
        for gap, size in packets:
            now += gap
            self.assertEqual(shaper.admit(now, size), now + round(delay * 1e6))
        self.assertEqual((shaper.admitted, shaper.dropped, shaper.lost), (len(packets), 0, 0))

    @given(
        st.floats(0, 50),
        st.integers(10**5, 10**10),
        st.integers(0, 200_000),
        arrivals,
    )
    def test_rateAndQueue(
        self, delay: float, rate: int, queue: int, packets: list[tuple[int, int]]
    ) -> None:
        """
        With a rate: departures keep the order of arrivals; each packet
        leaves no sooner than its arrival plus its serialisation and the
        delay; two admitted packets leave at least the second one's
        serialisation time apart; a packet is dropped exactly when the bytes
        still waiting for serialisation, plus its own, exceed the queue.
        """
        shaper = Shaper(Direction(delay=delay, rate=rate, queue=queue))
        delayNs = round(delay * 1e6)
        now, last, finished = 10**9, None, 0
        for gap, size in packets:
            now += gap
            serialisation = size * 8 * 10**9 // rate
            waiting = max(0, finished - now) * rate // (8 * 10**9)
            leaves = shaper.admit(now, size)
            if waiting + size > queue:
                self.assertEqual(leaves, -1)
                continue
            self.assertGreaterEqual(leaves, now + serialisation + delayNs)
            if last is not None:
                self.assertGreaterEqual(leaves, last + serialisation)
            finished = leaves - delayNs
            last = leaves
            self.assertLessEqual(shaper.maxBacklog, queue)
        self.assertEqual(shaper.admitted + shaper.dropped, len(packets))

    def test_saturated(self) -> None:
        """
        Packets arriving faster than the rate leave at the rate: a thousand
        1500-byte packets at 100 Mb/s take 120 ms.
        """
        shaper = Shaper(Direction(rate=100_000_000, queue=10**7))
        times = [shaper.admit(i * 1000, 1500) for i in range(1000)]
        self.assertEqual(times[-1] - times[0], 999 * 120_000)

    def test_lossSeeded(self) -> None:
        """
        Losses follow the seed: the same seed loses the same packets, and
        about C{loss} of them (within five standard deviations).
        """
        def lost(seed: str) -> list[bool]:
            shaper = Shaper(Direction(loss=0.1), seed)
            return [shaper.admit(i, 100) < 0 for i in range(10_000)]

        first = lost("s")
        self.assertEqual(first, lost("s"))
        self.assertNotEqual(first, lost("t"))
        self.assertLess(abs(sum(first) - 1000), 5 * (10_000 * 0.1 * 0.9) ** 0.5)
        self.assertTrue(all(Shaper(Direction(loss=1.0)).admit(i, 1) < 0 for i in range(100)))


class NextWaitTests(unittest.TestCase):
    """
    L{nextWait}: sleep until shortly before a release, poll only for the
    last stretch.
    """

    @given(
        st.integers(0, 10**8),
        st.integers(0, 10**6),
        st.lists(st.tuples(st.booleans(), st.floats(0, 1), st.integers(1, 50_000)), max_size=60),
    )
    def test_pollsOnlyBeforeRelease(
        self, distance: int, spin: int, wakes: list[tuple[bool, float, int]]
    ) -> None:
        """
        Whatever wakes the forwarder (its timeout, late, or a packet,
        early), it never waits past the release, and it polls (waits 0)
        only within C{spin} of it; without C{spin}, it waits exactly until
        the release.
        """
        now, head, spinningFor = 10**9, 10**9 + distance, -1
        for packet, fraction, lateness in wakes:
            if now >= head:
                break
            pause, spinningFor = nextWait(head, now, spin, spinningFor)
            self.assertGreaterEqual(pause, 0)
            self.assertLessEqual(now + pause, head)
            if pause == 0:
                self.assertLessEqual(head - now, spin)
            if spin == 0:
                self.assertEqual(pause, head - now)
            # A packet cuts the wait short; a timeout comes late.
            now += int(pause * fraction) if packet else pause + (lateness if pause else 1)
        self.assertEqual(nextWait(head, head + 5, spin, spinningFor)[0], 0)

    def test_shortWaitSlept(self) -> None:
        """
        A wait shorter than twice the spin is slept whole: under load the
        forwarder does not poll between packets.
        """
        self.assertEqual(nextWait(1000, 0, 600, -1), (1000, -1))
        self.assertEqual(nextWait(1000, 0, 400, -1), (600, 1000))
        self.assertEqual(nextWait(1000, 600, 400, 1000), (0, 1000))


def packetPair() -> tuple[socket.socket, socket.socket]:
    """
    A pair of connected sockets that keep packet boundaries, like a TUN
    device: what one end writes, the other reads as one packet.
    """
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class ForwarderTests(unittest.TestCase):
    """
    L{Forwarder} moves packets between two packet descriptors, here socket
    pairs, in this process.
    """

    def pairs(self) -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
        aOutside, aInside = packetPair()
        bInside, bOutside = packetPair()
        for sock in (aOutside, aInside, bInside, bOutside):
            self.addCleanup(sock.close)
        aInside.setblocking(False)
        bInside.setblocking(False)
        return aOutside, aInside, bInside, bOutside

    @given(
        st.lists(st.binary(min_size=1, max_size=1500), min_size=1, max_size=40),
        st.lists(st.binary(min_size=1, max_size=1500), max_size=40),
        st.sampled_from([None, 10**9, 10**10]),
    )
    def test_packetsInOrder(self, toB: list[bytes], toA: list[bytes], rate: int | None) -> None:
        """
        Every packet comes out on the other side, whole and in order, both
        ways at once.
        """
        aOutside, aInside, bInside, bOutside = self.pairs()
        for packet in toB:
            aOutside.send(packet)
        for packet in toA:
            bOutside.send(packet)
        direction = Direction(delay=0.05, rate=rate, queue=10**7)
        forwarder = Forwarder(
            aInside.fileno(), bInside.fileno(), Shaper(direction), Shaper(direction)
        )
        deadline = time.monotonic() + WAIT
        forwarder.run(
            until=lambda: (forwarder.ab.delivered, forwarder.ba.delivered) == (len(toB), len(toA))
            or time.monotonic() > deadline
        )
        bOutside.setblocking(False)
        aOutside.setblocking(False)
        self.assertEqual([bOutside.recv(65535) for _ in toB], toB)
        self.assertEqual([aOutside.recv(65535) for _ in toA], toA)
        counters = forwarder.counters()
        self.assertEqual(counters["ab"]["bytes"], sum(map(len, toB)))
        self.assertEqual(counters["ba"]["delivered"], len(toA))

    def test_delay(self) -> None:
        """
        A packet is not written before its delay has passed.
        """
        aOutside, aInside, bInside, bOutside = self.pairs()
        forwarder = Forwarder(
            aInside.fileno(), bInside.fileno(), Shaper(Direction(delay=20)), Shaper(Direction())
        )
        sent = time.monotonic_ns()
        aOutside.send(b"x")
        deadline = time.monotonic() + WAIT
        forwarder.run(until=lambda: forwarder.ab.delivered == 1 or time.monotonic() > deadline)
        self.assertEqual(bOutside.recv(10), b"x")
        self.assertGreaterEqual(time.monotonic_ns() - sent, 20_000_000)

    def test_peerClosed(self) -> None:
        """
        The end of one side's descriptor stops the forwarder.
        """
        aOutside, aInside, bInside, bOutside = self.pairs()
        forwarder = Forwarder(aInside.fileno(), bInside.fileno(), Shaper(Direction()), Shaper(Direction()))
        aOutside.close()
        forwarder.run()
        self.assertFalse(forwarder.running)


class ForwarderProcessTests(unittest.TestCase):
    """
    C{python -m miniproxy.testbed.delayline} on socket pairs: readiness,
    C{stats}, C{SIGTERM} and the end of its standard input.
    """

    def start(self, *extra: str) -> tuple[subprocess.Popen[bytes], socket.socket, socket.socket]:
        aOutside, aInside = packetPair()
        bInside, bOutside = packetPair()
        for sock in (aOutside, bOutside):
            self.addCleanup(sock.close)
        process = subprocess.Popen(
            [sys.executable, "-m", "miniproxy.testbed.delayline",
             "--a-fd", str(aInside.fileno()), "--b-fd", str(bInside.fileno()), *extra],
            pass_fds=(aInside.fileno(), bInside.fileno()),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO,
        )
        aInside.close()
        bInside.close()

        def stop() -> None:
            if process.poll() is None:
                process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

        self.addCleanup(stop)
        assert process.stdout is not None
        line = readLine(process.stdout, time.monotonic() + WAIT)
        self.assertTrue(line.startswith(b"ready "), line)
        self.assertEqual(json.loads(line[6:])["pid"], process.pid)
        aOutside.settimeout(WAIT)
        bOutside.settimeout(WAIT)
        return process, aOutside, bOutside

    def stats(self, process: subprocess.Popen[bytes]) -> dict[str, Any]:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"stats\n")
        process.stdin.flush()
        line = readLine(process.stdout, time.monotonic() + WAIT)
        self.assertTrue(line.startswith(b"stats "), line)
        return json.loads(line[6:])  # type: ignore[no-any-return]

    def test_forwardsAndStops(self) -> None:
        """
        Packets go both ways, each delayed; C{stats} counts them; C{SIGTERM}
        makes it exit cleanly with a last C{stats} line.
        """
        process, a, b = self.start("--delay-ab", "15", "--delay-ba", "5")
        sent = time.monotonic()
        for i in range(3):
            a.send(b"to b %d" % i)
        self.assertEqual([b.recv(100) for _ in range(3)], [b"to b 0", b"to b 1", b"to b 2"])
        self.assertGreaterEqual(time.monotonic() - sent, 0.015)
        b.send(b"to a")
        self.assertEqual(a.recv(100), b"to a")
        counters = self.stats(process)
        self.assertEqual((counters["ab"]["delivered"], counters["ba"]["delivered"]), (3, 1))
        self.assertEqual(counters["ab"]["bytes"], 18)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=WAIT)
        self.assertEqual(process.returncode, 0, err)
        [last] = out.splitlines()
        self.assertEqual(json.loads(last[6:])["ba"]["delivered"], 1)

    def test_stdinClosed(self) -> None:
        """
        The end of its standard input (its parent is gone) stops it.
        """
        process, a, b = self.start()
        assert process.stdin is not None
        process.stdin.close()
        self.assertEqual(process.wait(WAIT), 0)

    def test_ignoreStdin(self) -> None:
        """
        With C{--ignore-stdin} it keeps going without a standard input, and
        still stops on C{SIGTERM}.
        """
        process, a, b = self.start("--ignore-stdin")
        assert process.stdin is not None
        process.stdin.close()
        a.send(b"still here")
        self.assertEqual(b.recv(100), b"still here")
        process.terminate()
        self.assertEqual(process.wait(WAIT), 0)

    def test_badArguments(self) -> None:
        """
        Bad arguments are a usage error naming the problem.
        """
        result = subprocess.run(
            [sys.executable, "-m", "miniproxy.testbed.delayline", "--a", "x", "--loss-ab", "2"],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO},
            timeout=WAIT,
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn("--b", result.stderr)


class DelayLineTests(unittest.TestCase):
    """
    Real delay lines between two namespaces (root).
    """

    timeout = 120

    def setUp(self) -> None:
        needNamespaces()
        self.bed = Testbed()
        self.addCleanup(self.bed.teardown)
        self.a = self.bed.addNamespace("a")
        self.b = self.bed.addNamespace("b")

    def line(
        self, aToB: Direction, bToA: Direction | None = None, ipv6: bool = True, **kwargs: Any
    ) -> DelayLine:
        """
        Start a delay line between C{a} (10.9.0.1, fd00:9::1) and C{b}
        (10.9.0.2, fd00:9::2).  Without IPv6, only what the test sends
        crosses it (no router solicitations).
        """
        aAddresses, bAddresses = ["10.9.0.1/24"], ["10.9.0.2/24"]
        if ipv6:
            aAddresses.append("fd00:9::1/64")
            bAddresses.append("fd00:9::2/64")
        line = DelayLine(
            self.bed, self.a, self.b, aAddresses, bAddresses, aToB=aToB, bToA=bToA, **kwargs,
        )
        self.addCleanup(line.close)
        return line.start()

    def echo(self, namespace: Namespace, mode: str = "echo", port: int = 7000) -> None:
        process = startHelper(namespace, ECHO, str(port), mode)
        self.addCleanup(closePipes, process)

    def test_carriesIPv4IPv6AndTCP(self) -> None:
        """
        A delay line carries IPv4 and IPv6 datagrams and a TCP connection;
        its devices exist while the forwarder runs and go with it.
        """
        line = self.line(Direction(delay=1))
        self.echo(self.b)
        self.assertEqual(len(udpRoundTrips(self.a, "10.9.0.2", 7000, 3)), 3)
        self.assertEqual(len(udpRoundTrips(self.a, "fd00:9::2", 7000, 3)), 3)
        sink = startHelper(self.b, SINK, "9000")
        self.addCleanup(closePipes, sink)
        data = os.urandom(200_000)
        with self.a.socket() as client:
            client.settimeout(WAIT)
            client.connect(("10.9.0.2", 9000))
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            self.assertEqual(client.recv(100), str(len(data)).encode())
        self.assertIn("POINTOPOINT", self.a.ip("link", "show", "dev", "b").stdout)
        self.assertIn("state UNKNOWN", self.b.ip("link", "show", "dev", "a").stdout)
        counters = line.stats()
        self.assertGreater(counters["ab"]["bytes"], len(data))
        self.assertEqual(counters["ab"]["dropped"] + counters["ab"]["lost"], 0)
        final = line.stop()
        assert final is not None
        self.assertGreaterEqual(final["ab"]["delivered"], counters["ab"]["delivered"])
        self.assertFalse(line.running)
        self.assertEqual(line.stop(), final)
        self.assertRaises(CommandError, self.a.ip, "link", "show", "dev", "b")
        self.assertRaises(CommandError, self.b.ip, "link", "show", "dev", "a")

    def test_teardownStopsForwarder(self) -> None:
        """
        The testbed's teardown stops the forwarder, and may run again.
        """
        line = self.line(Direction(delay=1))
        assert line.process is not None
        pid = line.process.pid
        self.bed.teardown()
        self.assertIsNotNone(line.process.poll())
        self.assertFalse(os.path.exists(f"/proc/{pid}"))
        self.bed.teardown()
        self.assertFalse(self.a.exists())

    def test_parentGone(self) -> None:
        """
        When its parent's end of the standard input closes, the forwarder
        exits and its devices disappear.
        """
        line = self.line(Direction())
        assert line.process is not None and line.process.stdin is not None
        line.process.stdin.close()
        self.assertEqual(line.process.wait(WAIT), 0)
        self.assertRaises(CommandError, self.a.ip, "link", "show", "dev", "b")

    def test_forwarderFails(self) -> None:
        """
        A forwarder that cannot make its device fails L{DelayLine.start}
        with what it said, and leaves nothing running.
        """
        self.line(Direction())
        clash = DelayLine(self.bed, self.a, self.b, aName="b", bName="a2")
        self.addCleanup(clash.close)
        error = self.assertRaises(NetnsError, clash.start)
        self.assertIn("failed", str(error))
        self.assertIn("Device or resource busy", str(error))
        self.assertFalse(clash.running)

    def test_accuracy(self) -> None:
        """
        Pings through a delay line of 10 ms each way take 20 ms more than
        through a veth pair: the medians differ by 20 ms within 0.5 ms.
        """
        reference = self.bed.addNamespace("c")
        self.bed.connect(reference, self.b, ["10.8.0.1/24"], ["10.8.0.2/24"])
        self.line(Direction(delay=10), ipv6=False)
        # Warm up both paths (routes, caches).
        pingTimes(reference, "10.8.0.2", 5)
        pingTimes(self.a, "10.9.0.2", 5)
        base = pingTimes(reference, "10.8.0.2", 200)
        delayed = pingTimes(self.a, "10.9.0.2", 100)
        baseMedian = statistics.median(base)
        extra = [t - 20.0 - baseMedian for t in delayed]
        _log.info(
            "delayline: low load, 10 ms each way: ping median {median:.3f} ms "
            "(veth {base:.3f} ms); extra delay median {extra:.3f} ms, p99 {p99:.3f} ms",
            median=statistics.median(delayed), base=baseMedian,
            extra=statistics.median(extra), p99=percentile(extra, 0.99),
        )
        self.assertLess(abs(statistics.median(extra)), 0.5)
        self.assertGreaterEqual(min(delayed), 20.0)

    @contextlib.contextmanager
    def frozen(self, line: DelayLine) -> Iterator[None]:
        """
        Stop the forwarder for the block (C{SIGSTOP}), so that what is sent
        meanwhile waits in the device and reaches the forwarder as one
        burst, however fast or slow this process sends it.
        """
        assert line.process is not None
        line.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            line.process.send_signal(signal.SIGCONT)

    def test_rate(self) -> None:
        """
        At 100 Mb/s, a megabyte of datagrams that comes at once is through
        80 ms (plus the one-way delay) later, at 100 Mb/s: both within 10%.
        """
        line = self.line(Direction(delay=5, rate=100_000_000), Direction(delay=5), ipv6=False)
        receiver = self.udpSocket(self.b, bind=("10.9.0.2", 7000))
        receiver.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sender = self.udpSocket(self.a)
        count = 667  # 1,000,500 bytes of IP packets
        with self.frozen(line):
            for seq in range(count):
                sender.sendto(struct.pack("!Q", seq) + b"\0" * (PAYLOAD - 8), ("10.9.0.2", 7000))
            start = time.time_ns()
        stamps = []
        while len(stamps) < count:
            data, ancillary, _, _ = receiver.recvmsg(PACKET, socket.CMSG_SPACE(16))
            seconds, nanoseconds = struct.unpack("@qq", ancillary[0][2][:16])
            stamps.append(seconds * 10**9 + nanoseconds)
        total = (stamps[-1] - start) / 1e6
        expected = count * PACKET * 8 / 100_000_000 * 1000 + 5.0
        rate = (count - 1) * PACKET * 8 / ((stamps[-1] - stamps[0]) / 1e9)
        _log.info(
            "delayline: 1 MB of UDP at once at 100 Mb/s, 5 ms one way: the last byte "
            "after {total:.1f} ms (expected {expected:.1f}), rate {rate:.2f} Mb/s",
            total=total, expected=expected, rate=rate / 1e6,
        )
        self.assertLess(abs(total - expected), 0.1 * expected)
        self.assertLess(abs(rate - 100_000_000), 10_000_000)

    def udpSocket(self, namespace: Namespace, bind: tuple[str, int] | None = None) -> socket.socket:
        """
        A UDP socket in C{namespace} with room for a few megabytes of
        datagrams, closed at cleanup.
        """
        sock = namespace.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        sock.settimeout(WAIT)
        if bind is not None:
            sock.bind(bind)
        return sock

    def test_tcpTransfer(self) -> None:
        """
        A 1 MB TCP transfer through a 100 Mb/s link takes at least the 80 ms
        the rate allows plus a round trip, and not much more (slow start
        costs a few round trips).
        """
        self.line(
            Direction(delay=1, rate=100_000_000), Direction(delay=1, rate=100_000_000), ipv6=False
        )
        sink = startHelper(self.b, SINK, "9000")
        self.addCleanup(closePipes, sink)
        data = b"\xa5" * 1_000_000
        durations = []
        for _ in range(3):
            with self.a.socket() as client:
                client.settimeout(WAIT)
                client.connect(("10.9.0.2", 9000))
                start = time.monotonic()
                client.sendall(data)
                client.shutdown(socket.SHUT_WR)
                self.assertEqual(client.recv(100), b"1000000")
                durations.append((time.monotonic() - start) * 1000)
        expected = 80.0 + 2.0
        _log.info(
            "delayline: 1 MB over TCP at 100 Mb/s, RTT 2 ms: {durations} ms",
            durations=", ".join(f"{d:.1f}" for d in durations),
        )
        self.assertGreaterEqual(min(durations), expected * 0.97)
        self.assertLess(statistics.median(durations), expected * 1.4)

    def test_queueDrops(self) -> None:
        """
        A burst into a slow link with a queue of ten packets: ten go
        through (eleven if the first left before the burst was read), the
        rest is dropped and counted.
        """
        line = self.line(Direction(rate=10_000_000, queue=10 * PACKET), ipv6=False)
        self.echo(self.b, "ack")
        sock = self.udpSocket(self.a)
        sent = 50
        with self.frozen(line):
            for seq in range(sent):
                sock.sendto(struct.pack("!Q", seq) + b"\0" * (PAYLOAD - 8), ("10.9.0.2", 7000))
        counters = line.stats()
        deadline = time.monotonic() + WAIT
        while counters["ab"]["admitted"] + counters["ab"]["dropped"] < sent:
            self.assertLess(time.monotonic(), deadline, "the forwarder did not read every packet")
            counters = line.stats()
        acknowledged = [
            struct.unpack("!Q", sock.recv(100))[0] for _ in range(counters["ab"]["admitted"])
        ]
        self.assertEqual(acknowledged, list(range(len(acknowledged))))
        self.assertIn(len(acknowledged), (10, 11))
        self.assertEqual(counters["ab"]["dropped"], sent - len(acknowledged))
        self.assertLessEqual(counters["ab"]["maxBacklog"], 10 * PACKET)

    def test_loss(self) -> None:
        """
        Random loss loses about the given share of packets, each counted.
        """
        line = self.line(Direction(loss=0.25), Direction(), ipv6=False, seed=7)
        self.echo(self.b, "ack")
        sock = self.udpSocket(self.a)
        sent = 400
        for seq in range(sent):
            sock.sendto(struct.pack("!Q", seq), ("10.9.0.2", 7000))
        counters = line.stats()
        deadline = time.monotonic() + WAIT
        while counters["ab"]["admitted"] + counters["ab"]["lost"] < sent:
            self.assertLess(time.monotonic(), deadline, "the forwarder did not read every packet")
            counters = line.stats()
        received = [sock.recv(100) for _ in range(counters["ab"]["admitted"])]
        self.assertEqual(counters["ab"]["lost"], sent - len(received))
        self.assertLess(abs(counters["ab"]["lost"] - 100), 5 * (400 * 0.25 * 0.75) ** 0.5)

    def test_load(self) -> None:
        """
        At 100 Mb/s of full-size packets each way (about 8,300 packets per
        second each way), the forwarder delivers them all with little extra
        delay, on less than one core.
        """
        seconds = 1.5
        rate = 100_000_000
        reference = {
            "c": self.bed.addNamespace("c"),
            "d": self.bed.addNamespace("d"),
        }
        self.bed.connect(reference["c"], reference["d"], ["10.8.0.1/24"], ["10.8.0.2/24"])
        base = self.runLoad(reference["c"], "10.8.0.1", reference["d"], "10.8.0.2", rate, seconds)
        line = self.line(Direction(delay=10), Direction(delay=10), ipv6=False)
        before = line.cpuSeconds()
        started = time.monotonic()
        loaded = self.runLoad(self.a, "10.9.0.1", self.b, "10.9.0.2", rate, seconds)
        cpu = (line.cpuSeconds() - before) / (time.monotonic() - started)
        baseMedian = statistics.median([r["median"] for r in base]) / 1e6
        for name, result in zip(("ab", "ba"), loaded):
            extraMedian = result["median"] / 1e6 - 10.0 - baseMedian
            extraP99 = result["p99"] / 1e6 - 10.0 - baseMedian
            _log.info(
                "delayline: 100 Mb/s each way, {name}: {received}/{sent} delivered; extra "
                "delay median {median:.3f} ms, p99 {p99:.3f} ms (veth one-way median "
                "{base:.3f} ms); forwarder CPU {cpu:.0%} of one core",
                name=name, received=result["received"], sent=result["sent"],
                median=extraMedian, p99=extraP99, base=baseMedian, cpu=cpu,
            )
            self.assertGreaterEqual(result["sent"], 0.95 * rate * seconds / (8 * PACKET))
            self.assertGreaterEqual(result["received"], 0.99 * result["sent"])
            self.assertLess(extraMedian, 1.0)
        self.assertLess(cpu, 1.0)

    def runLoad(
        self, a: Namespace, aHost: str, b: Namespace, bHost: str, rate: int, seconds: float
    ) -> list[dict[str, Any]]:
        """
        Run the load generator in both namespaces at once.

        @return: What B measured (traffic from A), then what A measured.
        """
        helpers = [
            startHelper(a, LOAD, aHost, bHost, "7100", str(rate), str(seconds), str(PACKET), stdin=True),
            startHelper(b, LOAD, bHost, aHost, "7100", str(rate), str(seconds), str(PACKET), stdin=True),
        ]
        for helper in helpers:
            assert helper.stdin is not None
            helper.stdin.write(b"go\n")
            helper.stdin.flush()
        results = []
        for helper in helpers:
            assert helper.stdout is not None
            line = readLine(helper.stdout, time.monotonic() + seconds + WAIT)
            results.append(json.loads(line))
            self.bed.stopProcess(helper)
            closePipes(helper)
        return [results[1], results[0]]
