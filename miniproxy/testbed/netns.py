# -*- test-case-name: tests.test_netns -*-
"""
Test hosts as Linux network namespaces.

A L{Testbed} owns namespaces whose names share a prefix unique to the run
(C{mp<pid>-<hex>-}, see L{uniquePrefix}), the veth links between them, and
the processes started in them.  L{Testbed.teardown} removes all of it and
may be called any number of times; it is also registered with L{atexit},
so a run stopped with Ctrl-C leaves nothing behind.  Namespaces of a run
that crashed are found by their prefix: L{cleanupStale} removes those whose
process is gone (a new L{Testbed} does it when it starts), or every one with
a given prefix.  From a shell::

    python -m miniproxy.testbed.netns --cleanup          # runs that are gone
    python -m miniproxy.testbed.netns --cleanup PREFIX   # everything named PREFIX*

A typical test::

    reason = namespacesUnavailable(tools=("ip", "nft"))
    if reason:
        raise SkipTest(reason)
    bed = Testbed()
    self.addCleanup(bed.teardown)
    client, server = bed.addNamespace("client"), bed.addNamespace("server")
    bed.connect(client, server, ["10.0.0.1/24"], ["10.0.0.2/24"])
    proc = server.spawnPython(["-m", "http.server", "80"])
    with client.entered():
        # Sockets made here (also by the reactor) live in the namespace.
        d = connectProtocol(TCP4ClientEndpoint(reactor, "10.0.0.2", 80), p)

Every command runs with an argument list (no shell) and its return code is
checked: a failure raises L{CommandError} with the command and its output.
All of this needs root (C{CAP_SYS_ADMIN} and C{CAP_NET_ADMIN}).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence

from miniproxy.processes import processAlive

#: Where C{ip netns} keeps its named namespaces.
NETNS_DIR = "/run/netns"
#: The C{clone(2)} flag of network namespaces, for C{setns(2)}.
CLONE_NEWNET = 0x40000000
#: The start of every name this module makes.
NAME_START = "mp"
#: A prefix made by L{uniquePrefix}: C{mp}, the owning pid, random hex.
PREFIX_PATTERN = re.compile(rf"^{NAME_START}(\d+)-([0-9a-f]{{6}})-")
#: The longest network interface name (C{IFNAMSIZ} - 1).
MAX_INTERFACE_NAME = 15
#: Seconds a command may run.
COMMAND_TIMEOUT = 30.0
#: Seconds a process gets to exit after C{SIGTERM} before C{SIGKILL}.
STOP_TIMEOUT = 5.0

#: TCP state C{LISTEN} in C{/proc/net/tcp}.
_TCP_LISTEN = "0A"


class NetnsError(Exception):
    """
    Setting up or tearing down a namespace failed.
    """


class CommandError(NetnsError):
    """
    A command exited with a non-zero status.

    @ivar command: The argument list.
    @ivar returncode: Its exit status.
    @ivar stdout: What it wrote to standard output.
    @ivar stderr: What it wrote to standard error.
    """

    def __init__(self, command: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.command = list(command)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        output = (stderr or stdout).strip() or "no output"
        super().__init__(
            f"{' '.join(self.command)!r} exited with status {returncode}: {output}"
        )


def run(
    command: Sequence[str],
    check: bool = True,
    input: str | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """
    Run a command and wait for it.

    @param command: The program and its arguments (no shell).
    @param check: Whether a non-zero status raises L{CommandError}.
    @param input: Text for its standard input.
    @param timeout: Seconds it may run.
    @return: The finished process, with its text output.
    @raise CommandError: If C{check} and it failed.
    @raise NetnsError: If the program is not installed, or it timed out.
    """
    command = list(command)
    try:
        result = subprocess.run(
            command,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise NetnsError(f"{command[0]!r} is not installed (running {command!r})") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{command!r} did not finish in {timeout:g}s") from None
    if check and result.returncode != 0:
        raise CommandError(command, result.returncode, result.stdout, result.stderr)
    return result


def rootAvailable(geteuid: Callable[[], int] = os.geteuid) -> bool:
    """
    Whether this process runs as root.

    @param geteuid: Returns the effective user id (replaced in tests).
    """
    return geteuid() == 0


def missingTools(
    tools: Iterable[str], which: Callable[[str], str | None] = shutil.which
) -> list[str]:
    """
    The programs of C{tools} that are not on C{PATH}.

    @param which: Finds a program (replaced in tests).
    """
    return [tool for tool in tools if which(tool) is None]


_probeResult: dict[str, str | None] = {}


def _probeNamespaces() -> str | None:
    # Creating one is the only sure test (a container may forbid it).
    if "result" not in _probeResult:
        name = f"{uniquePrefix()}probe"
        try:
            run(["ip", "netns", "add", name])
        except NetnsError as e:
            _probeResult["result"] = f"cannot create a network namespace: {e}"
        else:
            deleteNamespace(name)
            _probeResult["result"] = None
    return _probeResult["result"]


def namespacesUnavailable(
    tools: Iterable[str] = ("ip",),
    geteuid: Callable[[], int] = os.geteuid,
    which: Callable[[str], str | None] = shutil.which,
    probe: Callable[[], str | None] = _probeNamespaces,
) -> str | None:
    """
    Why network namespace tests cannot run here, for C{SkipTest}; L{None}
    when they can.

    @param tools: Programs the tests need besides C{ip}, such as C{nft}.
    @param geteuid: See L{rootAvailable}.
    @param which: See L{missingTools}.
    @param probe: Tries to create a namespace; returns why it failed, or
        L{None}.  The real one runs once per process.
    @return: The reason, or L{None}.
    """
    if not rootAvailable(geteuid):
        return "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    missing = missingTools(["ip", *(t for t in tools if t != "ip")], which)
    if missing:
        return f"not installed: {', '.join(missing)}"
    return probe()


def canUseNamespaces(tools: Iterable[str] = ("ip",)) -> bool:
    """
    Whether network namespace tests can run here (see
    L{namespacesUnavailable} for why not).
    """
    return namespacesUnavailable(tools) is None


def uniquePrefix(pid: int | None = None) -> str:
    """
    A name prefix unique to this run: C{mp<pid>-<6 hex digits>-}.

    The pid lets L{cleanupStale} tell a crashed run's namespaces from those
    of a run still going.
    """
    if pid is None:
        pid = os.getpid()
    return f"{NAME_START}{pid}-{secrets.token_hex(3)}-"


def listNamespaces() -> list[str]:
    """
    The names of the named network namespaces (C{ip netns list}).
    """
    output = run(["ip", "netns", "list"]).stdout
    # Lines are "NAME" or "NAME (id: N)".
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def namespacePids(name: str) -> list[int]:
    """
    The processes in namespace C{name}; none if it does not exist.
    """
    result = run(["ip", "netns", "pids", name], check=False)
    if result.returncode != 0:
        return []
    return [int(p) for p in result.stdout.split()]


def _killAll(pids: Iterable[int]) -> None:
    for pid in pids:
        if pid == os.getpid():
            # Only while a thread of ours is in the namespace: never that.
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def deleteNamespace(name: str) -> bool:
    """
    Kill the processes in namespace C{name}, then delete it (with its
    interfaces, addresses, routes and nftables rules).  Nothing happens if
    it does not exist.

    @return: Whether it existed.
    """
    if not os.path.exists(os.path.join(NETNS_DIR, name)):
        return False
    _killAll(namespacePids(name))
    result = run(["ip", "netns", "del", name], check=False)
    if result.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, name)):
        raise CommandError(
            ["ip", "netns", "del", name], result.returncode, result.stdout, result.stderr
        )
    return True


def cleanupStale(prefix: str | None = None) -> list[str]:
    """
    Delete namespaces left behind by runs that did not tear down.

    @param prefix: Delete every namespace whose name starts with it (take
        care: a run still going loses its namespaces).  With L{None}, delete
        those named by L{uniquePrefix} for a process that is gone.
    @return: The names deleted.
    """
    deleted = []
    for name in listNamespaces():
        if prefix is not None:
            stale = name.startswith(prefix)
        else:
            match = PREFIX_PATTERN.match(name)
            stale = match is not None and not processAlive(int(match.group(1)))
        if stale and deleteNamespace(name):
            deleted.append(name)
    return deleted


def _libcSetns() -> Callable[[int, int], None]:
    setns = getattr(os, "setns", None)
    if setns is not None:
        return setns  # type: ignore[no-any-return]
    libc = ctypes.CDLL(None, use_errno=True)

    def setnsByLibc(fd: int, nstype: int) -> None:
        if libc.setns(fd, nstype) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"setns: {os.strerror(code)}")

    return setnsByLibc


_setns = _libcSetns()


def _listeningPorts(path: str) -> set[int]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()[1:]
    except FileNotFoundError:
        return set()
    ports = set()
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[3] == _TCP_LISTEN:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class Namespace:
    """
    One named network namespace: a test host.

    @ivar name: Its full name (the testbed's prefix and C{shortName}).
    @ivar shortName: The name it was added with.
    @ivar testbed: The testbed that owns it.
    """

    def __init__(self, testbed: Testbed, shortName: str) -> None:
        self.testbed = testbed
        self.shortName = shortName
        self.name = testbed.prefix + shortName

    def __repr__(self) -> str:
        return f"<Namespace {self.name}>"

    @property
    def path(self) -> str:
        """
        The file that names the namespace.
        """
        return os.path.join(NETNS_DIR, self.name)

    def exists(self) -> bool:
        """
        Whether the namespace still exists.
        """
        return os.path.exists(self.path)

    def execArgs(self, command: Sequence[str]) -> list[str]:
        """
        The argument list that runs C{command} in the namespace.
        """
        return ["ip", "netns", "exec", self.name, *command]

    def run(
        self,
        command: Sequence[str],
        check: bool = True,
        input: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """
        Run C{command} in the namespace and wait for it (see L{run}).
        """
        return run(self.execArgs(command), check=check, input=input, timeout=timeout)

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        """
        Run C{ip -n NAME ARGS...}.

        @raise CommandError: If it fails.
        """
        return run(["ip", "-n", self.name, *args])

    def linkUp(self, device: str) -> None:
        """
        Bring C{device} up.
        """
        self.ip("link", "set", "dev", device, "up")

    def addAddress(self, device: str, address: str) -> None:
        """
        Give C{device} an address with its prefix length (C{10.0.0.1/24},
        C{fd00::1/64}).  An IPv6 address skips duplicate address detection,
        so it is usable at once.
        """
        extra = ["nodad"] if ":" in address else []
        self.ip("address", "add", address, "dev", device, *extra)

    def addRoute(
        self,
        destination: str,
        via: str | None = None,
        device: str | None = None,
        table: int | str | None = None,
        kind: str | None = None,
    ) -> None:
        """
        Add a route.

        @param destination: A prefix, or C{default}.
        @param via: The gateway.
        @param device: The output device.
        @param table: The routing table (default: main).
        @param kind: A route type such as C{local}.
        """
        family = ["-6"] if ":" in destination or (via is not None and ":" in via) else []
        command = [*family, "route", "add"]
        if kind is not None:
            command.append(kind)
        command.append(destination)
        if via is not None:
            command += ["via", via]
        if device is not None:
            command += ["dev", device]
        if table is not None:
            command += ["table", str(table)]
        self.ip(*command)

    def addRule(self, *selector: str, table: int | str, ipv6: bool = False) -> None:
        """
        Add a policy routing rule: C{ip rule add SELECTOR... lookup TABLE}
        (for example C{addRule("fwmark", "1", table=100)}).
        """
        family = ["-6"] if ipv6 else []
        self.ip(*family, "rule", "add", *selector, "lookup", str(table))

    def sysctl(self, key: str, value: str | int) -> None:
        """
        Set a sysctl of the namespace (C{net.ipv4.ip_forward}, ...).
        """
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def nft(self, ruleset: str) -> None:
        """
        Load an nftables ruleset (C{nft -f -}) into the namespace.

        @raise CommandError: With nft's message if it is not valid.
        """
        self.run(["nft", "-f", "-"], input=ruleset)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """
        Run the block with the calling thread in the namespace, then return
        to where it was, also on an exception.

        Sockets made in the block belong to the namespace for their whole
        life: so do those the reactor makes synchronously in
        C{listenTCP}/C{connectTCP}.  Nothing else should happen in the
        block.
        """
        with open(self.path) as target, open("/proc/thread-self/ns/net") as home:
            _setns(target.fileno(), CLONE_NEWNET)
            try:
                yield
            finally:
                _setns(home.fileno(), CLONE_NEWNET)

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """
        A socket that belongs to the namespace.
        """
        with self.entered():
            return socket.socket(family, type, proto)

    def listeningTCPPorts(self) -> set[int]:
        """
        The TCP ports something listens on in the namespace (IPv4 and IPv6).
        """
        with self.entered():
            return _listeningPorts("/proc/thread-self/net/tcp") | _listeningPorts(
                "/proc/thread-self/net/tcp6"
            )

    def spawn(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.STDOUT,
    ) -> subprocess.Popen[bytes]:
        """
        Start C{command} in the namespace; the testbed stops it at teardown
        (or see L{Testbed.stopProcess}).

        @param env: Its whole environment (default: this process's).
        @param stdout: Where its output goes (default: nowhere).
        @param stderr: Where its errors go (default: with its output).
        """
        return self.testbed.spawn(self, command, env=env, cwd=cwd, stdout=stdout, stderr=stderr)

    def spawnPython(
        self,
        args: Sequence[str],
        pythonPath: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """
        Start this Python interpreter in the namespace with C{args} (such as
        C{["-m", "module"]} or C{["-c", code]}).

        @param pythonPath: Directories put first on its C{PYTHONPATH}.
        @param kwargs: See L{spawn}.
        """
        environment = dict(os.environ if env is None else env)
        if pythonPath:
            paths = [*pythonPath]
            if environment.get("PYTHONPATH"):
                paths.append(environment["PYTHONPATH"])
            environment["PYTHONPATH"] = os.pathsep.join(paths)
        return self.spawn([sys.executable, *args], env=environment, **kwargs)


class VethPair:
    """
    A veth link between two namespaces.

    @ivar a: The first namespace.
    @ivar aName: Its end's interface name.
    @ivar b: The second namespace.
    @ivar bName: Its end's interface name.
    """

    def __init__(self, a: Namespace, aName: str, b: Namespace, bName: str) -> None:
        self.a, self.aName, self.b, self.bName = a, aName, b, bName

    def __repr__(self) -> str:
        return f"<VethPair {self.a.name}/{self.aName} -- {self.b.name}/{self.bName}>"


_live: set[Testbed] = set()
_atexitRegistered = False


def _teardownAll() -> None:
    """
    Tear down every testbed not torn down yet (run at exit).
    """
    for testbed in list(_live):
        try:
            testbed.teardown()
        except Exception as e:  # Keep going: clean up the others.
            sys.stderr.write(f"miniproxy.testbed: teardown of {testbed.prefix} failed: {e}\n")


class Testbed:
    """
    A set of namespaces, the links between them and the processes in them,
    made and removed together.

    @ivar prefix: The start of every namespace name (see L{uniquePrefix}).
    @ivar namespaces: The namespaces by short name.
    @ivar links: The veth pairs.
    @ivar processes: The processes started and not yet stopped.
    """

    def __init__(self, prefix: str | None = None, reclaimStale: bool = True) -> None:
        """
        @param prefix: The name prefix; a new L{uniquePrefix} by default.
        @param reclaimStale: Whether to delete, first, the namespaces of runs
            whose process is gone (L{cleanupStale}).
        """
        global _atexitRegistered
        if reclaimStale:
            cleanupStale()
        self.prefix = prefix if prefix is not None else uniquePrefix()
        self.namespaces: dict[str, Namespace] = {}
        self.links: list[VethPair] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        _live.add(self)
        if not _atexitRegistered:
            atexit.register(_teardownAll)
            _atexitRegistered = True

    def __repr__(self) -> str:
        return f"<Testbed {self.prefix} {sorted(self.namespaces)}>"

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def addNamespace(self, shortName: str) -> Namespace:
        """
        Create a namespace named C{prefix + shortName}, with its loopback
        up.

        @raise NetnsError: If the name is taken or bad, or creating fails.
        """
        if shortName in self.namespaces:
            raise NetnsError(f"namespace {shortName!r} already exists in {self!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", shortName):
            raise NetnsError(f"bad namespace name {shortName!r}: use letters, digits, _ . -")
        namespace = Namespace(self, shortName)
        _live.add(self)
        run(["ip", "netns", "add", namespace.name])
        self.namespaces[shortName] = namespace
        namespace.linkUp("lo")
        return namespace

    def connect(
        self,
        a: Namespace,
        b: Namespace,
        aAddresses: Sequence[str] = (),
        bAddresses: Sequence[str] = (),
        aName: str | None = None,
        bName: str | None = None,
    ) -> VethPair:
        """
        Link two namespaces with a veth pair, give each end its addresses
        and bring both up.

        @param aAddresses: Addresses with prefix length for C{a}'s end.
        @param bAddresses: The same for C{b}'s end.
        @param aName: C{a}'s interface name (default: C{b}'s short name).
        @param bName: C{b}'s interface name (default: C{a}'s short name).
        """
        aName = aName if aName is not None else b.shortName[:MAX_INTERFACE_NAME]
        bName = bName if bName is not None else a.shortName[:MAX_INTERFACE_NAME]
        for name in (aName, bName):
            if not 0 < len(name) <= MAX_INTERFACE_NAME:
                raise NetnsError(
                    f"bad interface name {name!r}: 1 to {MAX_INTERFACE_NAME} characters"
                )
        # Made inside the namespaces: no name is ever taken in the root one.
        a.ip("link", "add", "name", aName, "type", "veth", "peer", "name", bName, "netns", b.name)
        pair = VethPair(a, aName, b, bName)
        self.links.append(pair)
        for namespace, device, addresses in ((a, aName, aAddresses), (b, bName, bAddresses)):
            for address in addresses:
                namespace.addAddress(device, address)
            namespace.linkUp(device)
        return pair

    def spawn(
        self,
        namespace: Namespace,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.STDOUT,
    ) -> subprocess.Popen[bytes]:
        """
        Start C{command} in C{namespace} (see L{Namespace.spawn}).

        @raise NetnsError: If the namespace is gone or C{ip} is missing.
        """
        if not namespace.exists():
            raise NetnsError(f"{namespace!r} does not exist")
        try:
            process = subprocess.Popen(
                namespace.execArgs(command),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        except FileNotFoundError:
            raise NetnsError("'ip' is not installed") from None
        self.processes.append(process)
        return process

    def stopProcess(
        self, process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT
    ) -> int:
        """
        Stop a process: C{SIGTERM}, then C{SIGKILL} if it has not exited
        after C{timeout} seconds.

        @return: Its exit status.
        """
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()
        if process in self.processes:
            self.processes.remove(process)
        return process.returncode

    def teardown(self) -> None:
        """
        Stop the processes, then delete the namespaces (and with them the
        links, routes and rules).  Safe to call again, and after a partial
        set-up or a failed teardown.

        @raise NetnsError: If a namespace cannot be deleted (after trying
            all of them).
        """
        for process in list(self.processes):
            self.stopProcess(process)
        errors = []
        for namespace in list(self.namespaces.values()):
            try:
                deleteNamespace(namespace.name)
            except NetnsError as e:
                errors.append(e)
            else:
                del self.namespaces[namespace.shortName]
        # Anything made with the prefix, but not through this object.
        for name in listNamespaces():
            if name.startswith(self.prefix):
                try:
                    deleteNamespace(name)
                except NetnsError as e:
                    errors.append(e)
        self.links = []
        if errors:
            raise NetnsError(f"teardown of {self.prefix}: {'; '.join(map(str, errors))}")
        _live.discard(self)


def pollUntil(
    reactor: Any,
    predicate: Callable[[], bool],
    timeout: float,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """
    Wait, without blocking the reactor, until C{predicate()} is true: check
    it now, then every C{interval} seconds.  Use it only when there is no
    event to wait for (a process's socket or log line).

    @param reactor: An L{IReactorTime}.
    @param predicate: What to wait for.  An exception it raises fails the
        wait.
    @param timeout: Seconds to wait at most.
    @param what: Says what is awaited, for the timeout's message.
    @return: A L{Deferred} firing with L{None}, or failing with
        L{NetnsError} after C{timeout}.
    """
    from twisted.internet.defer import Deferred

    deadline = reactor.seconds() + timeout
    d: Deferred[None] = Deferred()

    def check() -> None:
        try:
            done = predicate()
        except BaseException:
            d.errback()
            return
        if done:
            d.callback(None)
        elif reactor.seconds() >= deadline:
            d.errback(NetnsError(f"timed out after {timeout:g}s waiting for {what}"))
        else:
            reactor.callLater(interval, check)

    check()
    return d


def main(
    argv: Sequence[str] | None = None, out: IO[str] | None = None, err: IO[str] | None = None
) -> int:
    """
    C{python -m miniproxy.testbed.netns --cleanup [PREFIX]}: delete
    left-over namespaces (see L{cleanupStale}) and print their names.

    @param argv: The arguments (default: C{sys.argv[1:]}).
    @param out: Where the names go (default: standard output).
    @param err: Where errors go (default: standard error).
    @return: The exit status.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "--cleanup" or len(args) > 2:
        err.write("usage: python -m miniproxy.testbed.netns --cleanup [PREFIX]\n")
        return 2
    prefix = args[1] if len(args) > 1 else None
    if prefix is not None and not prefix.startswith(NAME_START):
        err.write(f"refusing prefix {prefix!r}: it must start with {NAME_START!r}\n")
        return 2
    for name in cleanupStale(prefix):
        out.write(f"deleted {name}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
