# -*- test-case-name: tests.test_accesslog -*-
"""
One access-log line per flow, through C{twisted.logger}.

Each event carries the flow's fields as keys (C{client}, C{destination},
C{nextHop}, C{mode}, C{startedBy}, C{times}, C{bytesFromClient},
C{bytesFromServer}, C{outcome}, C{reason}, and C{origin}: the original
client a PROXY header named, or L{None}) so an observer can format or ship
them as it likes; the text form is one line.

The line is made here, once, with C{str.format_map}, and the event's
format is C{"{line}"}: an observer that writes text (twistd's log file)
formats one field instead of thirteen with Twisted's pure-Python
formatter, which cost more than the rest of a short flow's bookkeeping.

Where the lines go is the service's choice (C{[log] access}, see
L{accessLogFor}): the service's log as above (the default), nowhere, or a
file of their own, L{AccessLogFile}, which buffers lines and writes them
in batches.  Through the service's log a line costs about 50 µs of CPU
(Twisted's logger, its observers, the timestamp and one C{write} per
line); into its own file about a tenth of that.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from twisted.logger import Logger, LogLevel

log = Logger(namespace="miniproxy.access")

#: The format of an access-log event: its line, made by L{logFlow}.
LINE_FORMAT = "{line}"

_FORMAT = (
    "{client} -> {destination} via {nextHop} mode={mode} started-by={startedBy} "
    "connect={connectMs} ttfb={ttfbMs} duration={durationMs} "
    "up={bytesFromClient} down={bytesFromServer} outcome={outcome}{fromOrigin}{because}"
)


def _ms(start: float | None, end: float | None) -> str:
    if start is None or end is None:
        return "-"
    return f"{(end - start) * 1000:.1f}ms"


def flowFields(flow: Any) -> dict[str, Any]:
    """
    The access-log fields of a closed flow.
    """
    times = flow.times
    origin = getattr(flow, "origin", None)
    begin = times.synSeen if times.synSeen is not None else times.accepted
    return {
        "client": str(flow.client),
        "destination": str(flow.destination) if flow.destination else "-",
        "nextHop": str(flow.nextHop) if flow.nextHop else "-",
        # _value_: the value, without the enum's descriptor (its value
        # property is a Python function).
        "mode": flow.mode._value_,
        "startedBy": flow.startedBy._value_ if flow.startedBy else "-",
        "times": times.asDict(),
        "connectMs": _ms(times.outgoingStarted, times.outgoingConnected),
        "ttfbMs": _ms(begin, times.firstByteFromServer),
        "durationMs": _ms(begin, times.closed),
        "bytesFromClient": flow.bytesFromClient,
        "bytesFromServer": flow.bytesFromServer,
        "outcome": flow.outcome._value_ if flow.outcome else "-",
        "reason": flow.reason,
        "because": f" reason={flow.reason!r}" if flow.reason else "",
        # The original client an explicit carrier (a PROXY header) named.
        "origin": str(origin) if origin is not None else None,
        "fromOrigin": f" origin={origin}" if origin is not None else "",
    }


def logFlow(flow: Any) -> None:
    """
    Write the access-log line of a closed flow: an info event whose
    C{line} is L{_FORMAT} filled in with the fields of L{flowFields}, which
    the event carries too.
    """
    fields = flowFields(flow)
    fields["line"] = _FORMAT.format_map(fields)
    log.emit(LogLevel.info, LINE_FORMAT, **fields)


def logRefusedAtAccept(listener: str, client: str, reason: str) -> None:
    """
    Write the line of a connection refused before it became a flow.
    """
    log.warn(
        "{client} refused at accept on {listener}: {reason}",
        client=client,
        listener=listener,
        reason=reason,
        outcome="refused",
    )


def discardFlow(flow: Any) -> None:
    """
    Write no access-log line (C{[log] access = "off"}).
    """


#: The access log's destinations that are not files.
SERVICE = "service"
OFF = "off"

#: An access log file's defaults: the bytes of lines kept before a write,
#: and the most seconds a line waits.
BUFFER_SIZE = 65536
FLUSH_INTERVAL = 1.0


class AccessLogFile:
    """
    An access log of its own: one line per flow, with the time it was
    written in front, appended to a file in batches.

    Lines are kept in memory until C{bufferSize} bytes are waiting or
    C{flushInterval} seconds have passed since the first of them, then
    written with one C{write}; L{close} (at the service's stop) writes the
    rest.  A crash of the process loses at most those seconds of lines.
    With either bound 0, each line is written at once.

    The file is opened in append mode, so workers of one service may share
    it: each batch is whole lines.  Before each write the file's path is
    checked: when it names another file, or none (a log rotator moved it
    away), the file is opened again, so rotation needs no signal.  A write
    that fails (a full disk) drops its batch, with one error in the
    service's log per failure and the count of lines lost.

    @ivar path: The file's path.
    @ivar written: The lines written so far.
    @ivar lost: The lines dropped by failed writes.
    """

    def __init__(self, path: str, reactor: Any, bufferSize: int = BUFFER_SIZE,
                 flushInterval: float = FLUSH_INTERVAL) -> None:
        """
        @param path: The file (created if missing, with mode 0640), opened
            by L{open}.
        @param reactor: An L{twisted.internet.interfaces.IReactorTime}.
        @param bufferSize: Bytes of lines kept before a write.
        @param flushInterval: The most seconds a line waits to be written.
        """
        self.path = path
        self._reactor = reactor
        self._bufferSize = bufferSize
        self._flushInterval = flushInterval
        self._lines: list[bytes] = []
        self._pending = 0
        self._timer: Any = None
        self._second = -1
        self._stamp = ""
        self.written = 0
        self.lost = 0
        self._fd = -1
        self._closed = False

    def open(self) -> None:
        """
        Open the file for appending, if it is not open yet (the service
        does this when it starts, before twistd drops privileges).

        @raise OSError: If it cannot be opened.
        """
        if self._fd < 0 and not self._closed:
            self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _timestamp(self) -> str:
        # The time to the second, made once a second.
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
        return self._stamp

    def __call__(self, flow: Any) -> None:
        """
        Take the line of a closed flow.
        """
        if self._closed:
            self.lost += 1
            return
        fields = flowFields(flow)
        line = f"{self._timestamp()} {_FORMAT.format_map(fields)}\n".encode("utf-8", "replace")
        self._lines.append(line)
        self._pending += len(line)
        if self._pending >= self._bufferSize or self._flushInterval <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = self._reactor.callLater(self._flushInterval, self.flush)

    def _reopenIfMoved(self) -> None:
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            fd = self._open()
            os.close(self._fd)
            self._fd = fd

    def flush(self) -> None:
        """
        Write the lines waiting, now.
        """
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if not self._lines or self._fd < 0:
            return
        lines, self._lines, self._pending = self._lines, [], 0
        data = b"".join(lines)
        try:
            self._reopenIfMoved()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            self.lost += len(lines)
            log.failure(
                "access log {path}: {count} lines lost ({error})",
                path=self.path, count=len(lines), error=e,
            )
            return
        self.written += len(lines)

    def close(self) -> None:
        """
        Write what is waiting and close the file.  Lines taken afterwards
        are dropped (and counted in C{lost}).
        """
        if self._closed:
            return
        self.flush()
        self._closed = True
        self.lost += len(self._lines)
        self._lines = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def fileno(self) -> int:
        """
        The descriptor of the open file (-1 once closed).
        """
        return self._fd


def accessLogFor(destination: str, reactor: Any, bufferSize: int = BUFFER_SIZE,
                 flushInterval: float = FLUSH_INTERVAL) -> Callable[[Any], None]:
    """
    The access log of a service: what takes each closed flow.

    @param destination: L{SERVICE} (the service's log, L{logFlow}), L{OFF}
        (L{discardFlow}) or a file's path (an L{AccessLogFile}, not opened
        yet: see L{AccessLogFile.open}).
    """
    if destination == SERVICE:
        return logFlow
    if destination == OFF:
        return discardFlow
    return AccessLogFile(destination, reactor, bufferSize, flushInterval)
