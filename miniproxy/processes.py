# -*- test-case-name: tests.test_processes -*-
"""
Facts about other processes of this host.
"""

from __future__ import annotations

import os


def processAlive(pid: int) -> bool:
    """
    Whether a process with this id exists (it may belong to another user:
    signal 0 to it is then refused, which still says that it exists).

    @param pid: A process id.
    @return: L{False} only if there is no such process.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
