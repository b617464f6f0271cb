"""
Early SYN forwarding, timed on a line with real delays.

The topology (L{LineTopology}), 10 ms each way on each link::

    client 10.0.0.1 ==10 ms== 10.0.0.2 p1 10.0.1.1 ==10 ms== 10.0.1.2 server

In p1 run two C{twistd miniproxy} services, one in C{early} mode (port
8080) and one in C{accept} mode (port 8081), both sending flows to the
server's port 9000.  The server answers a 100-byte request with 10 KB.  The
client addresses its flows to p1 explicitly.

Two measurements, over a few sequential flows per mode:

  - B{SYN to SYN}: captures in p1 (L{PacketCapture}, kernel timestamps) see
    the client's SYN arrive on p1's client-side device and p1's own SYN to
    the server leave on its server-side device.  In early mode the second
    follows the first within 2 ms; in accept mode only after the client's
    handshake completes, one client-side round trip later (which shows the
    measurement sees what it should).
  - B{TTFB}: from C{connect()} to the first byte of the response, at the
    client.  Early mode saves the client-side round trip that accept mode
    spends before connecting: its median is lower by at least 0.3 of it.
    Only this ordering is asserted, never absolute times.

The numbers are logged (C{_trial_temp/test.log}, lines starting with
C{esf-timing:}); C{docs/testbed.md} records them.  Everything needs root:
namespaces, TUN devices, and the SYN tap's raw socket.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.trial import unittest

from miniproxy.evaluation.packets import synOrder
from miniproxy.evaluation.runner import rawTcpSockets
from miniproxy.testbed.capture import CapturedPacket, PacketCapture, synFilter
from miniproxy.testbed.delayline import DEFAULT_REALTIME, readLine
from miniproxy.testbed.netns import NetnsError, namespacesUnavailable, pollUntil
from miniproxy.testbed.topology import CLIENT_SIDE, SERVER_SIDE, LineTopology
from miniproxy.wire.packet import ACK, SYN
from tests.test_delayline import closePipes, startHelper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_log = Logger(namespace="esf-timing")

#: One-way delay of each link, in milliseconds.
DELAY = 10.0
#: The proxies' ports, by mode, and the server's.
PORTS = {"early": 8080, "accept": 8081}
SERVER_PORT = 9000
#: Flows per mode.
FLOWS = 10
REQUEST = 100
RESPONSE = 10 * 1024
#: Flows per mode first run and not measured (imports, caches).
WARM_UP = 2
#: The C{SCHED_FIFO} priority of the proxies, the server and the client
#: (that of the forwarders, L{DEFAULT_REALTIME}).
HOST_PRIORITY = DEFAULT_REALTIME
#: Seconds for a process to start, or a flow to finish.
START_TIMEOUT = 20.0
WAIT = 10.0

#: The server: reads a 100-byte request, answers 10 KB and closes.
SERVER = r"""
import socket, sys
request, response = int(sys.argv[2]), int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
answer = b"r" * response
while True:
    c, _ = s.accept()
    got = 0
    while got < request:
        data = c.recv(request - got)
        if not data:
            break
        got += len(data)
    if got == request:
        c.sendall(answer)
    c.close()
"""


#: The client: once a line comes on its standard input, runs flows one
#: after the other (connect, send the request, read the whole response),
#: to each of the ports in turn, then prints what it saw as JSON.
CLIENT = r"""
import json, socket, sys, time
host, ports, flows, request, response = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
print("ready", flush=True)
sys.stdin.readline()
results = []
for port in [int(p) for p in ports.split(",")] * flows:
    s = socket.socket()
    s.settimeout(10)
    start = time.monotonic()
    s.connect((host, port))
    s.sendall(b"q" * request)
    data = s.recv(response)
    first = time.monotonic()
    while data and len(data) < response:
        more = s.recv(response)
        if not more:
            break
        data += more
    results.append({"to": port, "port": s.getsockname()[1], "ttfb": first - start, "bytes": len(data)})
    s.close()
