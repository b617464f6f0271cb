# -*- test-case-name: tests.test_evaluation -*-
"""
Running the evaluation's flows on a line of hosts (L{LineTopology}): the
server, the proxies (real C{twistd -n --pidfile= miniproxy} processes in
their namespaces) and the client, each in its own namespace.

A L{Bed} owns one line for as long as it takes to run many flows through
it, back to back::

    bed = Bed(reactor, LineTopology(proxies=2, rtt=100, rate=100_000_000), directory)
    bed.build()
    try:
        bed.startServer([80, 81])
        for proxy in bed.line.proxies:
            bed.startProxy(proxy, transparentConfig(...))
            bed.intercept(proxy, {80: 8080, 81: 8081})
        yield bed.waitForProxies()
        results = yield bed.runFlows([...])
    finally:
        bed.teardown()

The proxies, the server and the client run with C{SCHED_FIFO} priority like
the delay lines' forwarders (L{prioritise}): each stands for a host of its
own, which on this shared machine it is not (see C{docs/testbed.md}).  The
hosts keep the kernel's TCP defaults (initial window, congestion control,
buffers); only the Fast Open experiment sets C{net.ipv4.tcp_fastopen=3}.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Mapping, Sequence

from attrs import frozen
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from miniproxy.testbed.capture import PacketCapture
from miniproxy.testbed.delayline import DEFAULT_REALTIME, readLine
from miniproxy.testbed.netns import Namespace, NetnsError, pollUntil
from miniproxy.testbed.topology import CLIENT_SIDE, TPROXY_MARK, LineTopology

#: The repository's root: C{twistd} needs it on its path for its dropins.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The C{SCHED_FIFO} priority of the hosts' processes (the forwarders').
HOST_PRIORITY = DEFAULT_REALTIME
#: Seconds for a process to start.
START_TIMEOUT = 30.0
#: Seconds a flow may take; a client run may take this long per flow.
FLOW_TIMEOUT = 10.0

#: The environment variable that names where a proxy's logs go (a path
#: without its suffix): see L{logObserver}.
LOG_ENVIRONMENT = "MINIPROXY_EVALUATION_LOG"
#: The access log's namespace.
ACCESS_NAMESPACE = "miniproxy.access"

#: The ports of the evaluation: the server's, and the proxies' listeners.
EARLY_PORT = 80
ACCEPT_PORT = 81
DIRECT_PORT = 82
EARLY_LISTENER = 8080
ACCEPT_LISTENER = 8081
CHAIN_LISTENER = 9000


def prioritise(pid: int) -> None:
    """
    Schedule a host's process ahead of everything else on the machine
    (C{SCHED_FIFO}), as the delay lines' forwarders are: a packet for a host
    wakes it at once, as on a machine of its own.  The same for every mode.
    Without real-time scheduling, at least ahead of normal processes.
    """
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(HOST_PRIORITY))
    except PermissionError:
        os.setpriority(os.PRIO_PROCESS, pid, -10)
    except ProcessLookupError:
        pass


def logObserver() -> Any:
    """
    A log observer factory for C{twistd --logger}: the proxy's access log
    (one event per flow) as JSON in C{STEM.json}, everything else as text
    in C{STEM.log}, where C{STEM} is the value of L{LOG_ENVIRONMENT}.  Each
    event is written once, as with twistd's own text log.  The JSON keeps
    every access-log field, among them the flow's C{times} (the reactor's
    clock: seconds since the epoch, comparable with packet captures'
    kernel timestamps).
    """
    from twisted.logger import jsonFileLogObserver, textFileLogObserver

    stem = os.environ[LOG_ENVIRONMENT]
    text = textFileLogObserver(open(stem + ".log", "a"))
    structured = jsonFileLogObserver(open(stem + ".json", "a"))

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == ACCESS_NAMESPACE:
            structured(event)
        else:
            text(event)

    return observe


def accessEvents(path: str) -> list[dict[str, Any]]:
    """
    The access-log events (one per flow) in a proxy's JSON log, in order.
    """
    from twisted.logger import eventsFromJSONLogFile

    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [
            dict(event) for event in eventsFromJSONLogFile(f)
            if event.get("log_namespace") == ACCESS_NAMESPACE and "times" in event
        ]


def rawTcpSockets(namespace: Namespace) -> int:
    """
    How many raw TCP sockets are open in a namespace (a SYN tap is one).
    """
    with namespace.entered():
        with open("/proc/thread-self/net/raw") as f:
            lines = f.read().splitlines()[1:]
    # local_address is ADDRESS:PROTOCOL for raw sockets; TCP is 6.
    return sum(1 for line in lines if line.split()[1].endswith(":0006"))


@frozen
class Listener:
    """
    One listener of a proxy's configuration.

    @ivar endpoint: Its server endpoint string.
    @ivar mode: C{early}, C{accept} or C{first-data}.
    @ivar synPorts: For a transparent listener in early mode: the
        intercepted ports whose SYNs its tap watches.
    @ivar explicit: The carriers it reads (C{["proxy-v2"]}).
    @ivar trusted: The peers whose carriers it believes.
    """

    endpoint: str
    mode: str = "early"
    synPorts: Sequence[int] = ()
    explicit: Sequence[str] = ()
    trusted: Sequence[str] = ()


@frozen
class Rule:
    """
    One allowing rule of the C{policy} function.

    @ivar destinations: CIDRs.
    @ivar ports: Destination ports.
    @ivar nextHop: Where the flow goes instead of its destination, or
        L{None}.
    """

    destinations: Sequence[str]
    ports: Sequence[int]
    nextHop: str | None = None


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml(v) for v in value) + "]"


def proxyConfig(
    listeners: Sequence[Listener],
    rules: Sequence[Rule],
    limits: Mapping[str, Any] | None = None,
) -> str:
    """
    A miniproxy configuration file (TOML): the listeners, and the C{policy}
    function allowing what the rules allow and nothing else.

    @param limits: Keys of C{[limits]} that differ from the defaults.
    """
    lines = ['functions = ["policy"]', ""]
    if limits:
        lines.append("[limits]")
        lines += [f"{key} = {_toml(value)}" for key, value in limits.items()]
        lines.append("")
    for listener in listeners:
        lines += ["[[listeners]]", f"endpoint = {_toml(listener.endpoint)}",
                  f"mode = {_toml(listener.mode)}"]
        if listener.synPorts:
            lines.append(f"syn-ports = {_toml(list(listener.synPorts))}")
        if listener.explicit:
            lines.append(f"explicit = {_toml(list(listener.explicit))}")
            lines.append(f"trusted = {_toml(list(listener.trusted))}")
        lines.append("")
    lines += ["[function.policy]", 'default = "deny"', ""]
    for rule in rules:
        lines += [
            "[[function.policy.rules]]",
            'action = "allow"',
            f"destinations = {_toml(list(rule.destinations))}",
            f"ports = {_toml(list(rule.ports))}",
        ]
        if rule.nextHop is not None:
            lines.append(f"next-hop = {_toml(rule.nextHop)}")
        lines.append("")
    return "\n".join(lines)


def transparentConfig(
    serverAddress: str,
    limits: Mapping[str, Any] | None = None,
) -> str:
    """
    The configuration of an on-path proxy of Figures 4 and 5 and Table 1:
    two transparent (TPROXY) listeners, one in early mode (SYN tap on the
    intercepted port L{EARLY_PORT}) on L{EARLY_LISTENER}, one in accept
    mode on L{ACCEPT_LISTENER}; the policy allows the server on both
    ports.
    """
    return proxyConfig(
        [
            Listener(f"tproxy:port={EARLY_LISTENER}:interface=0.0.0.0", "early", [EARLY_PORT]),
            Listener(f"tproxy:port={ACCEPT_LISTENER}:interface=0.0.0.0", "accept"),
        ],
        [Rule([f"{serverAddress}/32"], [EARLY_PORT, ACCEPT_PORT])],
        limits,
    )


class _Collector(ProcessProtocol):
    """
    Feeds a process its standard input, collects its output, and fires
    C{ended} with C{(stdout, stderr, exit code)}.
    """

    def __init__(self, stdin: bytes) -> None:
        self.stdin = stdin
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: Deferred[tuple[bytes, bytes, int | None]] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback((b"".join(self.out), b"".join(self.err), code))


def pythonEnvironment() -> dict[str, str]:
    """
    This process's environment with the repository first on C{PYTHONPATH}.
    """
    environment = dict(os.environ)
    paths = [REPO] + ([environment["PYTHONPATH"]] if environment.get("PYTHONPATH") else [])
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


class Bed:
    """
    A line of hosts with a server, proxies and a client.

    @ivar line: The topology.
    @ivar directory: Where the proxies' configurations and logs go.
    @ivar proxyProcesses: The C{twistd} processes, by host short name.
    """

    def __init__(self, reactor: Any, line: LineTopology, directory: str) -> None:
        """
        @param reactor: An L{IReactorProcess} and L{IReactorTime}.
        @param line: The topology, not yet built.
        @param directory: An existing directory for configurations and logs.
        """
        self.reactor = reactor
        self.line = line
        self.directory = directory
        self.proxyProcesses: dict[str, subprocess.Popen[bytes]] = {}
        self._expected: dict[str, tuple[set[int], bool]] = {}
        self._server: subprocess.Popen[bytes] | None = None
        self._clients: list[Any] = []
        self._captures: list[PacketCapture] = []

    def build(self, fastOpen: bool = False, congestionControl: str | None = None) -> Bed:
        """
        Build the line.

        @param fastOpen: Set C{net.ipv4.tcp_fastopen=3} (client and server
            Fast Open) in every namespace.
        @param congestionControl: Set C{net.ipv4.tcp_congestion_control} in
            every namespace (L{None}: keep the default, which a namespace
            takes from the host).  Only to investigate: the experiments
            keep the default.
        """
        self.line.build()
        for node in self.line.nodes:
            if fastOpen:
                node.sysctl("net.ipv4.tcp_fastopen", 3)
            if congestionControl is not None:
                node.sysctl("net.ipv4.tcp_congestion_control", congestionControl)
        return self

    def teardown(self) -> None:
        """
        Stop the client runs, the server, the proxies and the forwarders,
        and delete the namespaces.  Safe to call again.
        """
        for transport in self._clients:
            try:
                transport.signalProcess("KILL")
            except Exception:
                pass
        self._clients = []
        for capture in self._captures:
            capture.stop()
        self._captures = []
        for stream in (self._server.stdin, self._server.stdout) if self._server else ():
            if stream is not None:
                stream.close()
        self.line.teardown()

    # -- hosts -----------------------------------------------------------

    def startServer(self, ports: Iterable[int], fastOpen: bool = False) -> None:
        """
        Start L{miniproxy.evaluation.server} in the server's namespace and
        wait for it to listen.
        """
        server = self.line.server
        command = [sys.executable, "-m", "miniproxy.evaluation.server", "--watch-stdin"]
        command += [arg for port in ports for arg in ("--port", str(port))]
        if fastOpen:
            command.append("--fast-open")
        process = subprocess.Popen(
            server.execArgs(command), env=pythonEnvironment(), cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        server.testbed.processes.append(process)
        self._server = process
        assert process.stdout is not None
        line = readLine(process.stdout, time.monotonic() + START_TIMEOUT)
        if line != b"ready\n":
            raise NetnsError(f"the server did not start: {line!r}")
        prioritise(process.pid)

    def startProxy(self, node: Namespace, config: str, ports: Iterable[int], tap: bool) -> None:
        """
        Start C{twistd -n --pidfile= miniproxy --config FILE} in a proxy's
        namespace; L{waitForProxies} waits for it.

        @param config: The configuration (TOML).
        @param ports: The ports it listens on once started.
        @param tap: Whether it runs a SYN tap once started.
        """
        name = node.shortName
        path = os.path.join(self.directory, f"{name}.toml")
        with open(path, "w") as f:
            f.write(config)
        environment = dict(os.environ)
        environment[LOG_ENVIRONMENT] = os.path.join(self.directory, name)
        with open(os.path.join(self.directory, f"{name}.out"), "wb") as output:
            process = node.spawnPython(
                [
                    "-c",
                    # What the twistd script does, with this interpreter.
                    "import sys; sys.argv[0] = 'twistd'; "
                    "from twisted.scripts.twistd import run; run()",
                    "-n", "--pidfile=", "--logger=miniproxy.evaluation.runner.logObserver",
                    "miniproxy", "--config", path,
                ],
                pythonPath=[REPO],
                env=environment,
                cwd=self.directory,
                stdout=output,
            )
        prioritise(process.pid)
        self.proxyProcesses[name] = process
        self._expected[name] = (set(ports), tap)

    def intercept(self, node: Namespace, ports: Mapping[int, int]) -> None:
        """
        Send TCP arriving at a proxy from the client's side to local
        transparent listeners: C{{destination port: listener port}}.
        """
        items = sorted(ports.items())
        first, listenPort = items[0]
        self.line.interceptTCP(node, [first], listenPort)
        device = self.line.interface(node, CLIENT_SIDE)
        rules = "\n".join(
            f'        iifname "{device}" tcp dport {port} tproxy to :{to} '
            f"meta mark set {TPROXY_MARK} accept"
            for port, to in items[1:]
        )
        if rules:
            node.nft(
                "table ip mpevaluation {\n    chain pre {\n"
                "        type filter hook prerouting priority mangle; policy accept;\n"
                f"{rules}\n    }}\n}}\n"
            )

    def accessLog(self, name: str) -> list[dict[str, Any]]:
        """
        The access-log events a proxy wrote so far (see L{accessEvents}).

        @param name: The proxy host's short name.
        """
        return accessEvents(os.path.join(self.directory, f"{name}.json"))

    def capture(self, node: Namespace, device: str, filter: Any = None) -> PacketCapture:
        """
        Start capturing on a host's device; the capture stops at teardown.
        Read it (L{PacketCapture.read}) before the teardown.
        """
        capture = PacketCapture(node, device, filter=filter).start()
        self._captures.append(capture)
        return capture

    def proxyOutput(self, name: str) -> str:
        """
        What a proxy wrote (its output and its log), for an error message.
        """
        text = []
        for suffix in ("out", "log"):
            path = os.path.join(self.directory, f"{name}.{suffix}")
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    text.append(f.read()[-4000:])
        return "\n".join(text)

    def waitForProxies(self) -> Deferred[None]:
        """
        Wait until every proxy started listens on its ports and runs its
        SYN tap.

        @return: A L{Deferred} that fails with the proxy's output if one
            exits or does not get there within L{START_TIMEOUT}.
        """
        nodes = {node.shortName: node for node in self.line.proxies}

        def ready() -> bool:
            for name, (ports, tap) in self._expected.items():
                process = self.proxyProcesses[name]
                if process.poll() is not None:
                    raise NetnsError(
                        f"twistd in {name} exited with {process.returncode}:\n"
                        f"{self.proxyOutput(name)}"
                    )
                node = nodes[name]
                if not ports <= node.listeningTCPPorts():
                    return False
                if tap and rawTcpSockets(node) < 1:
                    return False
            return True

        return pollUntil(self.reactor, ready, START_TIMEOUT, what="the proxies")

    def runClient(self, plan: Mapping[str, Any], timeout: float) -> Deferred[list[dict[str, Any]]]:
        """
        Run L{miniproxy.evaluation.client} with a plan in the client's
        namespace.

        @param timeout: Seconds the whole run may take; then it is killed.
        @return: A L{Deferred} firing with its results, one per flow.
        """
        collector = _Collector(json.dumps(plan).encode())
        arguments = self.line.client.execArgs(
            [sys.executable, "-m", "miniproxy.evaluation.client"]
        )
        transport = self.reactor.spawnProcess(
            collector, arguments[0], arguments, env=pythonEnvironment(), path=REPO
        )
        self._clients.append(transport)
        prioritise(transport.pid)
        killer = self.reactor.callLater(timeout, transport.signalProcess, "KILL")

        def ended(output: tuple[bytes, bytes, int | None]) -> list[dict[str, Any]]:
            if killer.active():
                killer.cancel()
            if transport in self._clients:
                self._clients.remove(transport)
            out, err, code = output
            results = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
            if code != 0:
                raise NetnsError(
                    f"the client exited with {code} after {len(results)} flows:\n"
                    f"{err.decode(errors='replace')[-4000:]}"
                )
            return results

        return collector.ended.addCallback(ended)

    def runFlows(
        self, flows: Sequence[Mapping[str, Any]], gap: float = 0.0
    ) -> Deferred[list[dict[str, Any]]]:
        """
        Run flows one after the other from one client process.

        @param flows: See L{miniproxy.evaluation.client}; each result keeps
            its flow's C{tag}.
        @param gap: Seconds between the end of a flow and the start of the
            next.
        """
        return self.runClient(
            {"flows": list(flows), "timeout": FLOW_TIMEOUT, "gap": gap},
            timeout=START_TIMEOUT + (FLOW_TIMEOUT + gap) * max(len(flows), 1),
        )

    def runBurst(self, host: str, port: int, count: int, size: int) -> Deferred[list[dict[str, Any]]]:
        """
        Start C{count} flows at once from one client process.
        """
        return self.runClient(
            {"burst": {"host": host, "port": port, "count": count, "size": size},
             "timeout": FLOW_TIMEOUT},
            timeout=START_TIMEOUT + FLOW_TIMEOUT,
        )


@inlineCallbacks
def onBed(
    reactor: Any,
    line: LineTopology,
    directory: str,
    setUp: Any,
    body: Any,
    fastOpen: bool = False,
    congestionControl: str | None = None,
) -> Any:
    """
    Build a line, set it up, run C{body} on it, and tear it down whatever
    happens.

    @param setUp: Called with the L{Bed} once built: starts the server and
        the proxies (it may return a L{Deferred}).
    @param body: Called with the L{Bed} once the proxies are ready; returns
        a L{Deferred} of the result.
    @param fastOpen: See L{Bed.build}.
    @param congestionControl: See L{Bed.build}.
    @return: A L{Deferred} of C{body}'s result.
    """
    bed = Bed(reactor, line, directory)
    try:
        bed.build(fastOpen=fastOpen, congestionControl=congestionControl)
        yield setUp(bed)
        if bed.proxyProcesses:
            yield bed.waitForProxies()
        result = yield body(bed)
    finally:
        bed.teardown()
    return result


def interleave(
    cells: Sequence[Mapping[str, Any]],
    runs: int,
    warmUp: int = 0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """
    The flows of an experiment, in the order to run them: C{warmUp} rounds
    (tagged C{"warm": True}, not measured) and then C{runs} rounds of one
    flow per cell, each round in its own shuffled order (seeded), so that a
    drift in the machine's load touches every cell alike.

    @param cells: Flows (C{host}, C{port}, C{size}, C{fastOpen}) each with
        a C{tag} dict naming its cell.
    @return: The flows, each C{tag} extended with C{run} (from 0; warm-up
        rounds are negative) and C{warm}.
    """
    rng = random.Random(seed)
    flows = []
    for run in range(-warmUp, runs):
        order = list(cells)
        rng.shuffle(order)
        for cell in order:
            flow = dict(cell)
            flow["tag"] = {**cell["tag"], "run": run, "warm": run < 0}
            flows.append(flow)
    return flows


def measured(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """
    The rows of measured flows: each result's tag (its cell and run) with
    its times in milliseconds; warm-up flows are left out.
    """
    rows = []
    for result in results:
        tag = result.get("tag") or {}
        if tag.get("warm"):
            continue
        row = {key: value for key, value in tag.items() if key != "warm"}
        for key in ("connect", "ttfb", "ttc"):
            value = result.get(key)
            row[key] = value * 1000 if value is not None else None
        row["ok"] = bool(result.get("ok"))
        row["error"] = result.get("error", "")
        rows.append(row)
    return rows


#: A process that keeps one CPU from going idle: at C{SCHED_IDLE} it runs
#: only when nothing else wants that CPU, and it stops when its standard
#: input ends (its parent is gone) or gets a line.
_SPINNER = """
import os, select, sys
os.sched_setaffinity(0, {%d})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
fd = sys.stdin.fileno()
while not select.select([fd], [], [], 0)[0]:
    pass
