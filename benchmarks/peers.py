# -*- test-case-name: tests.test_benchmarks -*-
"""
The proxies under test, started as subprocesses pinned to the proxy core,
and the helpers that start, watch and stop processes.

Every peer listens on C{127.0.0.1:listenPort} and relays to the backend at
C{127.0.0.1:backendPort}.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from attrs import define, field, frozen

#: The repository root (what C{PYTHONPATH} must hold for C{twistd}).
REPO = Path(__file__).resolve().parent.parent

#: Where the benchmarks' no-op proxy function dropin lives.
DROPINS = Path(__file__).resolve().parent / "dropins"

#: The core proxies run on, and the one load generators and backends run
#: on.
PROXY_CPU = 0
LOAD_CPU = 1


def _usableCpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


#: The cores this process could run on when it started (before L{pinSelf}).
_CPUS = _usableCpus()


def cpuCount() -> int:
    """
    The number of cores this process could run on when it started.
    """
    return _CPUS


def pinned(command: Sequence[str], cpu: int) -> list[str]:
    """
    C{command} run under C{taskset -c cpu}, when there are two cores and
    C{taskset} is installed; C{command} unchanged otherwise.
    """
    if cpuCount() >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *command]
    return list(command)


def pinSelf(cpu: int = LOAD_CPU) -> None:
    """
    Run this process (and the children it starts unpinned) on C{cpu}, when
    there are two cores.
    """
    if cpuCount() >= 2:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that is free now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listeningPorts() -> set[int]:
    """
    The IPv4 TCP ports something listens on (from C{/proc/net/tcp}).
    """
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A":
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def waitFor(condition: Callable[[], bool], timeout: float, what: str,
            process: subprocess.Popen | None = None) -> None:
    """
    Poll C{condition} every millisecond until it holds.

    @raise RuntimeError: If it does not hold within C{timeout} seconds, or
        C{process} exits first.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout} s")
        time.sleep(0.001)


def processTree(pid: int) -> list[int]:
    """
    C{pid} and all its descendants.
    """
    pids = [pid]
    i = 0
    while i < len(pids):
        current = pids[i]
        i += 1
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    pids.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return pids


def memoryOf(pid: int) -> dict[str, int]:
    """
    The memory of C{pid} and its descendants, in bytes: C{rss} (the sum of
    their C{VmRSS}) and C{pss} (the sum of their proportional set sizes,
    which counts pages shared between a forking server's children once).
    """
    rss = pss = 0
    for p in processTree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return {"rss": rss, "pss": pss, "processes": len(processTree(pid))}


@define
class Process:
    """
    A subprocess in its own session, stopped with its whole group.

    @ivar name: What it is, for messages.
    @ivar popen: The process.
    @ivar log: The file its output goes to.
    """

    name: str
    popen: subprocess.Popen
    log: Path | None = None

    @classmethod
    def start(cls, name: str, command: Sequence[str], log: Path | None = None,
              env: dict[str, str] | None = None, stdout: int | None = None,
              passFds: Sequence[int] = ()) -> "Process":
        """
        Start C{command}, with its output in C{log} (or discarded), and
        the descriptors C{passFds} left open for it.
        """
        out: object
        if stdout is not None:
            out = stdout
        elif log is not None:
            out = open(log, "ab")
        else:
            out = subprocess.DEVNULL
        popen = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=out,  # type: ignore[arg-type]
            stderr=subprocess.STDOUT if stdout is None else subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            pass_fds=tuple(passFds),
        )
        if hasattr(out, "close"):
            out.close()  # type: ignore[union-attr]
        return cls(name, popen, log)

    @property
    def pid(self) -> int:
        """
        The process id.
        """
        return self.popen.pid

    def tail(self, lines: int = 20) -> str:
        """
        The last lines of its log, for error messages.
        """
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """
        Stop it and its group: C{SIGTERM}, then C{SIGKILL}.
        """
        if self.popen.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.popen.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            # A forking server's children may outlive it.
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.popen.stdout is not None:
            self.popen.stdout.close()


