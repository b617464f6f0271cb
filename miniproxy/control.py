# -*- test-case-name: tests.test_control -*-
"""
The control socket of a running service: add, remove and list its
listeners (proxies made on the fly) from outside the process.

C{--control unix:PATH} (or C{[control] listen = "unix:PATH"}) makes the
service listen on a UNIX socket, created with mode 0600 (under a umask of
0177, so it is never more open, not even between its C{bind} and its
C{chmod}), with Twisted's lock file (C{PATH.lock}) so that a socket left
by a process that died is replaced, and removed when the service stops.
Every connection's peer is checked with C{SO_PEERCRED}: only root and the
service's own user may use it; anyone else gets one error line and the
connection is closed.

The protocol (see L{miniproxy.ctl}, its client) is newline-delimited JSON:
one request object per line, answered by one reply object per line, in
order.  A line longer than L{MAX_LINE} is answered with an error and the
connection is closed.  The commands:

  - C{{"command": "add", "listener": {...}, "name": "web"}}: start a
    listener whose settings are the keys of a C{[[listeners]]} table
    (checked by L{miniproxy.config.parseListener}, the configuration's
    own rules; the service's top-level C{mode} and C{to} are the
    defaults); the reply, once it listens: C{{"ok": true, "name": "web",
    "listening": ["127.0.0.1:9000"]}}.
  - C{{"command": "remove", "name": "web", "close-flows": false}}: stop it
    listening; its open flows run to their end (or are reset with
    C{close-flows}); the reply tells how many are left open.
  - C{{"command": "list"}}: every listener, configured or added, with its
    endpoint, addresses, mode and open flows.

The flows of an added listener are the service's like any other: the same
limits, flow table, functions and closed-relay rules.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from miniproxy.config import parseListener
from miniproxy.ctl import MAX_LINE, encode, socketPath
from miniproxy.errors import ConfigError

_log = Logger(namespace="miniproxy.control")

#: The mode of the control socket's file.
SOCKET_MODE = 0o600

#: A listener's name: what C{add} accepts.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

_PEERCRED = struct.Struct("3i")


def peerCredentials(transport: Any) -> tuple[int, int, int]:
    """
    The C{(pid, uid, gid)} of the process at the other end of a UNIX
    socket connection (C{SO_PEERCRED}).
    """
    raw = transport.getHandle().getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size
    )
    return _PEERCRED.unpack(raw)


def formatAddress(address: Any) -> str:
    """
    A listening address as people write it: C{host:port}, C{[v6]:port}, or
    a UNIX socket's path.
    """
    host = getattr(address, "host", None)
    if host is None:
        name = getattr(address, "name", address)
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


class RequestError(Exception):
    """
    A request the service refuses; its message is the reply's C{error}.
    """


def parseRequest(line: bytes) -> dict[str, Any]:
    """
    One request line as an object with a C{command}.

    @raise RequestError: If it is not a JSON object with a string
        C{command}.
    """
    if not line.strip():
        raise RequestError("malformed request: empty line")
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        raise RequestError("malformed request: not JSON") from None
    if not isinstance(message, dict):
        raise RequestError("malformed request: not a JSON object")
    command = message.get("command")
    if not isinstance(command, str):
        raise RequestError('malformed request: no "command"')
    return message


def _onlyKeys(message: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(message) - allowed - {"command"}
    if unknown:
        known = f"known: {', '.join(sorted(allowed))}" if allowed else "it takes no other key"
        raise RequestError(f"{message['command']}: unknown key {sorted(unknown)[0]!r} ({known})")


class ControlChannel:
    """
    The commands of the control socket, on one L{ProxyService}.

    @ivar service: The service whose listeners are controlled.
    """

    def __init__(self, service: Any) -> None:
        self.service = service

    def handle(self, line: bytes) -> Deferred:
        """
        Carry out one request line.

        @return: A L{Deferred} firing with the reply object (never failing).
        """
        try:
            message = parseRequest(line)
            handler = getattr(self, f"command_{message['command']}", None)
            if handler is None:
                raise RequestError(
                    f"unknown command {message['command']!r} (known: add, list, remove)"
                )
            result = maybeDeferred(handler, message)
        except RequestError as e:
            return succeed({"ok": False, "error": str(e)})

        def refused(failure: Failure) -> dict[str, Any]:
            if failure.check(RequestError, ConfigError):
                return {"ok": False, "error": str(failure.value)}
            if failure.check(CannotListenError):
                error = failure.value
                return {"ok": False, "error": f"cannot listen on {error.interface or ''}"
                        f":{error.port}: {error.socketError}"}
            _log.failure("control request {line!r} failed", failure, line=line[:200])
            return {"ok": False, "error": f"internal error: {failure.getErrorMessage()}"}

        return result.addErrback(refused)

    def command_add(self, message: dict[str, Any]) -> Deferred:
        """
        Start a listener; the reply once it listens.
        """
        _onlyKeys(message, {"listener", "name"})
        name = message.get("name")
        if name is not None and (not isinstance(name, str) or not NAME.match(name)):
            raise RequestError(
                f"add: name must be 1 to 64 letters, digits, '.', '_' or '-', not {name!r}"
            )
        if "listener" not in message:
            raise RequestError('add: no "listener" (the keys of a [[listeners]] table)')
        settings = parseListener(message["listener"], self.service.config)
        listeners = self.service.listeners
        count = len(listeners)
        listening = self.service.addListener(settings, name=name)
        # A listener that could not listen is forgotten at once: then
        # there is no new one, and the reply is the failure's.
        service = listeners[count] if len(listeners) > count else None

        def added(port: Any) -> dict[str, Any]:
            _log.info("control: added listener {name} on {endpoint}",
                      name=service.name, endpoint=settings.endpoint)
            return {"ok": True, "name": service.name,
                    "listening": [formatAddress(port.getHost())]}

        return listening.addCallback(added)

    def command_remove(self, message: dict[str, Any]) -> Deferred:
        """
        Stop a listener; the reply once it no longer listens.
        """
        _onlyKeys(message, {"name", "close-flows"})
        name = message.get("name")
        closeFlows = message.get("close-flows", False)
        if not isinstance(closeFlows, bool):
            raise RequestError(f"remove: close-flows must be true or false, not {closeFlows!r}")
        try:
            removed = self.service.removeListener(name, closeFlows=closeFlows)
        except (KeyError, TypeError):
            raise RequestError(f"remove: no listener named {name!r}") from None

        def done(flows: int) -> dict[str, Any]:
            _log.info("control: removed listener {name} ({flows} flows left open)",
                      name=name, flows=flows)
            return {"ok": True, "name": name, "flows": flows}

        return removed.addCallback(done)

    def command_list(self, message: dict[str, Any]) -> dict[str, Any]:
        """
        Every listener, with its addresses and open flows.
        """
        _onlyKeys(message, set())
        counts: dict[int, int] = {}
        for flow in self.service.table.flows:
            key = id(flow._context)
            counts[key] = counts.get(key, 0) + 1
        listeners = []
        for service in self.service.listeners:
            context = service.listenerContext
            settings = context.settings
            listening: list[str] = []
            waiting = service._waitingForPort
            if waiting is not None and waiting.called and not isinstance(waiting.result, Failure):
                if waiting.result is not None:
                    listening.append(formatAddress(waiting.result.getHost()))
            listeners.append({
                "name": service.name,
                "endpoint": settings.endpoint,
                "listening": listening,
                "mode": settings.mode.value,
                "to": str(settings.to) if settings.to is not None else None,
                "functions": [name for name, _ in context.functions],
                "flows": counts.get(id(context), 0),
            })
        return {"ok": True, "listeners": listeners}


@implementer(IHalfCloseableProtocol)
class ControlProtocol(Protocol):
    """
    One connection to the control socket: lines in, replies out, one
    request at a time.  A client that shuts down its side after its
    requests (C{printf ... | socat - UNIX-CONNECT:PATH}) still gets every
    reply before the connection closes.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._busy = False
        self._closing = False
        self._ended = False

    def connectionMade(self) -> None:
        """
        Check the peer's credentials: one that may not use the socket gets
        one error line and the close.
        """
        refusal = self.factory.refusal(self.transport)
        if refusal is not None:
            self._close(refusal)

    def dataReceived(self, data: bytes) -> None:
        """
        Take request bytes; each whole line is one request, answered in
        order.
        """
        if self._closing:
            return
        self._buffer += data
        self._next()

    def _next(self) -> None:
        while not self._busy and not self._closing:
            line, found, rest = self._buffer.partition(b"\n")
            if not found:
                if len(self._buffer) > MAX_LINE:
                    self._close(f"request longer than {MAX_LINE} bytes")
                elif self._ended:
                    # A last request without its newline is one too.
                    self._buffer = line + b"\n" if line.strip() else b""
                    if not self._buffer:
                        self._closing = True
                        self.transport.loseConnection()
                        return
                    continue
                return
            if len(line) > MAX_LINE:
                self._close(f"request longer than {MAX_LINE} bytes")
                return
            self._buffer = rest
            self._busy = True
            self.factory.channel.handle(line.rstrip(b"\r")).addCallback(self._reply)

    def _reply(self, reply: dict[str, Any]) -> None:
        self._busy = False
        if self._closing:
            return
        self.transport.write(encode(reply))
        self._next()

    def _close(self, error: str) -> None:
        self._closing = True
        self._buffer = b""
        self.transport.write(encode({"ok": False, "error": error}))
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        """
        The client sent its last request: answer what is left, then close.
        """
        self._ended = True
        self._next()

    def writeConnectionLost(self) -> None:
        """
        Nothing to do: the client reads no more replies.
        """

    def connectionLost(self, reason: Failure) -> None:
        """
        Forget the connection; a reply still being made is dropped.
        """
        self._closing = True
        self._buffer = b""
        self.factory.connections.discard(self)


