"""
How much userspace memory one idle proxied flow costs.

A L{miniproxy.service.ProxyService} runs in a child process (so that the
test's own clients and servers are not counted), relaying to a server in
this process.  The test holds C{PAIRS} idle flows open (a byte relayed each
way, then nothing), and reads the child's resident set size before and
after: the difference divided by C{PAIRS} is the memory per flow (a pair
of proxied connections).  A second round, with C{tracemalloc} on in the
child, says which lines of code allocated it, and a count of the objects
the garbage collector tracks says which objects hold it.

The number is printed (and kept in C{_trial_temp/memory.json}); the test
only asserts a generous sanity bound, L{BOUND}.  The kernel's side is not
in the resident set: what the kernel allocates for the flow's two sockets
(the socket, inode, file, dentry and epoll item; an idle socket holds no
buffer pages) is printed beside it, from C{/proc/slabinfo}.

Run it alone, to see the report::

    python -m twisted.trial tests.test_memory
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
from typing import Any

from twisted.trial import unittest

#: The repository's root, which the child needs on C{PYTHONPATH}.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Idle flows held open at once.
PAIRS = 1000

#: The sanity bound on userspace bytes per idle flow.
BOUND = 20 * 1024

#: Seconds any one step may take.
STEP_TIMEOUT = 30

#: The child: a proxy service relaying to C{sys.argv[1]}, answering one
#: JSON line per command line on stdin (C{rss}, C{trace}, C{snapshot},
#: C{flows}, C{baseline}, C{added}), and reporting its listening port
#: first.
CHILD = r"""
import gc, json, os, sys, tracemalloc
from collections import Counter
from twisted.internet import reactor
from twisted.internet.stdio import StandardIO
from twisted.protocols.basic import LineReceiver
from miniproxy.config import buildConfig
from miniproxy.service import ProxyService

config = buildConfig(
    {}, listen=["tcp:0:interface=127.0.0.1"], to=f"tcp:host=127.0.0.1:port={sys.argv[1]}",
    limits={"max-flows-per-source": 100000, "max-flows": 100000,
            "max-pending-syns-per-source": 100000},
)
service = ProxyService(config, reactor)

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

def types():
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())

def pipes():
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
               for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))

class Commands(LineReceiver):
    delimiter = b"\n"
    baseline = None
    def connectionLost(self, reason):
        # The test ended (or died): so does the child.
        if reactor.running:
            reactor.stop()
    def reply(self, **kw):
        self.transport.write(json.dumps(kw).encode() + b"\n")
    def lineReceived(self, line):
        command = line.decode().strip()
        if command == "rss":
            gc.collect()
            self.reply(rss=rss())
        elif command == "flows":
            self.reply(flows=len(service.table.flows))
        elif command == "trace":
            gc.collect()
            self.baseline = types()
            tracemalloc.start(1)
            self.reply(ok=True)
        elif command == "baseline":
            gc.collect()
            self.baseline = types()
            self.pipes = pipes()
            self.reply(ok=True)
        elif command == "added":
            gc.collect()
            counts = types()
            counts.subtract(self.baseline)
            self.reply(objects={k: v for k, v in counts.items() if v > 0},
                       pipes=pipes() - self.pipes)
        elif command == "snapshot":
            gc.collect()
            snapshot = tracemalloc.take_snapshot()
            tracemalloc.stop()
            stats = snapshot.statistics("lineno")
            total = sum(s.size for s in stats)
            top = [[str(s.traceback[0]), s.size, s.count] for s in stats[:25]]
            counts = types()
            counts.subtract(self.baseline)
            objects = [[k, v] for k, v in counts.most_common(25) if v > 0]
            self.reply(total=total, top=top, objects=objects)

def listening(ports):
    StandardIO(Commands())
    sys.stdout.write(json.dumps({"port": ports[0].getHost().port}) + "\n")
    sys.stdout.flush()

