# -*- test-case-name: tests.test_run -*-
"""
C{python -m miniproxy} (and the C{miniproxy} command): the service of
C{twistd miniproxy}, with the same options, run in the foreground without
twistd, started as fast as Python and Twisted allow.

What it does, in order:

 1. It reads the options once with C{twistd miniproxy}'s own
    L{miniproxy.tap.Options} but nothing else (L{peekOptions}), and the
    config file, if any, with C{tomllib}: that is enough to tell whether
    anything configured needs TLS (L{needsTLS}).
 2. It parses the options for real (building and checking the
    configuration) and installs the epoll reactor.  When nothing needs
    TLS, both happen with C{OpenSSL} refused (L{ImportBlocker}): Twisted's
    TCP transports and its reactor then come up without pyOpenSSL,
    C{cryptography}, C{service_identity} and Twisted's TLS modules, about a
    third of the reactor's import time.
 3. It sets up the log (standard error, or C{--logfile}), makes the
    service, binds its listeners, then starts the reactor, which installs
    its signal handlers; once it runs, the listeners accept.  C{SIGTERM}
    and C{SIGINT} stop the service (its listeners, then the open flows)
    and the process exits with status 0.

Nothing that the first flow does not need is imported before the
listeners are up: the function discovery (the plugin scan) runs only when
functions are configured, and Twisted's endpoint parser only for a listen
endpoint that is not plain TCP.  The standard library's C{http.cookiejar}
(with C{urllib.request}, C{http.client}, C{email} and C{ssl}), which
C{twisted.python.compat} imports for Python 2 names only, is made lazy
(L{deferImports}): it is loaded on first use, if ever.

The trade-off of step 2: a reactor imported without pyOpenSSL lacks its
built-in TLS, which Twisted sets up at import time.  Its C{listenSSL} and
C{connectSSL} are given that support back lazily (L{allowLaterTLS}): the
first use imports it (or fails with pyOpenSSL's C{ImportError}, if it is
not installed).  Its TCP transports do not provide C{ITLSTransport}, so
C{startTLS} on a TCP connection is not available; miniproxy does not use
it (its TLS next hops wrap the TCP connection in Twisted's TLS protocol,
and a C{ssl:} listener goes through C{listenSSL}), but a third-party
function that did would have to be run with C{twistd miniproxy}, or with
TLS configured.  With anything TLS configured, nothing is refused and
the TLS modules are imported before the listeners are up, so that the
first flow does not pay for them.

Options or a config file that do not parse exit with status 2; a
function that is not installed or badly configured, and a listener that
cannot listen, with status 1; each with one line on standard error.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import IO, Any, Iterable, Sequence

#: The program name in messages.
PROGRAM = "miniproxy"

#: Listen endpoint kinds that never need TLS.
PLAIN_LISTEN_KINDS = frozenset({"tcp", "tcp6", "unix", "tproxy", "systemd"})

#: Endpoint kinds that speak TLS.
TLS_KINDS = frozenset({"tls", "ssl"})

#: The top-level packages refused while the reactor is imported with no
#: TLS configured.
TLS_PACKAGES = ("OpenSSL",)

#: Standard library modules that Twisted imports at start-up but a
#: running proxy never uses; loaded on first use instead.
LAZY_MODULES = ("http.cookiejar",)


class ImportBlocker:
    """
    A meta path finder that refuses to import some top-level packages
    while it is installed (as a context manager).  A refused import raises
    L{ImportError}, as if the package were not installed: Twisted's modules
    that have an optional dependency on it take their fallback.

    @ivar names: The refused top-level package names.
    @ivar refused: Every module name refused so far.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)
        self.refused: list[str] = []

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        """
        Refuse C{name} if it is one of L{names} or in one of them; leave
        any other module to the next finder.

        @raise ImportError: For a refused module.
        """
        if name.partition(".")[0] in self.names:
            self.refused.append(name)
            raise ImportError(f"{name} is not imported at start-up (no TLS configured)",
                              name=name)
        return None

    def __enter__(self) -> "ImportBlocker":
        if self.names:
            sys.meta_path.insert(0, self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def deferImports(names: Iterable[str] = LAZY_MODULES) -> list[str]:
    """
    Make each module of C{names} that is not imported yet a lazy module
    (L{importlib.util.LazyLoader}): C{from package import module} binds
    it, and only its first attribute access loads it.  (On Python 3.11 a
    plain C{import package.module} loads it at once: the import system
    looks at its C{__spec__}.)

    @return: The names made lazy.
    """
    made = []
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            continue
        spec.loader = importlib.util.LazyLoader(spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
        made.append(name)
    return made


class _OnFirstUse:
    """
    A stand-in for a module, imported on its first attribute access.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<{self._name}, imported on first use>"


def allowLaterTLS() -> bool:
    """
    Give a reactor imported without pyOpenSSL its C{listenSSL} and
    C{connectSSL} back: Twisted's TLS modules are imported on their first
    use.

    @return: Whether anything was missing.
    """
    from twisted.internet import posixbase

    missing = False
    if posixbase.tls is None:
        posixbase.tls = _OnFirstUse("twisted.protocols.tls")
        missing = True
    if posixbase.ssl is None:
        posixbase.ssl = _OnFirstUse("twisted.internet.ssl")
        missing = True
    return missing


def _kind(description: str) -> str:
    return description.split(":", 1)[0].strip().lower()


def _listenNeedsTLS(descriptions: Iterable[str]) -> bool:
    return any(_kind(d) not in PLAIN_LISTEN_KINDS for d in descriptions)


def _strings(value: object) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def configNeedsTLS(path: str) -> bool:
    """
    Whether the config file at C{path} may need TLS: any string in it that
    is a C{tls:} or C{ssl:} endpoint (a next hop, a listener, or in a
    function's settings), or a listen endpoint that is not plain.  A file
    that cannot be read or parsed counts as needing it (its error is
    reported by the real parse).
    """
    import tomllib

    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except (OSError, ValueError):
        return True
    if any(_kind(s) in TLS_KINDS for s in _strings(document)):
        return True
    listen = document.get("listen", [])
    endpoints = [listen] if isinstance(listen, str) else list(_strings(listen))
    for listener in document.get("listeners", []) or []:
        if isinstance(listener, dict) and isinstance(listener.get("endpoint"), str):
            endpoints.append(listener["endpoint"])
    return _listenNeedsTLS(endpoints)


def needsTLS(options: Any) -> bool:
    """
    Whether anything configured by C{options} (peeked, see
    L{peekOptions}) may need TLS: a C{tls:} next hop, a listen endpoint
    that is not plain, a config file that may (L{configNeedsTLS}), or
    C{--list-functions} (whose plugins may import it).  L{None} (options
    that do not parse) counts as needing it.
    """
    if options is None or options["list-functions"]:
        return True
    if options["to"] and _kind(options["to"]) in TLS_KINDS:
        return True
    if _listenNeedsTLS(options["listen"]):
        return True
    return bool(options["config"]) and configNeedsTLS(options["config"])


def _runOptions() -> type:
    from miniproxy.tap import Options

    class RunOptions(Options):
        """
        The options of C{python -m miniproxy}: those of C{twistd miniproxy},
        and where the log goes.
        """

        synopsis = f"Usage: {PROGRAM} [options]"
        optParameters = [
            ["logfile", None, None, "Write the log to this file instead of standard error."],
        ]

    return RunOptions


def peekOptions(argv: Sequence[str]) -> Any:
    """
    Read C{argv} with the options of C{python -m miniproxy}, without
    acting on any (no help, no configuration built).

    @return: The options, or L{None} if they do not parse.
    """
    from twisted.python import usage

    class Peek(_runOptions()):  # type: ignore[misc]
        def opt_help(self) -> None:
            pass

        def opt_version(self) -> None:
            pass

        def postOptions(self) -> None:
            pass

    peek = Peek()
    try:
        peek.parseOptions(list(argv))
    except usage.UsageError:
        return None
    return peek


def installReactor() -> Any:
    """
    Install the epoll reactor (unless a reactor is installed already).

    @return: The reactor.
    """
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import epollreactor

        epollreactor.install()
    from twisted.internet import reactor

    return reactor


def importTLS() -> None:
    """
    Import what a TLS next hop or listener needs, so that the first flow
    does not wait for it.
    """
    from twisted.internet import endpoints, ssl  # noqa: F401


def beginLogging(stream: IO[str]) -> None:
    """
    Send the log to C{stream} in twistd's text format; the events logged
    so far are written first.
    """
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(stream)], redirectStandardIO=False)


def main(argv: Sequence[str] | None = None, stderr: IO[str] | None = None) -> int:
    """
    Run miniproxy in the foreground until C{SIGTERM} or C{SIGINT}.

    @param argv: The options (default: the command line's).
    @param stderr: Where errors and, without C{--logfile}, the log go.
    @return: The exit status: 0 once stopped, 1 on a configuration error
        or a listener that cannot listen, 2 on bad options.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    stderr = sys.stderr if stderr is None else stderr
    deferImports()
    from twisted.python import usage

    tls = needsTLS(peekOptions(argv))
    options = _runOptions()()
    try:
        with ImportBlocker(() if tls else TLS_PACKAGES):
            try:
                options.parseOptions(argv)
            except usage.UsageError as e:
                stderr.write(f"{PROGRAM}: {e} (see --help)\n")
                return 2
            reactor = installReactor()
        if tls:
            importTLS()
        else:
            allowLaterTLS()
        try:
            log = open(options["logfile"], "a", encoding="utf-8") if options["logfile"] else stderr
        except OSError as e:
            raise SystemExit(f"{PROGRAM}: cannot open the log file: {e}") from None
        # Before the service is made, so that what it logs on a failed
        # start is not lost (it costs well under a millisecond).
        beginLogging(log)
        from miniproxy.tap import makeService

        service = makeService(options, reactor)
        # Bind now: a listener that cannot listen ends the process here.
        service.privilegedStartService()
    except SystemExit as e:
        if isinstance(e.code, str):
            stderr.write(f"{e.code}\n")
            return 1
        return e.code if isinstance(e.code, int) else 0

    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0