class ControlFactory(Factory):
    """
    Makes the control socket's connections, and tells which peers may use
    it.

    @ivar channel: The commands.
    @ivar allowedUids: The users who may: root and the service's own.
    @ivar credentials: How a connection's peer is found
        (L{peerCredentials}).
    @ivar connections: The open connections.
    """

    protocol = ControlProtocol
    noisy = False
    credentials: Callable[[Any], tuple[int, int, int]] = staticmethod(peerCredentials)

    def __init__(self, channel: ControlChannel, allowedUids: frozenset[int] | None = None) -> None:
        self.channel = channel
        self.allowedUids = (
            allowedUids if allowedUids is not None else frozenset({0, os.getuid()})
        )
        self.connections: set[ControlProtocol] = set()

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        """
        A protocol for one control connection, kept until it is lost.
        """
        protocol = super().buildProtocol(addr)
        self.connections.add(protocol)
        return protocol

    def refusal(self, transport: Any) -> str | None:
        """
        Why the peer of C{transport} may not use the control socket, or
        L{None} if it may.
        """
        try:
            pid, uid, gid = self.credentials(transport)
        except (OSError, AttributeError, struct.error) as e:
            return f"permission denied: cannot tell who is connecting ({e})"
        if uid not in self.allowedUids:
            _log.warn("control: refused uid {uid} (pid {pid})", uid=uid, pid=pid)
            return f"permission denied: uid {uid} may not use this control socket"
        return None