service.startService()
service.whenListening().addCallback(listening)
reactor.run()
"""


#: The kernel's objects behind one TCP socket of a process: the socket,
#: its inode, its file, its dentry, its epoll item (C{/proc/slabinfo}).
SOCKET_SLABS = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi")


def kernelBytesPerSocket() -> int | None:
    """
    What the kernel allocates for one idle TCP socket of a process, from
    the object sizes of its slab caches (an idle socket holds no buffer
    pages), or L{None} if C{/proc/slabinfo} cannot be read.
    """
    sizes = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in SOCKET_SLABS:
                    sizes[fields[0]] = int(fields[3])
    except OSError:
        return None
    return sum(sizes.values()) if len(sizes) == len(SOCKET_SLABS) else None


class ProxyChild:
    """
    The proxy service in its child process, and its command channel.
    """

    def __init__(self, testCase: unittest.TestCase, backendPort: int) -> None:
        env = dict(os.environ, PYTHONPATH=REPO)
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(backendPort)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        testCase.addCleanup(self.stop)
        self.port = self._read()["port"]

    def _read(self) -> dict[str, Any]:
        stdout: Any = self.process.stdout
        ready, _, _ = select.select([stdout], [], [], STEP_TIMEOUT)
        if not ready:
            raise AssertionError(f"the proxy child did not answer in {STEP_TIMEOUT}s")
        line = stdout.readline()
        if not line:
            raise AssertionError(f"the proxy child ended ({self.process.wait()})")
        return json.loads(line)

    def ask(self, command: str) -> dict[str, Any]:
        """
        Send a command, return its answer.
        """
        self.process.stdin.write(command.encode() + b"\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def stop(self) -> None:
        """
        End the child.
        """
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


class IdlePairs:
    """
    C{n} clients connected through the proxy to a server socket of this
    process, each with one byte relayed each way.
    """

    def __init__(self, proxyPort: int, server: socket.socket, n: int) -> None:
        self.clients: list[socket.socket] = []
        self.servers: list[socket.socket] = []
        try:
            for _ in range(n):
                client = socket.create_connection(
                    ("127.0.0.1", proxyPort), timeout=STEP_TIMEOUT
                )
                self.clients.append(client)
                client.sendall(b"c")
            for _ in range(n):
                accepted, _ = server.accept()
                accepted.settimeout(STEP_TIMEOUT)
                self.servers.append(accepted)
                if accepted.recv(1) != b"c":
                    raise AssertionError("the client's byte did not arrive")
                accepted.sendall(b"s")
            for client in self.clients:
                if client.recv(1) != b"s":
                    raise AssertionError("the server's byte did not arrive")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """
        Close every socket.
        """
        for sock in self.clients + self.servers:
            sock.close()
        self.clients = []
        self.servers = []


class MemoryPerFlowTests(unittest.TestCase):
    """
    The userspace memory of idle flows.
    """

    timeout = 120

    def setUp(self) -> None:
        self.server = socket.socket()
        self.addCleanup(self.server.close)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4096)
        self.server.settimeout(STEP_TIMEOUT)
        self.proxy = ProxyChild(self, self.server.getsockname()[1])

    def waitForFlows(self, n: int) -> None:
        """
        Ask the child until it has C{n} open flows (it closes them on its
        own time once the sockets here are closed).
        """
        for _ in range(10000):
            if self.proxy.ask("flows")["flows"] == n:
                return
        raise AssertionError(
            f"the proxy did not get to {n} open flows: {self.proxy.ask('flows')}"
        )

    def hold(self, n: int) -> IdlePairs:
        """
        Open C{n} idle pairs, closed at cleanup.
        """
        pairs = IdlePairs(self.proxy.port, self.server, n)
        self.addCleanup(pairs.close)
        self.waitForFlows(n)
        return pairs

    def test_perIdleFlow(self) -> None:
        """
        The resident memory one idle flow adds to the proxy stays under
        L{BOUND}; the report says what holds it.
        """
        # Warm up: the first flows import and allocate what every flow
        # shares (code paths, caches, the arenas' first pages).
        warm = self.hold(100)
        warm.close()
        self.waitForFlows(0)
        before = self.proxy.ask("rss")["rss"]
        pairs = self.hold(PAIRS)
        after = self.proxy.ask("rss")["rss"]
        pairs.close()
        self.waitForFlows(0)
        perFlow = (after - before) / PAIRS
        perSocket = kernelBytesPerSocket()

        self.proxy.ask("trace")
        pairs = self.hold(PAIRS)
        snapshot = self.proxy.ask("snapshot")
        pairs.close()

        report = {
            "pairs": PAIRS,
            "rssPerFlow": perFlow,
            "tracedPerFlow": snapshot["total"] / PAIRS,
            # Two sockets per flow in the proxy.
            "kernelPerFlow": 2 * perSocket if perSocket is not None else None,
            "topLines": snapshot["top"],
            "objectsPerFlow": [[name, n / PAIRS] for name, n in snapshot["objects"]],
        }
        with open("memory.json", "w") as f:
            json.dump(report, f, indent=2)
        lines = [
            f"{PAIRS} idle flows: {perFlow:.0f} bytes of RSS per flow, "
            f"{report['tracedPerFlow']:.0f} bytes traced by tracemalloc; "
            f"the kernel's socket objects: {report['kernelPerFlow']} bytes per flow",
            "allocated by:",
        ]
        lines += [f"  {size / PAIRS:8.0f} B {count / PAIRS:6.2f}x {where}"
                  for where, size, count in snapshot["top"][:15]]
        lines.append("objects per flow:")
        lines += [f"  {n:6.2f} {name}" for name, n in report["objectsPerFlow"][:20]]
        sys.stdout.write("\n" + "\n".join(lines) + "\n")
        self.assertGreater(perFlow, 0)
        self.assertLess(perFlow, BOUND)
        self.assertLess(report["tracedPerFlow"], BOUND)

    def test_idleFlowObjects(self) -> None:
        """
        An idle flow (a byte relayed each way) holds no splice relay, no
        splice direction and no pipe (a direction switches to the splice
        path only after C{splice-after} bytes), keeps no bound method,
        gives neither of its transports a C{__dict__} of its own, and does
        not keep what connected its outgoing leg (the connector, the
        connecting factory, the leg's factory).
        """
        warm = self.hold(20)
        warm.close()
        self.waitForFlows(0)
        n = 200
        self.proxy.ask("baseline")
        self.hold(n)
        added = self.proxy.ask("added")
        perFlow = {name: count / n for name, count in added["objects"].items()}
        self.assertEqual(added["pipes"], 0)
        for name in ("miniproxy.splice.SpliceRelay", "miniproxy.splice._Direction",
                     "miniproxy.tcpclient._TunedConnector", "miniproxy.tcpclient._Connecting",
                     "miniproxy.legs.OutgoingLegFactory"):
            self.assertNotIn(name, perFlow)
        # Shared structures grow now and then: well under one per flow.
        self.assertLess(perFlow.get("builtins.method", 0), 0.1)
        self.assertLess(perFlow.get("builtins.dict", 0), 0.1)
        # What a flow is made of.
        for name in ("miniproxy.flow.Flow", "miniproxy.legs.AcceptedLeg",
                     "miniproxy.legs.OutgoingLeg", "twisted.internet.tcp.Server"):
            self.assertEqual(perFlow.get(name), 1.0, name)