@frozen
class Peer:
    """
    One proxy (or none) under test.

    @ivar name: Its short name, used in results.
    @ivar label: Its name in tables.
    @ivar build: Makes its command line from C{(listenPort, backendPort,
        workdir)}.
    @ivar env: Extra environment.
    @ivar needs: The executables it needs.
    @ivar proxy: Whether there is a proxy at all (not for C{direct}).
    @ivar workers: How many processes share one listening socket (made
        here, and handed over as systemd does: C{LISTEN_FDS}, fd 3); worker
        I{i} runs on core I{i} modulo the cores.
    @ivar measures: The measurements it takes part in; all by default.
    """

    name: str
    label: str
    build: Callable[[int, int, Path], list[str]] | None = None
    env: dict[str, str] = field(factory=dict)
    needs: tuple[str, ...] = ()
    proxy: bool = True
    workers: int = 1
    measures: tuple[str, ...] | None = None

    def takesPart(self, measurement: str) -> bool:
        """
        Whether this peer is measured by C{measurement}.
        """
        return self.measures is None or measurement in self.measures

    def missing(self) -> list[str]:
        """
        The executables it needs that are not installed.
        """
        return [n for n in self.needs if shutil.which(n) is None]

    def command(self, listenPort: int, backendPort: int, workdir: Path) -> list[str]:
        """
        Its command line, pinned to the proxy core.
        """
        assert self.build is not None
        return pinned(self.build(listenPort, backendPort, workdir), PROXY_CPU)

    def environment(self) -> dict[str, str]:
        """
        The environment it runs with.
        """
        env = dict(os.environ)
        env.update(self.env)
        return env

    def start(self, listenPort: int, backendPort: int, workdir: Path,
              timeout: float = 20.0) -> "Process | ProcessGroup":
        """
        Start it and wait until it listens.
        """
        if self.workers > 1:
            return self._startWorkers(listenPort, backendPort, workdir, timeout)
        process = Process.start(
            self.name,
            self.command(listenPort, backendPort, workdir),
            log=workdir / f"{self.name}.log",
            env=self.environment(),
        )
        try:
            waitFor(lambda: listenPort in listeningPorts(), timeout, self.name, process.popen)
        except RuntimeError as e:
            process.stop()
            raise RuntimeError(f"{e}\n{process.tail()}") from None
        return process


    def _startWorkers(self, listenPort: int, backendPort: int, workdir: Path,
                      timeout: float) -> "ProcessGroup":
        assert self.build is not None
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", listenPort))
        listener.listen(1024)
        fd = listener.fileno()
        # The socket goes to fd 3 of each worker, with systemd's variables.
        move = "" if fd == 3 else f" 3<&{fd} {fd}<&-"
        group = ProcessGroup(self.name, [])
        try:
            for i in range(self.workers):
                command = pinned(self.build(listenPort, backendPort, workdir),
                                 i % max(cpuCount(), 1))
                group.processes.append(Process.start(
                    f"{self.name}-{i}",
                    ["sh", "-c", "export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=proxy; "
                     f'exec "$@"{move}', "sh", *command],
                    log=workdir / f"{self.name}-{i}.log",
                    env=self.environment(),
                    passFds=(fd,),
                ))
            # Each worker logs once it listens on the socket it adopted.
            for process in group.processes:
                waitFor(lambda: "listening on" in process.tail(50), timeout, process.name,
                        process.popen)
        except Exception as e:
            group.stop()
            raise RuntimeError(f"{e}\n{group.tail()}") from None
        finally:
            listener.close()
        return group


@define
class ProcessGroup:
    """
    The worker processes of one peer, stopped together.

    @ivar name: The peer's name.
    @ivar processes: The workers.
    """

    name: str
    processes: list[Process]

    @property
    def pid(self) -> int:
        """
        The first worker's process id.
        """
        return self.processes[0].pid

    @property
    def popen(self) -> subprocess.Popen:
        """
        The first worker's process.
        """
        return self.processes[0].popen

    def tail(self, lines: int = 20) -> str:
        """
        The last lines of every worker's log.
        """
        return "\n".join(p.tail(lines) for p in self.processes)

    def stop(self, timeout: float = 5.0) -> None:
        """
        Stop every worker.
        """
        for process in self.processes:
            process.stop(timeout)