"""


class KeepAwake:
    """
    Keep every CPU busy with a C{SCHED_IDLE} process while the experiments
    run, so that no CPU halts when idle.

    In this virtual machine an idle CPU halts (there is no cpuidle driver:
    C{HLT}, an exit to the hypervisor), and waking it for the next packet
    takes hundreds of microseconds, which a host of its own, busy serving,
    would not pay: on a quiet machine, each proxy's first byte came about
    1 ms later than on a busy one.  A C{SCHED_IDLE} process runs only when
    no other process wants its CPU (the hosts, the forwarders and anyone
    else's work come first), so it only keeps the CPU from halting.
    """

    def __init__(self, cpus: int | None = None) -> None:
        self.cpus = cpus if cpus is not None else (os.cpu_count() or 1)
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> KeepAwake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> KeepAwake:
        """
        Start one spinning process per CPU.
        """
        for cpu in range(self.cpus):
            self.processes.append(subprocess.Popen(
                [sys.executable, "-c", _SPINNER % cpu], stdin=subprocess.PIPE,
            ))
        return self

    def stop(self) -> None:
        """
        Stop them (closing their standard input) and wait for them.
        """
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []


def workDirectory(keep: str | None = None) -> str:
    """
    A directory for the proxies' configurations and logs: C{keep} (made
    if needed), or a new temporary one.
    """
    if keep:
        os.makedirs(keep, exist_ok=True)
        return keep
    return tempfile.mkdtemp(prefix="miniproxy-evaluation-")


def removeWorkDirectory(path: str, keep: str | None) -> None:
    """
    Remove a temporary directory made by L{workDirectory} (not one to keep).
    """
    if not keep:
        shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "ACCEPT_LISTENER",
    "ACCEPT_PORT",
    "Bed",
    "CHAIN_LISTENER",
    "DIRECT_PORT",
    "EARLY_LISTENER",
    "EARLY_PORT",
    "KeepAwake",
    "Listener",
    "accessEvents",
    "logObserver",
    "interleave",
    "measured",
    "Rule",
    "onBed",
    "prioritise",
    "proxyConfig",
    "rawTcpSockets",
    "transparentConfig",
]
