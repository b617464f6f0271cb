# -*- test-case-name: tests.test_accesslog -*-
"""
One access-log line per flow, through C{twisted.logger}.

Each event carries the flow's fields as keys (C{client}, C{destination},
C{nextHop}, C{mode}, C{startedBy}, C{times}, C{bytesFromClient},
C{bytesFromServer}, C{outcome}, C{reason}, and C{origin}: the original
client a PROXY header named, or L{None}) so an observer can format or ship
them as it likes; the text form is one line.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

log = Logger(namespace="miniproxy.access")

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
        "mode": flow.mode.value,
        "startedBy": flow.startedBy.value if flow.startedBy else "-",
        "times": times.asDict(),
        "connectMs": _ms(times.outgoingStarted, times.outgoingConnected),
        "ttfbMs": _ms(begin, times.firstByteFromServer),
        "durationMs": _ms(begin, times.closed),
        "bytesFromClient": flow.bytesFromClient,
        "bytesFromServer": flow.bytesFromServer,
        "outcome": flow.outcome.value if flow.outcome else "-",
        "reason": flow.reason,
        "because": f" reason={flow.reason!r}" if flow.reason else "",
        # The original client an explicit carrier (a PROXY header) named.
        "origin": str(origin) if origin is not None else None,
        "fromOrigin": f" origin={origin}" if origin is not None else "",
    }


def logFlow(flow: Any) -> None:
    """
    Write the access-log line of a closed flow.
    """
    log.info(_FORMAT, **flowFields(flow))


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
