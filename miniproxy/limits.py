# -*- test-case-name: tests.test_limits -*-
"""
Every bound miniproxy enforces, with its default, in one place.
"""

from __future__ import annotations

from attrs import frozen

#: Default bound on what one flow buffers in userspace, per direction.
DEFAULT_MAX_BUFFER = 256 * 1024

#: Default bytes a direction of a flow carries in userspace before it
#: switches to the splice path.
DEFAULT_SPLICE_AFTER = 64 * 1024


@frozen
class Limits:
    """
    The bounds of a listener.

    @ivar maxBuffer: Bytes one flow may buffer in userspace per direction:
        bytes held before the outgoing leg connects, and bytes written to a
        leg the peer does not read fast enough.  Past it, the proxy stops
        reading from the other leg (backpressure).
    @ivar connectTimeout: Seconds the outgoing leg may take to connect.
    @ivar idleTimeout: Seconds a flow may pass no byte in either direction
        before both legs are reset.  0 disables it.
    @ivar maxFlows: Flows open at once on the service; more are refused at
        accept.
    @ivar maxFlowsPerSource: Flows open at once from one client address.
    @ivar listenBacklog: The listen(2) backlog of each listener.
    @ivar maxPendingSyns: Flows begun at their SYN and still waiting for
        accept, in total.  SYNs past it connect at accept (SYN flood guard).
    @ivar maxPendingSynsPerSource: The same, per client address.
    @ivar synTimeout: Seconds a flow begun at its SYN waits for the
        client's handshake to complete before it is aborted.
    @ivar splice: Whether a flow whose functions never look at its bytes
        relays them socket to socket with C{splice(2)} (see
        L{miniproxy.splice}); each pipe then holds at most C{maxBuffer}.
    @ivar spliceAfter: Bytes one direction of a flow carries in userspace
        before it switches to the splice path: below it, opening a pipe
        and setting it up costs more than the copies it saves, so short
        and idle flows never have one.  0 splices from the first byte.
    """

    maxBuffer: int = DEFAULT_MAX_BUFFER
    connectTimeout: float = 10.0
    idleTimeout: float = 300.0
    maxFlows: int = 10000
    maxFlowsPerSource: int = 256
    listenBacklog: int = 1024
    maxPendingSyns: int = 1024
    maxPendingSynsPerSource: int = 64
    synTimeout: float = 5.0
    splice: bool = True
    spliceAfter: int = DEFAULT_SPLICE_AFTER

    @property
    def readSize(self) -> int:
        """
        The most bytes one read from a leg returns: half the buffer bound,
        so that what is written to a leg (at most C{readSize} over the
        pause threshold of C{readSize}) never exceeds C{maxBuffer}.
        """
        return max(self.maxBuffer // 2, 1024)