class ControlServer(Service):
    """
    The control socket of a L{ProxyService}: a child service that listens
    while the service runs.

    @ivar path: The socket's file.
    @ivar factory: Its L{ControlFactory}.
    @ivar port: The listening port, while it listens.
    """

    port: Any = None

    def __init__(self, proxy: Any, description: str, reactor: Any) -> None:
        """
        @param proxy: The L{ProxyService} to control.
        @param description: C{unix:PATH}.
        @raise ConfigError: If C{description} is not a C{unix:} endpoint.
        """
        try:
            self.path = socketPath(description)
        except ValueError as e:
            raise ConfigError(f"control: {e}") from None
        self.reactor = reactor
        self.factory = ControlFactory(ControlChannel(proxy))

    def privilegedStartService(self) -> None:
        """
        Listen on the socket (before twistd drops privileges).

        @raise CannotListenError: If it cannot.
        """
        super().privilegedStartService()
        if self.port is not None:
            return
        old = os.umask(0o177)
        try:
            self.port = self.reactor.listenUNIX(
                self.path, self.factory, mode=SOCKET_MODE, wantPID=True
            )
        finally:
            os.umask(old)
        _log.info("miniproxy control socket on {path}", path=self.path)

    def startService(self) -> None:
        """
        Listen on the control socket, if L{privilegedStartService} has not
        already.
        """
        super().startService()
        self.privilegedStartService()

    def stopService(self) -> Deferred:
        """
        Stop listening (the socket file and its lock go) and close the
        connections.
        """
        super().stopService()
        for protocol in list(self.factory.connections):
            protocol.transport.loseConnection()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)
