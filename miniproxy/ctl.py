# -*- test-case-name: tests.test_control -*-
"""
C{python -m miniproxy.ctl} (and the C{miniproxy-ctl} command): add, remove
and list the listeners of a running miniproxy through its control socket
(C{--control unix:PATH}, see L{miniproxy.control}).

The control protocol is newline-delimited JSON over a UNIX socket: one
request object per line, one reply object per line, so that
C{socat - UNIX-CONNECT:PATH} is a client too::

    {"command": "add", "name": "web", "listener": {"endpoint": "tcp:9000:interface=127.0.0.1",
     "to": "tcp:host=127.0.0.1:port=8000"}}
    {"ok": true, "name": "web", "listening": ["127.0.0.1:9000"]}
    {"command": "list"}
    {"ok": true, "listeners": [{"name": "web", ...}]}
    {"command": "remove", "name": "web"}
    {"ok": true, "name": "web", "flows": 0}

A refused request is answered C{{"ok": false, "error": "..."}}.

This module is the client side and what both sides share; it imports the
standard library only, so that the command starts in the time of a bare
interpreter (no Twisted).  Exit status: 0 when the service did it, 1 when
the service refused it (the error is printed), 2 on bad options or when
the service cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import IO, Any, Sequence

#: The longest request or reply line, in bytes (without its newline): a
#: longer request closes the connection after an error reply.
MAX_LINE = 64 * 1024

#: The environment variable that names the control socket when
#: C{--socket} is not given.
SOCKET_ENVIRONMENT = "MINIPROXY_CONTROL"

#: The program name in messages.
PROGRAM = "miniproxy-ctl"


class ControlError(Exception):
    """
    The control socket could not be reached, or did not answer a line of
    JSON.
    """


#: The longest path a UNIX socket's address holds (Linux's C{sun_path},
#: without its terminating NUL).
MAX_SOCKET_PATH = 107


def socketPath(description: str) -> str:
    """
    The file of a control socket endpoint: C{unix:PATH} or
    C{unix:address=PATH} (Twisted's server endpoint syntax, path only: the
    control socket's mode and lock file are fixed).

    @raise ValueError: For anything else (a TCP endpoint included: the
        control socket is never on the network), and for a path longer
        than a UNIX socket's address can hold.
    """
    kind, _, rest = description.partition(":")
    if kind != "unix":
        raise ValueError(
            f"must be a UNIX socket (unix:/path/to/socket), not {description!r}: "
            f"the control socket is never on the network"
        )
    if rest.startswith("address="):
        rest = rest[len("address="):]
    path = rest.replace("\\:", "\0")
    if not path or ":" in path:
        raise ValueError(
            f"must be unix:/path/to/socket with no other parameter, not {description!r}"
        )
    path = path.replace("\0", ":")
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ValueError(
            f"the socket's path is too long for a UNIX socket ({size} bytes, at most "
            f"{MAX_SOCKET_PATH}): {path!r}"
        )
    return path


def encode(message: dict[str, Any]) -> bytes:
    """
    One protocol line: C{message} as compact JSON and a newline.
    """
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


#: How often L{request} tries again to reach a service that is not
#: listening yet, in seconds.
RETRY_INTERVAL = 0.05

# How the client waits between two tries (replaced by tests).
_pause = time.sleep


def _connect(sock: socket.socket, path: str, wait: float) -> None:
    # Connect, trying again while no service listens at path, for up to
    # wait seconds (a service just started takes a moment to listen).
    deadline = time.monotonic() + wait
    while True:
        try:
            sock.connect(path)
            return
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() >= deadline:
                raise
            _pause(RETRY_INTERVAL)


def request(path: str, message: dict[str, Any], timeout: float = 10.0,
            wait: float = 0.0) -> dict[str, Any]:
    """
    Send one request to the control socket at C{path} and read its reply.

    @param wait: Seconds to keep trying while no service listens at
        C{path} yet (its file does not exist, or nothing accepts on it).
    @return: The reply object.
    @raise ControlError: If the socket cannot be reached (within C{wait}),
        or the reply is not a line of JSON within C{timeout} seconds.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            _connect(sock, path, wait)
            sock.sendall(encode(message))
            received = bytearray()
            while b"\n" not in received and len(received) <= MAX_LINE:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}") from None
    line = bytes(received).split(b"\n", 1)[0]
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlError(f"{path}: no reply (got {line[:200]!r})") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path}: the reply is not an object: {line[:200]!r}")
    return reply


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Add, remove and list the listeners of a running miniproxy "
        "through its control socket (miniproxy --control unix:PATH).",
    )
    parser.add_argument(
        "--socket", "-s", default=os.environ.get(SOCKET_ENVIRONMENT),
        help=f"the control socket's path (default: ${SOCKET_ENVIRONMENT})",
    )
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the reply (10)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep trying this long while no service listens on the "
                        "socket yet, e.g. right after starting it (0)")
    parser.add_argument("--json", action="store_true",
                        help="print the service's reply as it is (one line of JSON)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add = commands.add_parser(
        "add", help="start a listener",
        description="Start a listener in the running service; it takes the keys of a "
        "[[listeners]] table (docs/configuration.md).",
    )
    add.add_argument("--listen", "-l", required=True, metavar="ENDPOINT",
                     help="where to listen: a server endpoint (tcp:9000:interface=127.0.0.1)")
    add.add_argument("--to", "-t", metavar="NEXTHOP",
                     help="the static next hop (default: the service's top-level to)")
    add.add_argument("--mode", "-m", choices=("early", "accept", "first-data"),
                     help="the connect mode (default: the service's top-level mode)")
    add.add_argument("--function", "-f", action="append", dest="functions",
                     metavar="NAME",
                     help="run only these of the service's functions, in this order "
                     "(repeatable; default: all of them)")
    add.add_argument("--name", "-n", help="its name (default: listener-N)")
    add.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                     help="any other key of a [[listeners]] table, its value in JSON "
                     "(--set 'trusted=[\"10.0.0.0/8\"]'); repeatable")

    remove = commands.add_parser(
        "remove", help="stop a listener",
        description="Stop a listener: it stops listening at once; its open flows run "
        "to their end unless --close-flows.",
    )
    remove.add_argument("name")
    remove.add_argument("--close-flows", action="store_true",
                        help="reset its open flows too")

    commands.add_parser("list", help="the listeners, their addresses and open flows")
    return parser