def haproxyConfig(listenPort: int, backendPort: int, splice: bool) -> str:
    """
    An HAProxy configuration: one thread, TCP mode, optionally splicing
    every direction.
    """
    spliceOptions = (
        "    option splice-auto\n    option splice-request\n    option splice-response\n"
        if splice
        else ""
    )
    return (
        "global\n"
        "    nbthread 1\n"
        "    maxconn 5000\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 10s\n"
        "    timeout client 300s\n"
        "    timeout server 300s\n"
        f"listen bench\n"
        f"    bind 127.0.0.1:{listenPort}\n"
        "    backlog 1024\n"
        f"{spliceOptions}"
        f"    server backend 127.0.0.1:{backendPort}\n"
    )


def _haproxy(splice: bool) -> Callable[[int, int, Path], list[str]]:
    def build(listenPort: int, backendPort: int, workdir: Path) -> list[str]:
        config = workdir / f"haproxy-{'splice' if splice else 'plain'}-{listenPort}.cfg"
        config.write_text(haproxyConfig(listenPort, backendPort, splice))
        return ["haproxy", "-db", "-f", str(config)]

    return build


def _socat(listenPort: int, backendPort: int, workdir: Path) -> list[str]:
    return [
        "socat",
        f"TCP-LISTEN:{listenPort},bind=127.0.0.1,fork,reuseaddr,backlog=1024",
        f"TCP:127.0.0.1:{backendPort}",
    ]


#: How the Twisted peers are run: C{twistd} with this interpreter (the
#: C{twistd} script may be a slow shell shim).
TWISTD = (sys.executable, "-c", "from twisted.scripts.twistd import run; run()")


def _pyfloor(listenPort: int, backendPort: int, workdir: Path) -> list[str]:
    return [sys.executable, "-S", "-m", "benchmarks.pyfloor", str(listenPort), str(backendPort)]


def _portforward(listenPort: int, backendPort: int, workdir: Path) -> list[str]:
    return [
        *TWISTD,
        "-n",
        "--pidfile=",
        "portforward",
        "-p",
        f"tcp:{listenPort}:interface=127.0.0.1:backlog=1024",
        "-h",
        "127.0.0.1",
        "-d",
        str(backendPort),
    ]


#: miniproxy's limits in the benchmarks: every flow comes from 127.0.0.1,
#: so the per-source bound (256 by default) must not refuse the 1,000 idle
#: pairs of the memory measurement.
MINIPROXY_LIMITS = ("--max-flows", "100000", "--max-flows-per-source", "100000")


#: How the lean peers are run: C{python -m miniproxy} (L{miniproxy.run}),
#: with or without C{site} (then with the repository and this interpreter's
#: C{site-packages} on C{PYTHONPATH}, see L{_pythonPath}).
LEAN = (sys.executable, "-m", "miniproxy")
LEAN_NO_SITE = (sys.executable, "-S", "-m", "miniproxy")


def _miniproxy(mode: str, functions: Sequence[str] = (), listen: str | None = None,
               config: str | None = None,
               runner: Sequence[str] = (*TWISTD, "-n", "--pidfile=", "miniproxy"),
               ) -> Callable[[int, int, Path], list[str]]:
    def build(listenPort: int, backendPort: int, workdir: Path) -> list[str]:
        options = []
        if config is not None:
            path = workdir / f"miniproxy-{listenPort}.toml"
            path.write_text(config)
            options = ["--config", str(path)]
        command = [
            *runner,
            *options,
            "--listen",
            listen or f"tcp:{listenPort}:interface=127.0.0.1",
            "--to",
            f"tcp:host=127.0.0.1:port={backendPort}",
            "--mode",
            mode,
            *MINIPROXY_LIMITS,
            # The access log's own file, written in batches, as in service.
            "--access-log",
            str(workdir / f"access-{listenPort}.log"),
        ]
        for name in functions:
            command += ["--function", name]
        return command

    return build


