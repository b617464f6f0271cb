# -*- test-case-name: tests.test_workers -*-
"""
Worker processes: C{twistd -n miniproxy --workers N} runs N processes that
share every listener, with one command.

How the listeners are shared
============================

The parent binds, for each listener, one socket per worker, all with
C{SO_REUSEPORT} on the same address, in the workers' order, and attaches
one classic BPF program to the group (C{SO_ATTACH_REUSEPORT_CBPF}) that
sends each new connection to the socket at index L{workerOf}C{(client
port, N)}.  Worker I inherits socket I of each listener and adopts it
(C{reactor.adoptStreamPort}); the parent keeps its own copies open for its
whole life and never reads them.

Why this design rather than the two simpler ones:

 - One socket shared by every worker (the parent binds it, the workers
   adopt it): every worker's epoll wakes for each connection and whichever
   calls C{accept()} first wins.  No worker can know, when the SYN arrives,
   whether it will be the one to accept it, so the early-SYN tap (which
   starts the outgoing leg at the SYN) would have to start it in every
   worker (N-1 upstream connections per flow that are never used) or in
   none.
 - Each worker binding its own C{SO_REUSEPORT} socket: the kernel's group
   is ordered by joining, and when a member closes the last one is moved
   into its slot, so after a worker restarts the BPF program's indices no
   longer name the workers the taps think they do; the connections queued
   on the dead worker's socket are reset with it; and C{tcp:0} would give
   each worker a different port.

With the parent holding the group, a socket's index never changes: a
restarted worker adopts the same socket, and the connections steered to it
while it was down wait in its accept queue.  The steering is a function of
the client's port that the taps compute too: worker I's SYN tap keeps only
the SYNs of its own connections, in its BPF filter (see
L{miniproxy.syntap.synFilter}), so each flow begins exactly once.  The
program sees the segment past its TCP header (C{skb->data} is the payload),
so it loads the client port relative to the network header
(C{SKF_NET_OFF}).  Linux gives C{connect()} even ports, so the hash is not
the port modulo N but a multiplicative (Fibonacci) hash of it.

What is per worker
==================

Each worker runs the whole service: the functions, the policy, the limits.
The limits are per worker: C{max-flows}, C{max-flows-per-source} and the
pending SYN bounds apply to each worker's share of the flows (a client's
connections are spread over the workers by port), so the group admits up
to N times C{max-flows}.

The parent
==========

The parent (L{WorkerGroup}) binds the listeners (before twistd drops
privileges), starts the workers, restarts one that dies (at most
C{maxRestarts} in C{restartWindow} seconds per worker, with a growing delay;
past that it stops the group), passes SIGTERM and SIGINT on to the workers
and exits once they have, and reports the group: every C{statsInterval}
seconds and on SIGUSR1 it logs one line with the total resident and
proportional memory and the CPU time of the whole group (from C{/proc},
ended workers included), and the workers' flow counters.

A worker is C{python -m miniproxy.workers}: its standard input is a pipe
from the parent (its settings, then commands; end of file means the parent
is gone, and the worker stops), descriptor 3 a pipe to the parent (its
answers), descriptors 4 and up its listening sockets.  Its standard output
is a pipe to the parent that carries its log events (as JSON): the parent
emits them as its own, so they go wherever twistd logs (standard output,
C{--logfile}, syslog), one writer for all; a worker appending to twistd's
log file itself would overwrite the parent's lines (twistd's log file is
not opened for appending).  Its standard error is the parent's.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import signal
import socket
import struct
import sys
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger

from miniproxy.listener import SHARED_KINDS, parseListenDescription
from miniproxy.syntap import steeringInstructions, workerOf

_log = Logger(namespace="miniproxy.workers")

__all__ = [
    "WorkerGroup",
    "SharedListener",
    "SHARED_KINDS",
    "parseListenDescription",
    "steeringProgram",
    "workerOf",
    "workerMain",
]

#: C{setsockopt(SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF)} (linux/socket.h).
SO_ATTACH_REUSEPORT_CBPF = 51
#: Classic BPF's offset of the network header (C{SKF_NET_OFF}).
SKF_NET_OFF = -0x100000

#: The first descriptor of a worker's listening sockets.
FIRST_LISTENER_FD = 4
#: The descriptor a worker answers the parent on.
ANSWER_FD = 3

#: Seconds a worker may take to stop before it is killed.
STOP_GRACE = 10.0
#: Seconds the parent waits for the workers' counters in a report.
STATS_WAIT = 2.0

# Classic BPF opcodes.
_LD_B_ABS = 0x30
_LD_H_ABS = 0x28
_LD_H_IND = 0x48
_LDX_B_MSH = 0xB1
_RSH_K = 0x74
_JEQ_K = 0x15
_RET_A = 0x16


def steeringProgram(workers: int) -> list[tuple[int, int, int, int]]:
    """
    The C{SO_REUSEPORT} program of a group of C{workers}: the index of the
    socket a new connection goes to, L{workerOf} its client port.

    The program runs on the segment with its data pulled past the TCP
    header, so it loads relative to the network header: for IPv4 the
    header's length, then the port after it; for IPv6 the port after the
    fixed header.  (A SYN with IPv6 extension headers, which clients do
    not send, would be steered by other bytes than the port its worker's
    tap reads: its flow might begin at the SYN in the wrong worker, whose
    pending flow expires unused, and at accept in the right one.)

    @return: The instructions as C{(code, jt, jf, k)}.
    """
    steer = steeringInstructions(workers) + [(_RET_A, 0, 0, 0)]
    program = [
        (_LD_B_ABS, 0, 0, SKF_NET_OFF),  # A = the first byte of the IP header
        (_RSH_K, 0, 0, 4),  # its version
        (_JEQ_K, 0, 2 + len(steer), 4),
        (_LDX_B_MSH, 0, 0, SKF_NET_OFF),  # X = the IPv4 header's length
        (_LD_H_IND, 0, 0, SKF_NET_OFF),  # A = the TCP source port
        *steer,
        (_LD_H_ABS, 0, 0, SKF_NET_OFF + 40),  # IPv6: after the fixed header
        *steer,
    ]
    return program


def attachSteering(sock: socket.socket, workers: int) -> None:
    """
    Attach L{steeringProgram} to the C{SO_REUSEPORT} group of C{sock}.

    @raise OSError: If the kernel refuses it.
    """
    program = steeringProgram(workers)
    raw = b"".join(
        struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF) for code, jt, jf, k in program
    )
    buffer = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


class SharedListener:
    """
    One listener of a worker group: a socket per worker in one
    C{SO_REUSEPORT} group, steered by L{steeringProgram}.

    @ivar sockets: The sockets, worker 0's first.
    @ivar family: Their address family.
    @ivar steered: Whether the steering program is attached (when the
        kernel refused it, connections are spread by the kernel's own hash
        and the workers run no SYN tap).
    """

    def __init__(self, description: str, defaultBacklog: int, workers: int) -> None:
        """
        Bind and listen.

        @raise ConfigError: If the description cannot be shared.
        @raise OSError: If a socket cannot be bound.
        """
        kind, interface, port, backlog = parseListenDescription(description)
        self.description = description
        self.family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        self.sockets: list[socket.socket] = []
        self.steered = False
        try:
            for _ in range(workers):
                sock = socket.socket(self.family, socket.SOCK_STREAM)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if kind == "tproxy":
                    from miniproxy.endpoints import IP_TRANSPARENT, IPV6_TRANSPARENT

                    if self.family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                    else:
                        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                # The first binds the port (maybe 0: any); the others join it.
                sock.bind((interface, port))
                port = sock.getsockname()[1]
                sock.listen(backlog or defaultBacklog)
                sock.setblocking(False)
            try:
                attachSteering(self.sockets[0], workers)
                self.steered = True
            except OSError as e:
                _log.warn(
                    "{description}: cannot steer connections to workers ({error}); "
                    "the kernel spreads them, and the workers run no SYN tap",
                    description=description,
                    error=e.strerror or str(e),
                )
        except BaseException:
            self.close()
            raise
        self.port = port
        self.host = interface

    def close(self) -> None:
        """
        Close every socket.
        """
        for sock in self.sockets:
            sock.close()
        self.sockets = []


def processStats(pid: int) -> dict[str, float]:
    """
    What C{/proc} says of a process now: resident and proportional memory
    in bytes, CPU time in seconds.

    @return: C{rss}, C{pss} and C{cpu}; empty if the process is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        rss = int(fields[21]) * os.sysconf("SC_PAGESIZE")
    except (OSError, IndexError, ValueError):
        return {}
    pss = 0.0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except OSError:
        pss = float(rss)
    return {"rss": float(rss), "pss": float(pss), "cpu": cpu}