def buildRequest(arguments: argparse.Namespace) -> dict[str, Any]:
    """
    The request for parsed command-line C{arguments}.

    @raise ValueError: For a C{--set} that is not C{KEY=JSON}.
    """
    if arguments.command == "list":
        return {"command": "list"}
    if arguments.command == "remove":
        message: dict[str, Any] = {"command": "remove", "name": arguments.name}
        if arguments.close_flows:
            message["close-flows"] = True
        return message
    listener: dict[str, Any] = {}
    for item in arguments.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: must be KEY=JSON")
        try:
            listener[key] = json.loads(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: the value is not JSON") from None
    listener["endpoint"] = arguments.listen
    for key in ("to", "mode", "functions"):
        if getattr(arguments, key) is not None:
            listener[key] = getattr(arguments, key)
    message = {"command": "add", "listener": listener}
    if arguments.name is not None:
        message["name"] = arguments.name
    return message


def describe(command: str, reply: dict[str, Any]) -> str:
    """
    What a successful C{reply} to C{command} says, for people.
    """
    if command == "add":
        return f"{reply.get('name')} listening on {', '.join(reply.get('listening', []))}\n"
    if command == "remove":
        return f"{reply.get('name')} removed ({reply.get('flows', 0)} flows left open)\n"
    rows = [("NAME", "LISTENING", "FLOWS", "ENDPOINT")] + [
        (
            str(listener.get("name")),
            ", ".join(listener.get("listening", [])) or "-",
            str(listener.get("flows")),
            str(listener.get("endpoint")),
        )
        for listener in reply.get("listeners", [])
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + f"  {row[3]}\n"
        for row in rows
    )


def main(argv: Sequence[str] | None = None, stdout: IO[str] | None = None,
         stderr: IO[str] | None = None) -> int:
    """
    Run one control command.

    @return: The exit status: 0 done, 1 refused by the service, 2 bad
        options or no service to ask.
    """
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parser = _parser()
    try:
        arguments = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:
        return 0 if e.code == 0 else 2
    if not arguments.socket:
        stderr.write(f"{PROGRAM}: give --socket PATH (or set ${SOCKET_ENVIRONMENT})\n")
        return 2
    try:
        message = buildRequest(arguments)
        reply = request(arguments.socket, message, arguments.timeout, arguments.wait)
    except (ValueError, ControlError) as e:
        stderr.write(f"{PROGRAM}: {e}\n")
        return 2
    if arguments.json:
        stdout.write(json.dumps(reply) + "\n")
    if not reply.get("ok"):
        stderr.write(f"{PROGRAM}: {reply.get('error', 'refused')}\n")
        return 1
    if not arguments.json:
        stdout.write(describe(arguments.command, reply))
    return 0


if __name__ == "__main__":
    sys.exit(main())
