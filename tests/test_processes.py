"""
Tests for L{miniproxy.processes}.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial import unittest

from miniproxy import processes


class ProcessAliveTests(unittest.TestCase):
    """
    L{processes.processAlive} tells live process ids from dead ones.
    """

    def test_self(self) -> None:
        """
        This process is alive.
        """
        self.assertTrue(processes.processAlive(os.getpid()))

    def test_reaped(self) -> None:
        """
        A child that has exited and been reaped is not (its id is not
        reused this soon: Linux hands out ids in increasing order).
        """
        child = subprocess.Popen([sys.executable, "-S", "-c", "pass"])
        child.wait()
        self.assertFalse(processes.processAlive(child.pid))

    def test_otherUser(self) -> None:
        """
        A process that may not be signalled (C{EPERM}) exists.
        """

        def refuse(pid: int, signal: int) -> None:
            raise PermissionError(1, "Operation not permitted")

        self.patch(os, "kill", refuse)
        self.assertTrue(processes.processAlive(1))