class WorkerProcess(ProcessProtocol):
    """
    The parent's side of one worker process: its pipes and its end.

    @ivar index: The worker's index in the group.
    @ivar pid: Its process id, while it runs.
    @ivar ready: Fires once the worker listens.
    @ivar ended: Fires with the exit status (or the negated signal) once it
        ended.
    """

    def __init__(self, group: WorkerGroup, index: int) -> None:
        self.group = group
        self.index = index
        self.pid: int | None = None
        self.ready: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self._answers = b""
        self._events = b""
        self._waiting: list[Deferred] = []

    def connectionMade(self) -> None:
        """
        Send the worker its settings.
        """
        self.pid = self.transport.pid  # type: ignore[union-attr]
        payload = pickle.dumps(self.group.bootstrap(self.index))
        self.transport.write(struct.pack("!I", len(payload)) + payload)  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """
        Log events from the worker (on its standard output), or an answer
        (one JSON object per line).
        """
        if childFD == 1:
            self._logged(data)
            return
        if childFD != ANSWER_FD:
            return
        self._answers += data
        while b"\n" in self._answers:
            line, self._answers = self._answers.split(b"\n", 1)
            try:
                answer = json.loads(line)
            except ValueError:
                continue
            if answer.get("ready"):
                if not self.ready.called:
                    self.ready.callback(self)
            elif "stats" in answer:
                waiting, self._waiting = self._waiting, []
                for d in waiting:
                    d.callback(answer["stats"])

    def _logged(self, data: bytes) -> None:
        # jsonFileLogObserver's records: a record separator, the event (no
        # raw newline in JSON), a newline.
        from twisted.logger import eventFromJSON, globalLogPublisher

        self._events += data
        *records, self._events = self._events.split(b"\n")
        for record in records:
            record = record.strip(b"\x1e \t\r")
            if not record:
                continue
            try:
                event = eventFromJSON(record.decode("utf-8", "replace"))
            except ValueError:
                continue
            event["worker"] = self.index
            globalLogPublisher(event)

    def askStats(self) -> Deferred:
        """
        Ask the worker for its counters.

        @return: A L{Deferred} firing with them (a dict), or with L{None}
            if the worker does not answer within L{STATS_WAIT} seconds.
        """
        if self.pid is None or self.transport is None:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiting.append(d)
        self.transport.write(b"stats\n")  # type: ignore[union-attr]
        reactor = self.group.reactor

        def late() -> None:
            if d in self._waiting:
                self._waiting.remove(d)
                d.callback(None)

        call = reactor.callLater(STATS_WAIT, late)
        d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        return d

    def signal(self, number: int) -> None:
        """
        Send the worker a signal, if it runs.
        """
        if self.pid is None:
            return
        try:
            self.transport.signalProcess(number)  # type: ignore[union-attr]
        except Exception:
            pass

    def processEnded(self, reason: Any) -> None:
        """
        The worker ended: tell the group.
        """
        status = getattr(reason.value, "exitCode", None)
        number = getattr(reason.value, "signal", None)
        code = status if status is not None else -(number or 0)
        self.pid = None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        self.ended.callback(code)
        self.group.workerEnded(self, code)