print(json.dumps(results), flush=True)
"""


def clientTimes(packets: list[CapturedPacket], clientPort: int, proxyPort: int) -> tuple[float, float]:
    """
    From a capture on the client's device: the round trip of a flow's
    handshake, and its time to first byte.

    @param clientPort: The flow's port on the client.
    @param proxyPort: The port it connected to.
    @return: Milliseconds from the client's SYN leaving to the SYN-ACK
        arriving, and to the first segment with data arriving.
    """
    syn = synAck = data = None
    for packet in packets:
        segment = packet.segment()
        if segment is None:
            continue
        if packet.outgoing and segment.isSyn and segment.source.port == clientPort:
            syn = syn if syn is not None else packet.time
        elif not packet.outgoing and (segment.source.port, segment.destination.port) == (
            proxyPort, clientPort
        ):
            if segment.flags & (SYN | ACK) == SYN | ACK and synAck is None:
                synAck = packet.time
            elif segment.payload and data is None:
                data = packet.time
    if syn is None or synAck is None or data is None:
        raise AssertionError(f"flow from port {clientPort} not fully captured")
    return (synAck - syn) / 1e6, (data - syn) / 1e6


def prioritise(pid: int) -> None:
    """
    Schedule a process of the measured path ahead of everything else on
    the machine (C{SCHED_FIFO}).

    Each host is a machine of its own in the emulation; here the client,
    the proxies and the server share two cores with the forwarders and
    whatever else runs (on a busy machine, waking a normal process takes
    up to milliseconds).  Like the forwarders, the hosts run as soon as a
    packet comes for them, as they would on their own machines.  Both
    modes alike.
    """
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(HOST_PRIORITY))
    except PermissionError:
        # No real-time scheduling here (a container may forbid it): at
        # least ahead of the normal processes.
        os.setpriority(os.PRIO_PROCESS, pid, -10)


class EarlySynTimingTests(unittest.TestCase):
    """
    C{twistd miniproxy --mode early} against C{--mode accept}, in p1 of a
    client -- p1 -- server line with 10 ms each way on each link.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        from twisted.internet import reactor

        if os.geteuid() != 0:
            raise unittest.SkipTest(
                "needs root: network namespaces, TUN devices and the SYN tap's raw socket"
            )
        reason = namespacesUnavailable()
        if reason is not None:
            raise unittest.SkipTest(reason)
        line = self.line = LineTopology(proxies=1, delays=[DELAY, DELAY], ipv6=False)
        self.addCleanup(line.teardown)
        line.build()
        self.proxy = line.proxies[0]
        server = startHelper(line.server, SERVER, str(SERVER_PORT), str(REQUEST), str(RESPONSE))
        self.addCleanup(closePipes, server)
        prioritise(server.pid)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.processes = {mode: self.startProxy(mode) for mode in PORTS}
        for process in self.processes.values():
            prioritise(process.pid)

        def ready() -> bool:
            for mode, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(
                        f"twistd ({mode}) exited with {process.returncode}:\n{self.output(mode)}"
                    )
            return set(PORTS.values()) <= self.proxy.listeningTCPPorts() and (
                rawTcpSockets(self.proxy) >= 1
            )

        try:
            yield pollUntil(reactor, ready, START_TIMEOUT, what="the proxies and the SYN tap")
        except NetnsError as e:
            raise AssertionError(f"{e}\n{self.output('early')}\n{self.output('accept')}")
        self.clientSide = PacketCapture(
            self.proxy, line.interface(self.proxy, CLIENT_SIDE), filter=synFilter(PORTS.values())
        ).start()
        self.addCleanup(self.clientSide.stop)
        self.serverSide = PacketCapture(
            self.proxy, line.interface(self.proxy, SERVER_SIDE), filter=synFilter([SERVER_PORT])
        ).start()
        self.addCleanup(self.serverSide.stop)
        self.atClient = PacketCapture(line.client, line.interface(line.client, SERVER_SIDE)).start()
        self.addCleanup(self.atClient.stop)

    def startProxy(self, mode: str) -> Any:
        """
        Start C{twistd -n miniproxy --listen tcp:PORT:interface=0.0.0.0 --to
        tcp:host=SERVER:port=9000 --mode MODE} in p1.
        """
        log = os.path.join(self.directory, f"{mode}.log")
        with open(os.path.join(self.directory, f"{mode}.out"), "wb") as output:
            return self.proxy.spawnPython(
                [
                    "-c",
                    # What the twistd script does, with this interpreter.
                    "import sys; sys.argv[0] = 'twistd'; "
                    "from twisted.scripts.twistd import run; run()",
                    "-n", "--pidfile=", f"--logfile={log}",
                    "miniproxy",
                    "--listen", f"tcp:{PORTS[mode]}:interface=0.0.0.0",
                    "--to", f"tcp:host={self.line.serverAddress}:port={SERVER_PORT}",
                    "--mode", mode,
                ],
                pythonPath=[REPO],
                cwd=self.directory,
                stdout=output,
            )

    def output(self, mode: str) -> str:
        """
        What a proxy wrote, to its output and its log.
        """
        text = []
        for name in (f"{mode}.out", f"{mode}.log"):
            path = os.path.join(self.directory, name)
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    text.append(f.read())
        return "\n".join(text)

    def flows(self) -> dict[str, dict[str, list[float]]]:
        """
        Run flows one after the other from a client process, to the early
        and the accept proxy in turn, L{FLOWS} to each (after L{WARM_UP}
        each not measured).  In turn, so that each proxy is done with a
        flow (closed it, logged it) before its next one comes.

        @return: For each mode, milliseconds of each flow: C{rtt} (the
            client-side round trip: its SYN out to the SYN-ACK in), C{ttfb}
            (its SYN out to the first response byte in), both with the
            kernel's timestamps on the client's device; C{clientTtfb} (from
            C{connect()} to the first byte read, as the client process saw
            it); C{synToSyn} (from the client's SYN arriving at p1 to p1's
            SYN leaving for the server).
        """
        modes = list(PORTS)
        for capture in (self.atClient, self.clientSide, self.serverSide):
            capture.read()
        client = startHelper(
            self.line.client, CLIENT, self.line.address(self.proxy, CLIENT_SIDE),
            ",".join(str(PORTS[mode]) for mode in modes),
            str(WARM_UP + FLOWS), str(REQUEST), str(RESPONSE), stdin=True,
        )
        self.addCleanup(closePipes, client)
        prioritise(client.pid)
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"go\n")
        client.stdin.flush()
        total = len(modes) * (WARM_UP + FLOWS)
        flows = json.loads(readLine(client.stdout, time.monotonic() + total * WAIT))
        self.assertEqual([f["bytes"] for f in flows], [RESPONSE] * total, "responses")
        arrived = synOrder(self.clientSide.read(), set(PORTS.values()), False)
        left = synOrder(self.serverSide.read(), {SERVER_PORT}, True)
        packets = self.atClient.read()
        drops = self.atClient.dropped + self.clientSide.dropped + self.serverSide.dropped
        self.assertEqual(drops, 0, "the captures lost packets")
        self.assertEqual(len(arrived), total, "client SYNs seen at p1")
        self.assertEqual(len(left), total, "p1's SYNs to the server")
        self.assertEqual([p for _, p in arrived], [f["port"] for f in flows])
        results: dict[str, dict[str, list[float]]] = {
            mode: {"rtt": [], "ttfb": [], "clientTtfb": [], "synToSyn": []} for mode in modes
        }
        # One flow at a time: the n-th SYN in is the n-th SYN out's cause.
        for n, (flow, (into, _), (out, _)) in enumerate(zip(flows, arrived, left)):
            if n < len(modes) * WARM_UP:
                continue
            result = results[modes[n % len(modes)]]
            self.assertEqual(flow["to"], PORTS[modes[n % len(modes)]])
            rtt, ttfb = clientTimes(packets, flow["port"], flow["to"])
            result["rtt"].append(rtt)
            result["ttfb"].append(ttfb)
            result["clientTtfb"].append(flow["ttfb"] * 1000)
            result["synToSyn"].append((out - into) / 1e6)
        return results

    def test_synToSyn(self) -> None:
        """
        In early mode p1's SYN to the server leaves within 2 ms (median) of
        the client's SYN arriving; in accept mode only after the client's
        handshake, at least 0.8 of a client-side round trip later.
        """
        results = self.flows()
        early, accept = results["early"], results["accept"]
        rtt = statistics.median(early["rtt"] + accept["rtt"])
        for mode, result in (("early", early), ("accept", accept)):
            values = result["synToSyn"]
            _log.info(
                "esf-timing: SYN to SYN, {mode} mode: median {median:.3f} ms, "
                "min {low:.3f}, max {high:.3f} (client-side RTT {rtt:.2f} ms)",
                mode=mode, median=statistics.median(values), low=min(values),
                high=max(values), rtt=rtt,
            )
        self.assertLess(statistics.median(early["synToSyn"]), 2.0)
        self.assertTrue(all(v >= 0 for v in early["synToSyn"]), early["synToSyn"])
        self.assertGreaterEqual(statistics.median(accept["synToSyn"]), 0.8 * rtt)
        self.assertGreaterEqual(rtt, 2 * DELAY)

    def test_timeToFirstByte(self) -> None:
        """
        Early mode's median time to first byte is lower than accept mode's
        by at least 0.3 of the client-side round trip.
        """
        results = self.flows()
        early, accept = results["early"], results["accept"]
        rtt = statistics.median(early["rtt"] + accept["rtt"])
        medians = {mode: statistics.median(r["ttfb"]) for mode, r in (("early", early), ("accept", accept))}
        seen = {
            mode: statistics.median(r["clientTtfb"]) for mode, r in (("early", early), ("accept", accept))
        }
        _log.info(
            "esf-timing: TTFB median early {early:.2f} ms, accept {accept:.2f} ms, "
            "saved {saved:.2f} ms (client-side RTT {rtt:.2f} ms); as the client "
            "process saw it: early {seenEarly:.2f} ms, accept {seenAccept:.2f} ms",
            early=medians["early"], accept=medians["accept"],
            saved=medians["accept"] - medians["early"], rtt=rtt,
            seenEarly=seen["early"], seenAccept=seen["accept"],
        )
        self.assertLess(medians["early"], medians["accept"] - 0.3 * rtt)
