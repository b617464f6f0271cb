# -*- test-case-name: tests.test_config -*-
"""
The service's configuration: a TOML file, the command line, and the
validated objects both turn into.

Every bad value raises L{ConfigError} with a message that names the key
and, for a file, the file.  See C{docs/configuration.md} for the reference.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping

from attrs import evolve, field, frozen

from miniproxy import accesslog
from miniproxy.address import NextHop
from miniproxy.errors import ConfigError
from miniproxy.flow import ConnectMode
from miniproxy.limits import Limits
from miniproxy.listener import ListenerSettings

#: The listener used when none is configured: loopback only.
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"

#: Endpoint kinds whose flows are intercepted (transparent).
TRANSPARENT_KINDS = ("tproxy",)

_LIMIT_KEYS: dict[str, tuple[str, type]] = {
    "max-buffer": ("maxBuffer", int),
    "connect-timeout": ("connectTimeout", float),
    "idle-timeout": ("idleTimeout", float),
    "max-flows": ("maxFlows", int),
    "max-flows-per-source": ("maxFlowsPerSource", int),
    "listen-backlog": ("listenBacklog", int),
    "max-pending-syns": ("maxPendingSyns", int),
    "max-pending-syns-per-source": ("maxPendingSynsPerSource", int),
    "syn-timeout": ("synTimeout", float),
    "splice": ("splice", bool),
    "splice-after": ("spliceAfter", int),
}

_TOP_KEYS = {
    "listen",
    "to",
    "mode",
    "functions",
    "limits",
    "listeners",
    "function",
    "workers",
    "stats-interval",
    "control",
    "log",
}
_LISTENER_KEYS = {
    "endpoint",
    "functions",
    "to",
    "mode",
    "transparent",
    "syn-tap",
    "syn-ports",
    "explicit",
    "trusted",
    "fast-open",
}

#: The carriers of an explicit destination a listener can read: the flow
#: address TCP option in the SYN, and a PROXY protocol v2 header at the
#: start of the stream (see L{miniproxy.carriers}).
EXPLICIT_CARRIERS = ("tcp-option", "proxy-v2")


@frozen
class ServiceConfig:
    """
    Everything a miniproxy service runs with.

    @ivar listeners: The listeners.
    @ivar functions: The enabled functions, in order, with their settings.
    @ivar limits: The bounds (per worker, with several workers).
    @ivar workers: How many worker processes share the listeners; 1 runs
        the service in the twistd process itself (see
        L{miniproxy.workers}).
    @ivar statsInterval: With workers, seconds between two reports of the
        group's memory, CPU time and flows (0: only on SIGUSR1).
    @ivar control: The control socket's C{unix:} endpoint, or L{None} for
        none (see L{miniproxy.control}).
    @ivar mode: The top-level connect mode: the default of a listener
        added at run time.
    @ivar to: The top-level next hop: the default of a listener added at
        run time.
    @ivar accessLog: Where the access log goes: C{"service"} (the
        service's log), C{"off"}, or a file's path (see
        L{miniproxy.accesslog.accessLogFor}).
    @ivar accessLogBuffer: For a file: bytes of lines kept before a write.
    @ivar accessLogFlush: For a file: the most seconds a line waits.
    """

    listeners: tuple[ListenerSettings, ...]
    functions: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    limits: Limits = field(factory=Limits)
    workers: int = 1
    statsInterval: float = 60.0
    control: str | None = None
    mode: ConnectMode = ConnectMode.EARLY
    to: NextHop | None = None
    accessLog: str = accesslog.SERVICE
    accessLogBuffer: int = accesslog.BUFFER_SIZE
    accessLogFlush: float = accesslog.FLUSH_INTERVAL


def parseControl(value: object, key: str = "control.listen") -> str:
    """
    Parse the control socket's endpoint: a C{unix:} server endpoint
    string only (no remote control plane).
    """
    from miniproxy.ctl import socketPath

    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a unix: endpoint string, not {value!r}")
    try:
        socketPath(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    return value


def parseLog(table: object, accessLog: str | None = None,
             key: str = "log") -> tuple[str, int, float]:
    """
    Parse the C{[log]} table, with C{--access-log} on top.

    @return: The access log's destination, buffer size and flush interval
        (see L{ServiceConfig}).
    """
    keys = {"access", "access-buffer", "access-flush"}
    if not isinstance(table, dict) or set(table) - keys:
        raise ConfigError(
            f"{key}: must be a table of {', '.join(sorted(keys))}, not {table!r}"
        )
    destination = accessLog if accessLog is not None else table.get("access", accesslog.SERVICE)
    where = "access-log" if accessLog is not None else f"{key}.access"
    if not isinstance(destination, str) or not destination:
        raise ConfigError(
            f"{where}: must be \"service\", \"off\" or a file's path, not {destination!r}"
        )
    buffer = parseNumber(
        table.get("access-buffer", accesslog.BUFFER_SIZE), f"{key}.access-buffer", int
    )
    flush = parseNumber(
        table.get("access-flush", accesslog.FLUSH_INTERVAL), f"{key}.access-flush", float
    )
    if buffer < 0 or flush < 0:
        raise ConfigError(f"{key}: access-buffer and access-flush must not be negative")
    return destination, buffer, flush


def parseMode(value: object, key: str = "mode") -> ConnectMode:
    """
    Parse a connect mode name.
    """
    try:
        return ConnectMode(value)
    except ValueError:
        names = ", ".join(m.value for m in ConnectMode)
        raise ConfigError(f"{key}: must be one of {names}, not {value!r}") from None


def parseNextHop(value: object, key: str = "to") -> NextHop:
    """
    Parse a next hop given as an endpoint string.
    """
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be an endpoint string, not {value!r}")
    try:
        return NextHop.fromString(value)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def parseLimits(table: object, key: str = "limits", base: Limits | None = None) -> Limits:
    """
    Parse the C{[limits]} table over C{base}.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: must be a table, not {table!r}")
    changes: dict[str, Any] = {}
    for name, value in table.items():
        if name not in _LIMIT_KEYS:
            known = ", ".join(sorted(_LIMIT_KEYS))
            raise ConfigError(f"{key}.{name}: unknown limit (known: {known})")
        attr, kind = _LIMIT_KEYS[name]
        if kind is bool:
            changes[attr] = parseSwitch(value, f"{key}.{name}")
        else:
            changes[attr] = parseNumber(value, f"{key}.{name}", kind)
    return evolve(base or Limits(), **changes)


def parseSwitch(value: object, key: str) -> bool:
    """
    Parse an on/off setting: a boolean, or the string C{"true"} or
    C{"false"} (as the command line gives it).
    """
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise ConfigError(f"{key}: must be true or false, not {value!r}")


def parseNumber(value: object, key: str, kind: type) -> Any:
    """
    Parse a non-negative number (C{int} or C{float}), also from a string.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: must be a number, not {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: must be a number, not {value!r}") from None
    if kind is int and isinstance(value, float) and value != int(value):
        raise ConfigError(f"{key}: must be a whole number, not {value!r}")
    if number < 0:
        raise ConfigError(f"{key}: must not be negative, not {value!r}")
    if key.endswith("max-buffer") and number < 4096:
        raise ConfigError(f"{key}: must be at least 4096 bytes, not {value!r}")
    return number


def isTransparentEndpoint(description: str) -> bool:
    """
    Whether an endpoint description is of a transparent (intercepting) kind.
    """
    return description.split(":", 1)[0] in TRANSPARENT_KINDS


def _functionNames(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: must be a list of function names, not {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}: a function is listed twice: {value!r}")
    return tuple(value)


def buildConfig(
    document: Mapping[str, Any],
    listen: list[str] | None = None,
    to: str | None = None,
    mode: str | None = None,
    functions: list[str] | None = None,
    limits: Mapping[str, Any] | None = None,
    workers: object = None,
    statsInterval: object = None,
    control: str | None = None,
    accessLog: str | None = None,
) -> ServiceConfig:
    """
    Validate a parsed config document, with command-line values on top.

    Command-line values override the file's top-level values; C{--listen}
    replaces the file's listeners; C{--function} adds to the file's
    functions; C{--control} replaces the file's C{[control] listen};
    C{--access-log} replaces its C{[log] access}.

    @raise ConfigError: Naming the bad key (without the file; see
        L{loadConfig}).
    """
    unknown = set(document) - _TOP_KEYS
    if unknown:
        raise ConfigError(
            f"{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(_TOP_KEYS))})"
        )
    defaultMode = parseMode(mode if mode is not None else document.get("mode", "early"),
                            "mode")
    toValue = to if to is not None else document.get("to")
    defaultTo = parseNextHop(toValue, "to") if toValue is not None else None

    limitsValue = parseLimits(document.get("limits", {}))
    if limits:
        limitsValue = parseLimits(dict(limits), "limits", limitsValue)

    names = list(_functionNames(document.get("functions", []), "functions"))
    for name in functions or []:
        if name not in names:
            names.append(name)
    settingsTable = document.get("function", {})
    if not isinstance(settingsTable, dict):
        raise ConfigError(f"function: must be a table of tables, not {settingsTable!r}")
    for name, table in settingsTable.items():
        if not isinstance(table, dict):
            raise ConfigError(f"function.{name}: must be a table, not {table!r}")
        if name not in names:
            raise ConfigError(
                f"function.{name}: settings for a function that is not enabled "
                f"(add it to 'functions')"
            )
    enabled = tuple((name, settingsTable.get(name, {})) for name in names)
    controlTable = document.get("control", {})
    if not isinstance(controlTable, dict) or set(controlTable) - {"listen"}:
        raise ConfigError(f"control: must be a table with one key, listen, not {controlTable!r}")
    if control is not None:
        controlValue: str | None = parseControl(control, "control")
    elif "listen" in controlTable:
        controlValue = parseControl(controlTable["listen"])
    else:
        controlValue = None

    access, accessBuffer, accessFlush = parseLog(document.get("log", {}), accessLog)

    listeners: list[ListenerSettings] = []
    if listen:
        for i, description in enumerate(listen):
            listeners.append(
                _listener({"endpoint": description}, f"listen[{i}]", defaultMode, defaultTo,
                          names)
            )
    else:
        tables = document.get("listeners")
        plain = document.get("listen")
        if tables is not None and plain is not None:
            raise ConfigError("listen: give either 'listen' or [[listeners]], not both")
        if plain is not None:
            if isinstance(plain, str):
                plain = [plain]
            if not isinstance(plain, list):
                raise ConfigError(f"listen: must be a list of endpoint strings, not {plain!r}")
            tables = [{"endpoint": p} for p in plain]
            prefix = "listen"
        else:
            prefix = "listeners"
        if tables is None:
            tables = [{"endpoint": DEFAULT_LISTEN}]
        if not isinstance(tables, list) or not tables:
            raise ConfigError(f"{prefix}: must be a non-empty list")
        for i, table in enumerate(tables):
            listeners.append(
                _listener(table, f"{prefix}[{i}]", defaultMode, defaultTo, names)
            )
    workersValue = parseNumber(
        workers if workers is not None else document.get("workers", 1), "workers", int
    )
    if workersValue < 1:
        raise ConfigError(f"workers: must be at least 1, not {workersValue!r}")
    if controlValue is not None and workersValue > 1:
        raise ConfigError("control: not available with workers (each worker is a process)")
    interval = parseNumber(
        statsInterval if statsInterval is not None else document.get("stats-interval", 60),
        "stats-interval",
        float,
    )
    return ServiceConfig(
        listeners=tuple(listeners),
        functions=enabled,
        limits=limitsValue,
        workers=workersValue,
        statsInterval=interval,
        control=controlValue,
        mode=defaultMode,
        to=defaultTo,
        accessLog=access,
        accessLogBuffer=accessBuffer,
        accessLogFlush=accessFlush,
    )


def parseListener(table: object, config: ServiceConfig, key: str = "listener") -> ListenerSettings:
    """
    Validate one listener table (the keys of a C{[[listeners]]} table) for
    a running service with C{config}: its top-level C{mode} and C{to} are
    the defaults, and its C{functions} must be among the enabled ones.

    @raise ConfigError: Naming the bad key under C{key}.
    """
    names = [name for name, _ in config.functions]
    return _listener(table, key, config.mode, config.to, names)


def _listener(
    table: object,
    key: str,
    defaultMode: ConnectMode,
    defaultTo: NextHop | None,
    enabled: list[str],
) -> ListenerSettings:
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: must be a table, not {table!r}")
    unknown = set(table) - _LISTENER_KEYS
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown key")
    endpoint = table.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise ConfigError(f"{key}.endpoint: must be an endpoint string, not {endpoint!r}")
    mode = parseMode(table["mode"], f"{key}.mode") if "mode" in table else defaultMode
    to = parseNextHop(table["to"], f"{key}.to") if "to" in table else defaultTo
    transparent = table.get("transparent", isTransparentEndpoint(endpoint))
    if not isinstance(transparent, bool):
        raise ConfigError(f"{key}.transparent: must be true or false, not {transparent!r}")
    if transparent and "to" in table:
        raise ConfigError(
            f"{key}.to: a transparent listener relays to each flow's original "
            f"destination; it takes no 'to'"
        )
    if transparent:
        to = None
    synTap = table.get("syn-tap", True)
    if not isinstance(synTap, bool):
        raise ConfigError(f"{key}.syn-tap: must be true or false, not {synTap!r}")
    synPorts = table.get("syn-ports", [])
    if not isinstance(synPorts, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in synPorts
    ):
        raise ConfigError(f"{key}.syn-ports: must be a list of ports, not {synPorts!r}")
    if synPorts and not transparent:
        raise ConfigError(
            f"{key}.syn-ports: only a transparent listener takes syn-ports; "
            f"others tap their own port"
        )
    explicit = table.get("explicit", [])
    if not isinstance(explicit, list) or any(c not in EXPLICIT_CARRIERS for c in explicit):
        raise ConfigError(
            f"{key}.explicit: must be a list of {', '.join(EXPLICIT_CARRIERS)}, "
            f"not {explicit!r}"
        )
    trustedValue = table.get("trusted", [])
    if not isinstance(trustedValue, list):
        raise ConfigError(f"{key}.trusted: must be a list of CIDRs, not {trustedValue!r}")
    trusted = []
    for i, cidr in enumerate(trustedValue):
        try:
            trusted.append(ipaddress.ip_network(cidr, strict=False))
        except (TypeError, ValueError):
            raise ConfigError(f"{key}.trusted[{i}]: bad CIDR {cidr!r}") from None
    if explicit and not trusted:
        raise ConfigError(
            f"{key}.trusted: a listener reading explicit destinations must say "
            f"which peers it trusts"
        )
    if explicit and transparent:
        raise ConfigError(f"{key}.explicit: a transparent listener takes no explicit carrier")
    fastOpen = table.get("fast-open", True)
    if not isinstance(fastOpen, bool):
        raise ConfigError(f"{key}.fast-open: must be true or false, not {fastOpen!r}")
    functionNames: tuple[str, ...] = ()
    if "functions" in table:
        functionNames = _functionNames(table["functions"], f"{key}.functions")
        if not functionNames:
            raise ConfigError(
                f"{key}.functions: must name at least one function (leave it out to "
                f"run every enabled function)"
            )
        for name in functionNames:
            if name not in enabled:
                raise ConfigError(
                    f"{key}.functions: {name!r} is not enabled "
                    f"(enabled: {', '.join(enabled) or 'none'})"
                )
    return ListenerSettings(
        functionNames=functionNames,
        fastOpen=fastOpen,
        endpoint=endpoint,
        mode=mode,
        to=to,
        transparent=transparent,
        synTap=synTap,
        synPorts=tuple(synPorts),
        explicit=tuple(explicit),
        trusted=tuple(trusted),
    )


def loadConfig(path: str, **overrides: Any) -> ServiceConfig:
    """
    Read and validate a TOML config file, with command-line C{overrides}
    (see L{buildConfig}).

    @raise ConfigError: With the file's name and the bad key.
    """
    # Imported here: a service started without a file does not load it.
    import tomllib

    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return buildConfig(document, **overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