class WorkerGroup(Service):
    """
    The parent of a worker group: an L{twisted.application.service.IService}
    that binds the shared listeners and supervises the workers.

    @ivar config: The service's configuration.
    @ivar workers: How many workers run.
    @ivar listeners: The L{SharedListener}s, once bound.
    @ivar processes: The running L{WorkerProcess}es, by index.
    @ivar restarts: How many times a worker was restarted.
    """

    def __init__(
        self,
        config: Any,
        reactor: Any,
        workers: int,
        statsInterval: float = 60.0,
        maxRestarts: int = 5,
        restartWindow: float = 60.0,
        executable: str = sys.executable,
        spawn: Callable[..., Any] | None = None,
    ) -> None:
        """
        @param config: The L{miniproxy.config.ServiceConfig} every worker
            runs.
        @param statsInterval: Seconds between two reports (0: only on
            SIGUSR1).
        @param maxRestarts: Restarts of one worker allowed within
            C{restartWindow} seconds; one more stops the group.
        @raise ConfigError: If a listener cannot be shared.
        """
        self.config = config
        self.reactor = reactor
        self.workers = workers
        self.statsInterval = statsInterval
        self.maxRestarts = maxRestarts
        self.restartWindow = restartWindow
        self.executable = executable
        self._spawn = spawn
        for settings in config.listeners:
            parseListenDescription(settings.endpoint)
        self.listeners: list[SharedListener] = []
        self.processes: dict[int, WorkerProcess] = {}
        self.restarts = 0
        self._deaths: dict[int, list[float]] = {}
        self._stopping = False
        self._signal: int | None = None
        self._statsCall: Any = None
        self._restartCalls: dict[int, Any] = {}
        self._previousHandlers: dict[int, Any] = {}
        self._allEnded: Deferred | None = None
        self.failed = False

    # -- IService ---------------------------------------------------------

    def privilegedStartService(self) -> None:
        """
        Bind the shared listeners (before twistd drops privileges).  A
        listener that cannot be bound stops twistd with one line.
        """
        if self.listeners:
            return
        try:
            for settings in self.config.listeners:
                self.listeners.append(
                    SharedListener(
                        settings.endpoint, self.config.limits.listenBacklog, self.workers
                    )
                )
        except OSError as e:
            for listener in self.listeners:
                listener.close()
            self.listeners = []
            raise SystemExit(f"miniproxy: cannot listen: {e.strerror or e}") from None
        for listener in self.listeners:
            _log.info(
                "miniproxy listening on {host}:{port}",
                host=listener.host or "0.0.0.0",
                port=listener.port,
            )

    def startService(self) -> None:
        """
        Start the workers, the reports and the signal handling.
        """
        super().startService()
        self.privilegedStartService()
        self._installSignals()
        for index in range(self.workers):
            self._start(index)
        if self.statsInterval:
            self._statsCall = self.reactor.callLater(self.statsInterval, self._periodic)
        ready = [p.ready for p in self.processes.values()]
        gatherResults(ready).addCallback(
            lambda _: _log.info(
                "miniproxy: {n} workers ready (pids {pids})",
                n=self.workers,
                pids=" ".join(str(p.pid) for p in self.processes.values()),
            )
        ).addErrback(lambda f: None)

    def whenReady(self) -> Deferred:
        """
        @return: A L{Deferred} firing once every worker running now
            listens.
        """
        return gatherResults([p.ready for p in self.processes.values()])

    def stopService(self) -> Deferred:
        """
        Stop the workers (with the signal the parent got, SIGTERM by
        default), wait until they ended (killing those that take over
        L{STOP_GRACE} seconds), then close the listeners.
        """
        super().stopService()
        self._stopping = True
        for call in [self._statsCall, *self._restartCalls.values()]:
            if call is not None and call.active():
                call.cancel()
        self._statsCall = None
        self._restartCalls.clear()
        self._restoreSignals()
        number = self._signal or signal.SIGTERM
        waiting = []
        for process in list(self.processes.values()):
            process.signal(number)
            waiting.append(process.ended)
        done: Deferred = gatherResults(waiting) if waiting else succeed(None)
        kill = self.reactor.callLater(STOP_GRACE, self._killAll) if waiting else None

        def closed(result: object) -> None:
            if kill is not None and kill.active():
                kill.cancel()
            for listener in self.listeners:
                listener.close()
            self.listeners = []

        return done.addBoth(closed)

    def _killAll(self) -> None:
        for process in self.processes.values():
            _log.warn("worker {index} did not stop; killing it", index=process.index)
            process.signal(signal.SIGKILL)

    # -- workers ----------------------------------------------------------

    def bootstrap(self, index: int) -> dict[str, Any]:
        """
        What worker C{index} is told at its start.
        """
        return {
            "config": self.config,
            "index": index,
            "workers": self.workers,
            "listeners": [
                (FIRST_LISTENER_FD + i, listener.family, listener.steered)
                for i, listener in enumerate(self.listeners)
            ],
        }

    def _start(self, index: int) -> None:
        self._restartCalls.pop(index, None)
        if self._stopping:
            return
        process = WorkerProcess(self, index)
        childFDs: dict[int, Any] = {0: "w", 1: "r", 2: 2, ANSWER_FD: "r"}
        for i, listener in enumerate(self.listeners):
            childFDs[FIRST_LISTENER_FD + i] = listener.sockets[index].fileno()
        env = dict(os.environ)
        path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [path, env.get("PYTHONPATH", "")] if p
        )
        self.processes[index] = process
        spawn = self._spawn if self._spawn is not None else self.reactor.spawnProcess
        spawn(
            process,
            self.executable,
            [self.executable, "-m", "miniproxy.workers"],
            env=env,
            childFDs=childFDs,
        )

    def workerEnded(self, process: WorkerProcess, code: int) -> None:
        """
        A worker ended: restart it, unless the group is stopping or the
        worker died too often.
        """
        if self.processes.get(process.index) is process:
            del self.processes[process.index]
        if self._stopping:
            return
        now = self.reactor.seconds()
        deaths = [
            t for t in self._deaths.get(process.index, []) if now - t < self.restartWindow
        ]
        deaths.append(now)
        self._deaths[process.index] = deaths
        if len(deaths) > self.maxRestarts:
            _log.critical(
                "worker {index} ended {n} times within {window:g}s (last status "
                "{code}); stopping the group",
                index=process.index,
                n=len(deaths),
                window=self.restartWindow,
                code=code,
            )
            self.failed = True
            self.reactor.callLater(0, self._stopReactor)
            return
        delay = min(0.1 * 2 ** (len(deaths) - 2), 5.0) if len(deaths) > 1 else 0.0
        _log.warn(
            "worker {index} ended (status {code}); restarting it in {delay:g}s",
            index=process.index,
            code=code,
            delay=delay,
        )
        self.restarts += 1
        self._restartCalls[process.index] = self.reactor.callLater(
            delay, self._start, process.index
        )

    def _stopReactor(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    # -- signals ----------------------------------------------------------

    def _installSignals(self) -> None:
        if not hasattr(signal, "SIGUSR1"):
            return
        try:
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                previous = signal.getsignal(number)
                self._previousHandlers[number] = previous
                signal.signal(number, self._signalled)
        except ValueError:
            # Not the main thread (a test): no signal handling.
            self._previousHandlers.clear()

    def _restoreSignals(self) -> None:
        handlers, self._previousHandlers = self._previousHandlers, {}
        for number, previous in handlers.items():
            try:
                signal.signal(number, previous if previous is not None else signal.SIG_DFL)
            except ValueError:
                pass

    def _signalled(self, number: int, frame: Any) -> None:
        if number == signal.SIGUSR1:
            self.reactor.callFromThread(self.report)
            return
        # Passed on to the workers by stopService.
        self._signal = number
        previous = self._previousHandlers.get(number)
        if callable(previous):
            previous(number, frame)
        else:
            self.reactor.callFromThread(self._stopReactor)

    # -- reports ----------------------------------------------------------

    def _periodic(self) -> None:
        self._statsCall = self.reactor.callLater(self.statsInterval, self._periodic)
        self.report()

    def stats(self) -> Deferred:
        """
        The group's totals now.

        @return: A L{Deferred} firing with a dict: C{workers}, C{pids},
            C{rss} and C{pss} (bytes, the parent and every running worker),
            C{cpu} (seconds, the parent, the running workers and the ended
            ones), C{restarts}, and the sums of the workers' counters
            (C{open}, C{closed}, C{refused}, C{synSeen}, C{synPending});
            C{answered} is how many workers gave their counters, and
            C{perWorker} each one's counters by index.
        """
        processes = list(self.processes.values())
        pids = [os.getpid()] + [p.pid for p in processes if p.pid is not None]
        rss = pss = cpu = 0.0
        for pid in pids:
            found = processStats(pid)
            rss += found.get("rss", 0.0)
            pss += found.get("pss", 0.0)
            cpu += found.get("cpu", 0.0) if pid != os.getpid() else 0.0
        times = os.times()
        # This process, and its children that ended (and were waited for).
        cpu += times.user + times.system + times.children_user + times.children_system
        totals: dict[str, Any] = {
            "workers": len(processes),
            "pids": pids[1:],
            "rss": rss,
            "pss": pss,
            "cpu": cpu,
            "restarts": self.restarts,
        }

        def add(answers: list[Any]) -> dict[str, Any]:
            counted = [a for a in answers if a]
            totals["answered"] = len(counted)
            totals["perWorker"] = {
                p.index: a for p, a in zip(processes, answers) if a
            }
            for key in ("open", "closed", "refused", "synSeen", "synPending"):
                totals[key] = sum(a.get(key, 0) for a in counted)
            return totals

        return gatherResults([p.askStats() for p in processes]).addCallback(add)

    def report(self) -> Deferred:
        """
        Log the group's totals (see L{stats}) in one line.
        """

        def log(totals: dict[str, Any]) -> dict[str, Any]:
            _log.info(
                "miniproxy group: {workers} workers, rss {rss:.1f} MiB, pss "
                "{pss:.1f} MiB, cpu {cpu:.2f}s, flows open {open} closed {closed} "
                "({each}) refused {refused}, restarts {restarts}",
                workers=totals["workers"],
                rss=totals["rss"] / 2**20,
                pss=totals["pss"] / 2**20,
                cpu=totals["cpu"],
                open=totals["open"],
                closed=totals["closed"],
                refused=totals["refused"],
                each=" ".join(
                    f"w{i}={a['closed']}" for i, a in sorted(totals["perWorker"].items())
                ),
                restarts=totals["restarts"],
                totals=totals,
            )
            return totals

        return self.stats().addCallback(log)


# -- the worker process ----------------------------------------------------


class AdoptedEndpoint:
    """
    A server endpoint that listens on an inherited listening socket.

    Unlike Twisted's C{AdoptedStreamServerEndpoint} it does not need
    L{twisted.internet.endpoints} (and its TLS imports) at start-up.
    """

    def __init__(self, reactor: Any, fileno: int, family: int) -> None:
        self.reactor = reactor
        self.fileno = fileno
        self.family = family

    def listen(self, factory: Any) -> Deferred:
        """
        Adopt the socket (the reactor keeps a duplicate; the inherited
        descriptor is closed).
        """
        from twisted.internet.defer import fail

        from miniproxy.service import adoptBatched

        try:
            port = adoptBatched(self.reactor, self.fileno, self.family, factory)
            os.close(self.fileno)
        except BaseException:
            return fail()
        return succeed(port)


class _Control(Protocol):
    """
    The worker's end of its pipes to the parent: commands on standard
    input, answers on L{ANSWER_FD}.
    """

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def dataReceived(self, data: bytes) -> None:
        for line in data.splitlines():
            if line.strip() == b"stats":
                self.answer({"stats": self.worker.counters()})

    def answer(self, message: dict[str, Any]) -> None:
        self.transport.write(json.dumps(message).encode() + b"\n")  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        # The parent is gone: so is the worker.
        self.worker.stop()


class _Worker:
    """
    A worker process: the service on adopted sockets, and its counters.
    """

    def __init__(self, reactor: Any, settings: dict[str, Any]) -> None:
        from attrs import evolve

        from miniproxy.service import ProxyService

        self.reactor = reactor
        self.index = settings["index"]
        self.closed = 0
        config = settings["config"]
        listeners = settings["listeners"]
        steered = all(s for _, _, s in listeners)
        if not steered:
            config = evolve(
                config,
                listeners=tuple(evolve(l, synTap=False) for l in config.listeners),
            )
        endpoints = [AdoptedEndpoint(reactor, fd, family) for fd, family, _ in listeners]
        self.service = ProxyService(
            config,
            reactor,
            onFlowClosed=self._closed,
            endpoints=endpoints,
            share=(self.index, settings["workers"]),
            tuneGC=True,
        )

    def _closed(self, flow: Any) -> None:
        self.closed += 1

    def counters(self) -> dict[str, Any]:
        """
        The worker's counters, for the parent's report.
        """
        early = self.service.early
        return {
            "pid": os.getpid(),
            "open": len(self.service.table.flows),
            "closed": self.closed,
            "refused": self.service.table.refused,
            "synSeen": sum(getattr(t, "seen", 0) for t in early._taps.values()),
            "synPending": len(early.pending),
        }

    def stop(self) -> None:
        """
        Stop the reactor (the service stops with it).
        """
        if self.reactor.running:
            self.reactor.stop()


def _readBootstrap() -> dict[str, Any]:
    header = b""
    while len(header) < 4:
        chunk = os.read(0, 4 - len(header))
        if not chunk:
            raise SystemExit("miniproxy worker: the parent sent no settings")
        header += chunk
    (size,) = struct.unpack("!I", header)
    payload = b""
    while len(payload) < size:
        chunk = os.read(0, size - len(payload))
        if not chunk:
            raise SystemExit("miniproxy worker: the parent's settings were cut short")
        payload += chunk
    return pickle.loads(payload)


def workerMain() -> None:
    """
    Run a worker: read the settings the parent sends on standard input,
    log where the parent says, run the service on the inherited sockets
    until SIGTERM, SIGINT, or the parent's end.
    """
    settings = _readBootstrap()
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    # The log events go to the parent, which emits them as its own.
    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(sys.stdout)], redirectStandardIO=False
    )
    # SIGUSR1 is the parent's: a worker ignores one sent to the group.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO

    worker = _Worker(reactor, settings)
    control = _Control(worker)

    def started() -> None:
        worker.service.startService()

        def ready(ports: Any) -> None:
            StandardIO(control, stdin=0, stdout=ANSWER_FD, reactor=reactor)
            control.answer({"ready": True, "pid": os.getpid()})
            _log.info(
                "miniproxy worker {index} (pid {pid}) ready",
                index=worker.index,
                pid=os.getpid(),
            )

        def failed(reason: Any) -> None:
            _log.failure("miniproxy worker {index} cannot listen", reason, index=worker.index)
            worker.stop()

        worker.service.whenListening().addCallbacks(ready, failed)

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", worker.service.stopService)
    reactor.run()


if __name__ == "__main__":
    workerMain()
