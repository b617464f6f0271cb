# -*- test-case-name: tests.test_tap -*-
"""
The C{twistd miniproxy} command: its options, and the service it makes.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from twisted.python import usage

from miniproxy.errors import ConfigError, FunctionError

if TYPE_CHECKING:
    from miniproxy.config import ServiceConfig


class Options(usage.Options):
    """
    The options of C{twistd miniproxy}.
    """

    synopsis = "[options]"
    longdesc = (
        "A split-TCP proxy with early SYN hooks and pluggable proxy functions. "
        "With no options it listens on 127.0.0.1:8080; give --to (or a config "
        "file) to say where flows go."
    )
    optParameters = [
        ["config", "c", None, "A TOML config file (see docs/configuration.md)."],
        ["to", "t", None, "Static next hop: tcp:host=H:port=P or tls:host=H:port=P."],
        ["mode", "m", None, "Connect mode: early (default), accept or first-data."],
        ["connect-timeout", None, None, "Seconds to connect the outgoing leg (10)."],
        ["idle-timeout", None, None, "Seconds without traffic before reset (300; 0: never)."],
        ["max-flows", None, None, "Flows open at once (10000)."],
        ["max-flows-per-source", None, None, "Flows open at once per client address (256)."],
        ["max-buffer", None, None, "Bytes buffered per flow and direction (262144)."],
        ["listen-backlog", None, None, "listen(2) backlog per listener (1024)."],
        ["workers", "w", None, "Worker processes sharing the listeners (1: none)."],
        ["stats-interval", None, None, "With workers: seconds between group reports (60)."],
        ["control", None, None,
         "Listen for control commands (miniproxy-ctl) on this UNIX socket: unix:PATH."],
        ["access-log", None, None,
         "Access log: service (the service's log, default), off, or a file's path."],
    ]
    optFlags = [
        ["list-functions", None, "List the installed proxy functions and exit."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["functions"] = []

    def opt_listen(self, description: str) -> None:
        """
        Listen on this server endpoint (repeatable); default
        tcp:8080:interface=127.0.0.1.
        """
        self["listen"].append(description)

    opt_l = opt_listen

    def opt_function(self, name: str) -> None:
        """
        Enable this proxy function (repeatable; they run in this order).
        """
        self["functions"].append(name)

    opt_f = opt_function

    def postOptions(self) -> None:
        """
        List the functions, or build and validate the configuration.
        """
        # Imported here: the configuration's modules import Twisted's TCP
        # transports, which C{python -m miniproxy} imports only once it
        # knows whether TLS is configured (see L{miniproxy.run}).
        from miniproxy.config import buildConfig, loadConfig

        if self["list-functions"]:
            sys.stdout.write(listFunctions())
            raise SystemExit(0)
        limits = {}
        for name in (
            "connect-timeout",
            "idle-timeout",
            "max-flows",
            "max-flows-per-source",
            "max-buffer",
            "listen-backlog",
        ):
            if self[name] is not None:
                limits[name] = self[name]
        overrides: dict[str, Any] = dict(
            listen=self["listen"] or None,
            to=self["to"],
            mode=self["mode"],
            functions=self["functions"],
            limits=limits,
            workers=self["workers"],
            statsInterval=self["stats-interval"],
            control=self["control"],
            accessLog=self["access-log"],
        )
        try:
            if self["config"]:
                self.config = loadConfig(self["config"], **overrides)
            else:
                self.config = buildConfig({}, **overrides)
        except ConfigError as e:
            raise usage.UsageError(str(e))


def listFunctions() -> str:
    """
    The installed proxy functions, one per line with its description.
    """
    from miniproxy.functions.discovery import getFunctions

    try:
        functions = getFunctions()
    except FunctionError as e:
        return f"error: {e}\n"
    if not functions:
        return "no proxy functions installed\n"
    width = max(len(name) for name in functions)
    return "".join(
        f"{name:<{width}}  {functions[name].description}\n" for name in sorted(functions)
    )


def makeService(options: Options, reactor: Any = None) -> Any:
    """
    Make the miniproxy service from parsed options.

    @raise ConfigError: If a function is not installed or is badly
        configured.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    config: ServiceConfig = options.config
    if config.workers > 1:
        return _workerGroup(options, config, reactor)
    from miniproxy.service import ProxyService

    try:
        # The process runs this service alone: tune its garbage collector.
        service = ProxyService(config, reactor, tuneGC=True)
        if config.control is not None:
            # Imported only with a control socket: the lean start-up
            # does not pay for it otherwise.
            from miniproxy.control import ControlServer

            ControlServer(service, config.control, reactor).setServiceParent(service)
        return service
    except ConfigError as e:
        # twistd prints this and exits 1, instead of a traceback.
        raise SystemExit(f"miniproxy: configuration error: {_blame(options, str(e))}")


def _workerGroup(options: Options, config: ServiceConfig, reactor: Any) -> Any:
    """
    The parent of a worker group.  The functions are configured here once,
    so that a bad configuration stops twistd instead of every worker.
    """
    from miniproxy.service import configureFunctions
    from miniproxy.workers import WorkerGroup

    try:
        configureFunctions(config, reactor)
        return WorkerGroup(
            config, reactor, config.workers, statsInterval=config.statsInterval
        )
    except ConfigError as e:
        raise SystemExit(f"miniproxy: configuration error: {_blame(options, str(e))}")


def _blame(options: Options, message: str) -> str:
    """
    Name the config file in C{message} about a function's configuration,
    unless the function was enabled on the command line (C{--function}).
    """
    path = options["config"]
    if not path:
        return message
    for name in options["functions"]:
        if f"function.{name}." in message or f"named {name!r}" in message:
            return message
    return f"{path}: {message}"