def _pythonPath(*extra: Path, sitePackages: bool = False) -> str:
    parts = [str(p) for p in extra] + [str(REPO)]
    if sitePackages:
        import sysconfig

        parts += dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)


DIRECT = Peer("direct", "direct (no proxy)", proxy=False)
HAPROXY = Peer("haproxy", "HAProxy (1 thread)", _haproxy(False), needs=("haproxy",))
HAPROXY_SPLICE = Peer(
    "haproxy-splice", "HAProxy, forced splice", _haproxy(True), needs=("haproxy",)
)
SOCAT = Peer("socat", "socat (fork)", _socat, needs=("socat",))
PORTFORWARD = Peer("portforward", "Twisted portforward", _portforward)
PYFLOOR = Peer(
    "pyfloor",
    "CPython floor (bare epoll relay)",
    _pyfloor,
    env={"PYTHONPATH": str(REPO)},
    measures=("throughput", "simultaneous", "shortFlows", "idleMemory", "coldStart"),
)
MINIPROXY_ACCEPT = Peer(
    "miniproxy-accept",
    "miniproxy --mode accept",
    _miniproxy("accept"),
    env={"PYTHONPATH": _pythonPath()},
)
MINIPROXY_EARLY = Peer(
    "miniproxy-early",
    "miniproxy --mode early",
    _miniproxy("early"),
    env={"PYTHONPATH": _pythonPath()},
)
MINIPROXY_LEAN = Peer(
    "miniproxy-lean",
    "python -m miniproxy --mode accept",
    _miniproxy("accept", runner=LEAN),
    env={"PYTHONPATH": _pythonPath()},
    measures=("coldStart",),
)
MINIPROXY_LEAN_NO_SITE = Peer(
    "miniproxy-lean-nosite",
    "python -S -m miniproxy --mode accept",
    _miniproxy("accept", runner=LEAN_NO_SITE),
    env={"PYTHONPATH": _pythonPath(sitePackages=True)},
    measures=("coldStart",),
)
MINIPROXY_USERSPACE = Peer(
    "miniproxy-userspace",
    "miniproxy --mode accept, splice off",
    _miniproxy("accept", config="[limits]\nsplice = false\n"),
    env={"PYTHONPATH": _pythonPath()},
    measures=("throughput", "simultaneous", "shortFlows"),
)
MINIPROXY_NOOP = Peer(
    "miniproxy-noop",
    "miniproxy --mode accept + no-op function",
    _miniproxy("accept", ["bench-noop"]),
    env={"PYTHONPATH": _pythonPath(DROPINS)},
)
MINIPROXY_WORKERS = Peer(
    "miniproxy-2workers",
    "miniproxy --mode accept, 2 workers (CPUs 0 and 1)",
    _miniproxy("accept", listen="systemd:domain=INET:index=0"),
    env={"PYTHONPATH": _pythonPath()},
    workers=2,
    measures=("simultaneous", "shortFlows"),
)

#: Every peer, in the order of the tables (the no-op function's run is
#: part of miniproxy's hook comparison).
PEERS: tuple[Peer, ...] = (
    DIRECT,
    HAPROXY,
    HAPROXY_SPLICE,
    SOCAT,
    PORTFORWARD,
    PYFLOOR,
    MINIPROXY_ACCEPT,
    MINIPROXY_EARLY,
    MINIPROXY_LEAN,
    MINIPROXY_LEAN_NO_SITE,
    MINIPROXY_USERSPACE,
    MINIPROXY_WORKERS,
)

#: The peer ratios are taken to.
REFERENCE = HAPROXY.name


def peerNamed(name: str) -> Peer:
    """
    The peer called C{name}.

    @raise KeyError: If there is none.
    """
    for peer in PEERS:
        if peer.name == name:
            return peer
    raise KeyError(name)
