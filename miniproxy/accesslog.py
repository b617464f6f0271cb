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
"""

from __future__ import annotations

from typing import Any

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
