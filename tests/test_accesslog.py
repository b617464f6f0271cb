"""
Tests for L{miniproxy.accesslog}: where access-log lines go, and the
access log's own file.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from miniproxy import accesslog
from miniproxy.accesslog import AccessLogFile, accessLogFor, discardFlow, logFlow
from miniproxy.config import buildConfig
from miniproxy.errors import ConfigError
from miniproxy.testing import FlowHarness

#: The time stamp in front of each line of an access log's own file.
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "


def closedFlow(up: bytes = b"up", down: bytes = b"down") -> Any:
    """
    A flow that relayed C{up} and C{down} in memory, then closed.
    """
    harness = FlowHarness()
    driver = harness.accept()
    driver.connectOutgoing()
    driver.clientSends(up)
    driver.serverSends(down)
    driver.clientHalfCloses()
    driver.serverHalfCloses()
    assert harness.closedFlows == [driver.flow]
    return driver.flow


def lineOf(flow: Any) -> str:
    """
    The access-log line of C{flow}, without the time stamp.
    """
    return accesslog._FORMAT.format_map(accesslog.flowFields(flow))


class AccessLogForTests(unittest.TestCase):
    """
    L{accessLogFor} picks the access log a service's configuration names.
    """

    def test_destinations(self) -> None:
        """
        C{service} is the service's log, C{off} is nowhere, anything else
        is a file of its own (not opened yet).
        """
        clock = Clock()
        self.assertIs(accessLogFor("service", clock), logFlow)
        self.assertIs(accessLogFor("off", clock), discardFlow)
        path = self.mktemp()
        log = accessLogFor(path, clock, 10, 2.0)
        self.assertIsInstance(log, AccessLogFile)
        self.assertEqual(log.path, path)
        self.assertFalse(os.path.exists(path))

    def test_discard(self) -> None:
        """
        L{discardFlow} takes a flow and writes nothing, where L{logFlow}
        emits one access-log event.
        """
        from tests.support import LogCapture

        # The harness logs its flows' lines itself: capture only afterwards.
        flow = closedFlow()
        logs = LogCapture(self)
        discardFlow(flow)
        self.assertEqual(logs.matching("miniproxy.access"), [])
        logFlow(flow)
        self.assertEqual(len(logs.matching("miniproxy.access")), 1)


class AccessLogFileTests(unittest.TestCase):
    """
    L{AccessLogFile} writes whole lines in batches, in order, and loses
    none of them at close or rotation.
    """

    def make(self, bufferSize: int = 65536, flushInterval: float = 1.0) -> tuple[AccessLogFile, Clock]:
        clock = Clock()
        log = AccessLogFile(self.mktemp(), clock, bufferSize, flushInterval)
        log.open()
        self.addCleanup(log.close)
        return log, clock

    def read(self, path: str) -> list[str]:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()

    def test_interval(self) -> None:
        """
        A line waits until C{flushInterval} seconds after the first line
        that waits, then it and those after it are written at once, each
        with the time in front.
        """
        log, clock = self.make(flushInterval=1.0)
        first, second = closedFlow(b"a"), closedFlow(b"bb")
        log(first)
        clock.advance(0.5)
        log(second)
        self.assertEqual(self.read(log.path), [])
        clock.advance(0.5)
        lines = self.read(log.path)
        self.assertEqual(len(lines), 2)
        for line, flow in zip(lines, [first, second]):
            self.assertRegex(line, "^" + STAMP + re.escape(lineOf(flow)) + "$")
        self.assertEqual((log.written, log.lost), (2, 0))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_bufferSize(self) -> None:
        """
        Lines are written as soon as C{bufferSize} bytes of them wait, and
        the timer of the batch is cancelled.
        """
        flow = closedFlow()
        # A line is its time stamp (25 bytes), the line and a newline.
        size = len(lineOf(flow)) + 20
        log, clock = self.make(bufferSize=2 * size)
        log(flow)
        self.assertEqual(self.read(log.path), [])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        log(flow)
        self.assertEqual(len(self.read(log.path)), 2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_noBuffering(self) -> None:
        """
        With C{flushInterval} 0, each line is written at once.
        """
        log, clock = self.make(flushInterval=0)
        log(closedFlow())
        self.assertEqual(len(self.read(log.path)), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_rotation(self) -> None:
        """
        When the file was moved away, the next write opens a new file at
        the path: what was written before stays in the moved file.
        """
        log, clock = self.make(flushInterval=0)
        log(closedFlow(b"old"))
        moved = log.path + ".1"
        os.rename(log.path, moved)
        log(closedFlow(b"new"))
        self.assertEqual([l.split(" up=")[1][:1] for l in self.read(moved)], ["3"])
        self.assertEqual([l.split(" up=")[1][:1] for l in self.read(log.path)], ["3"])
        self.assertEqual(log.written, 2)

    def test_writeFails(self) -> None:
        """
        A write that fails (a full disk) drops its batch, counts its lines
        as lost and logs the error; later lines are written again.
        """
        log, clock = self.make(flushInterval=0)
        real = os.write

        def full(fd: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "write", full)
        log(closedFlow())
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.patch(os, "write", real)
        log(closedFlow())
        self.assertEqual(len(self.read(log.path)), 1)
        self.assertEqual((log.written, log.lost), (1, 1))

    def test_close(self) -> None:
        """
        L{AccessLogFile.close} writes the lines that wait and closes the
        file; a line taken afterwards is counted as lost; closing again
        does nothing.
        """
        log, clock = self.make()
        log(closedFlow())
        fd = log.fileno()
        log.close()
        self.assertEqual(len(self.read(log.path)), 1)
        self.assertEqual(log.fileno(), -1)
        self.assertRaises(OSError, os.fstat, fd)
        self.assertEqual(clock.getDelayedCalls(), [])
        log(closedFlow())
        log.close()
        self.assertEqual((log.written, log.lost), (1, 1))

    def test_cannotOpen(self) -> None:
        """
        A file in a directory that does not exist cannot be opened.
        """
        log = AccessLogFile(os.path.join(self.mktemp(), "access.log"), Clock())
        self.assertRaises(FileNotFoundError, log.open)
        log.close()

    @given(st.lists(st.one_of(st.just("flush"), st.floats(0, 3), st.binary(max_size=40)),
                    max_size=40),
           st.integers(0, 400), st.sampled_from([0.0, 0.5, 1.0, 2.5]))
    def test_everyLineOnce(self, steps: list[Any], bufferSize: int, interval: float) -> None:
        """
        Whatever the bounds and however flows, time and flushes interleave,
        after close the file holds every line once, in order, whole.
        """
        clock = Clock()
        path = self.mktemp()
        log = AccessLogFile(path, clock, bufferSize, interval)
        log.open()
        expected = []
        for step in steps:
            if step == "flush":
                log.flush()
            elif isinstance(step, float):
                clock.advance(step)
            else:
                flow = closedFlow(step or b"x")
                log(flow)
                expected.append(lineOf(flow))
        log.close()
        lines = self.read(path)
        self.assertEqual([re.sub("^" + STAMP, "", l) for l in lines], expected)
        self.assertEqual((log.written, log.lost), (len(expected), 0))
        self.assertEqual(clock.getDelayedCalls(), [])


class ConfigTests(unittest.TestCase):
    """
    The C{[log]} table and C{--access-log}.
    """

    def test_default(self) -> None:
        """
        By default the access log is the service's log.
        """
        config = buildConfig({})
        self.assertEqual(
            (config.accessLog, config.accessLogBuffer, config.accessLogFlush),
            ("service", 65536, 1.0),
        )

    def test_table(self) -> None:
        """
        C{[log]} names the file and its bounds; C{--access-log} replaces
        the file's C{access}.
        """
        table = {"log": {"access": "/var/log/a.log", "access-buffer": 0, "access-flush": 5}}
        config = buildConfig(table)
        self.assertEqual(
            (config.accessLog, config.accessLogBuffer, config.accessLogFlush),
            ("/var/log/a.log", 0, 5.0),
        )
        self.assertEqual(buildConfig(table, accessLog="off").accessLog, "off")

    def test_bad(self) -> None:
        """
        Unknown keys, and values of the wrong kind or sign, are refused with
        the key named.
        """
        for document, message in [
            ({"log": {"acess": "off"}}, "log: must be a table"),
            ({"log": "off"}, "log: must be a table"),
            ({"log": {"access": 3}}, "log.access: must be"),
            ({"log": {"access": ""}}, "log.access: must be"),
            ({"log": {"access-buffer": "big"}}, "log.access-buffer"),
            ({"log": {"access-flush": -1}}, "must not be negative"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                buildConfig(document)
            self.assertIn(message, str(caught.exception))


class ServiceTests(unittest.TestCase):
    """
    A service writes its flows' lines to the access log's own file, and
    the last of them by the time it has stopped.
    """

    @defer.inlineCallbacks
    def test_file(self) -> Any:
        """
        A flow through a service whose access log is a file: its line is in
        the file once the service has stopped; the service's stop closes
        the file.
        """
        from tests.support import Network, withTimeout

        net = Network(self)
        serverPort, servers = net.server(echo=True)
        path = self.mktemp()
        proxy = yield net.startProxy(
            f"tcp:host=127.0.0.1:port={serverPort}",
            document={"log": {"access": path}},
        )
        log = proxy.service.accessLog
        self.assertIsInstance(log, AccessLogFile)
        client = yield net.connect(proxy.port)
        client.transport.write(b"hello")
        client.transport.loseWriteConnection()
        yield withTimeout(client.lost, 10, "the exchange to end")
        flow = yield proxy.nextClosed()
        yield proxy.stop()
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertRegex(lines[0], "^" + STAMP + re.escape(lineOf(flow)) + "$")
        self.assertIn("up=5 down=5 outcome=ok", lines[0])
        self.assertEqual(log.fileno(), -1)

    def test_cannotOpen(self) -> None:
        """
        A service whose access log cannot be opened does not start, with
        one clear line.
        """
        from twisted.internet.testing import MemoryReactor

        from miniproxy.service import ProxyService

        path = os.path.join(self.mktemp(), "access.log")
        config = buildConfig({"log": {"access": path}}, to="tcp:host=127.0.0.1:port=9")
        service = ProxyService(config, MemoryReactor())
        with self.assertRaises(SystemExit) as caught:
            service.privilegedStartService()
        self.assertEqual(
            str(caught.exception),
            f"miniproxy: cannot open the access log {path}: No such file or directory",
        )
