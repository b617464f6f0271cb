# -*- test-case-name: tests.test_optionemitter -*-
"""
Writing the flow address TCP option (L{miniproxy.wire.tcpoption}) into the
SYN of an outgoing leg, so that the next proxy learns the flow's final
destination from the SYN itself (the paper's chain of explicit proxies).

A user-space program cannot add a TCP option to the SYNs its kernel sends.
So the outgoing legs that carry it are marked (C{SO_MARK}), an C{iptables}
rule sends the marked SYNs leaving this host to a netfilter queue, and
this module (L{NetfilterQueue}) adds the option to each one it expects,
fixes the lengths and checksums, and lets it go.  The rule uses
C{--queue-bypass}: if miniproxy is not reading the queue, SYNs leave
unchanged rather than being dropped.

It needs CAP_NET_ADMIN (for C{SO_MARK}, the rule and the queue).  The
C{nftables} C{queue} statement does not work on every kernel; the
C{iptables} C{NFQUEUE} target (here through iptables-nft) does.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import weakref
from typing import Any, Callable

from twisted.logger import Logger

from miniproxy.address import HostPort
from miniproxy.nfqueue import NetfilterQueue
from miniproxy.processes import processAlive
from miniproxy.wire import tcpoption
from miniproxy.wire.errors import MalformedInput
from miniproxy.wire.packet import addTCPOption, parseIP

_log = Logger(namespace="miniproxy.optionemitter")

#: The firewall mark of outgoing legs whose SYN gets the option ("MP").
DEFAULT_MARK = 0x4D50
#: The netfilter queue their SYNs go through.
DEFAULT_QUEUE = 0x4D50


def _canonical(host: str) -> str:
    import ipaddress

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


# The shared emitters, by reactor (weakly: a dead reactor takes its
# emitters with it) and queue.
_shared: "weakref.WeakKeyDictionary[Any, dict[int, OptionEmitter]]" = weakref.WeakKeyDictionary()


class OptionEmitter:
    """
    Adds the flow address option to the SYNs of the outgoing legs that
    were announced with L{expect}.

    @ivar mark: The mark those legs' sockets carry.
    @ivar queue: The netfilter queue number.
    @ivar emitted: SYNs that got the option.
    @ivar skipped: Expected SYNs that had no room for it.
    """

    def __init__(
        self,
        reactor: Any,
        queue: int = DEFAULT_QUEUE,
        mark: int = DEFAULT_MARK,
        run: Callable[..., Any] = subprocess.run,
    ) -> None:
        self.reactor = reactor
        self.queue = queue
        self.mark = mark
        self._run = run
        self._queues: list[NetfilterQueue] = []
        self._rules: list[list[str]] = []
        self._expected: dict[tuple[int, str, int], bytes] = {}
        self.emitted = 0
        self.skipped = 0
        self.comment = f"miniproxy-{os.getpid()}"

    _users = 0

    @classmethod
    def shared(cls, reactor: Any, queue: int = DEFAULT_QUEUE, mark: int = DEFAULT_MARK) -> OptionEmitter:
        """
        The emitter of C{queue} in this process, shared by every service on
        C{reactor} (a netfilter queue has one reader).  Each user calls
        L{release} when done; the last one stops it.
        """
        emitters = _shared.setdefault(reactor, {})
        emitter = emitters.get(queue)
        if emitter is None:
            emitter = emitters[queue] = cls(reactor, queue, mark)
        emitter._users += 1
        return emitter

    def release(self) -> None:
        """
        One user of a L{shared} emitter is done; the last one stops it.
        """
        self._users -= 1
        if self._users <= 0:
            self._users = 0
            emitters = _shared.get(self.reactor, {})
            if emitters.get(self.queue) is self:
                del emitters[self.queue]
            self.stop()

    @property
    def running(self) -> bool:
        """
        Whether the queue is being read.
        """
        return bool(self._queues)

    def _rule(self, tool: str) -> list[str]:
        return [
            tool, "-t", "mangle", "{action}", "OUTPUT", "-p", "tcp",
            "--tcp-flags", "SYN,ACK,RST", "SYN",
            "-m", "mark", "--mark", str(self.mark),
            "-m", "comment", "--comment", self.comment,
            "-j", "NFQUEUE", "--queue-num", str(self.queue), "--queue-bypass",
        ]

    def _apply(self, rule: list[str], action: str) -> Any:
        command = [action if part == "{action}" else part for part in rule]
        return self._run(command, capture_output=True, text=True)

    def removeStale(self, tool: str) -> int:
        """
        Remove the rules that miniproxy processes no longer running left
        behind (killed before they could remove them).

        @return: How many were removed.
        """
        try:
            listing = self._run([tool, "-t", "mangle", "-S", "OUTPUT"], capture_output=True, text=True)
        except OSError:
            return 0
        removed = 0
        for line in (listing.stdout or "").splitlines():
            match = re.search(r"--comment \"?miniproxy-(\d+)\"?", line)
            if match is None or not line.startswith("-A OUTPUT"):
                continue
            pid = int(match.group(1))
            if pid == os.getpid() or processAlive(pid):
                continue
            self._run([tool, "-t", "mangle", "-D", *shlex.split(line)[1:]], capture_output=True, text=True)
            removed += 1
        return removed

    def start(self) -> None:
        """
        Read the queue and install the rules (IPv4 and, where possible,
        IPv6).  Starting twice is harmless.

        @raise OSError: If the queue cannot be bound or the IPv4 rule cannot
            be installed; nothing is left installed then.
        """
        if self.running:
            return
        try:
            # One queue takes both families' packets; each family has its
            # rule (IPv6 only where ip6tables works).
            q = NetfilterQueue(self.reactor, self.queue, self._packet)
            q.start()
            self._queues.append(q)
            for tool in ("iptables", "ip6tables"):
                self.removeStale(tool)
                rule = self._rule(tool)
                try:
                    result = self._apply(rule, "-A")
                except OSError as e:
                    result = subprocess.CompletedProcess(rule, 1, "", str(e))
                if result.returncode != 0:
                    if tool == "iptables":
                        raise OSError(
                            f"cannot install the {tool} NFQUEUE rule: "
                            f"{(result.stderr or '').strip()}"
                        )
                    continue
                self._rules.append(rule)
        except BaseException:
            self.stop()
            raise
        _log.info(
            "adding the flow address option to SYNs marked {mark:#x} (queue {queue})",
            mark=self.mark, queue=self.queue,
        )

    def stop(self) -> None:
        """
        Remove the rules and stop reading the queue.  Stopping twice is
        harmless.
        """
        for rule in self._rules:
            self._apply(rule, "-D")
        self._rules = []
        for q in self._queues:
            q.stop()
        self._queues = []
        self._expected.clear()

    def expect(self, localPort: int, remote: HostPort, option: tcpoption.FlowAddressOption) -> None:
        """
        The SYN from C{localPort} to C{remote} is to carry C{option} (its
        retransmissions too, until L{forget}).
        """
        key = (localPort, _canonical(remote.host), remote.port)
        self._expected[key] = tcpoption.encode(option)

    def forget(self, localPort: int, remote: HostPort) -> None:
        """
        The leg from C{localPort} to C{remote} connected or failed.
        """
        self._expected.pop((localPort, _canonical(remote.host), remote.port), None)

    def _packet(self, packet: bytes) -> bytes:
        try:
            segment = parseIP(packet)
        except MalformedInput:
            return packet
        key = (segment.source.port, _canonical(segment.destination.host), segment.destination.port)
        option = self._expected.get(key)
        if option is None or not segment.isSyn:
            return packet
        try:
            changed = addTCPOption(packet, option)
        except MalformedInput as e:
            self.skipped += 1
            _log.warn("SYN to {destination} left without the flow address option: {why}",
                      destination=str(segment.destination), why=str(e))
            return packet
        self.emitted += 1
        return changed
