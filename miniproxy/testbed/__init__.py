# -*- test-case-name: tests.test_netns -*-
"""
A testbed for miniproxy: test hosts as Linux network namespaces, the links
between them, and the processes run in them.

L{miniproxy.testbed.netns} holds the building blocks: L{Testbed} owns
namespaces (L{Namespace}) with a name prefix unique to the run, links them
with veth pairs, runs commands and processes in them and tears all of it
down (also at exit, and for crashed runs with L{cleanupStale}).
L{namespacesUnavailable} tells tests why they must skip.
"""

from miniproxy.testbed.netns import (
    CommandError,
    Namespace,
    NetnsError,
    Testbed,
    VethPair,
    canUseNamespaces,
    cleanupStale,
    namespacesUnavailable,
    pollUntil,
    rootAvailable,
    uniquePrefix,
)

__all__ = [
    "CommandError",
    "Namespace",
    "NetnsError",
    "Testbed",
    "VethPair",
    "canUseNamespaces",
    "cleanupStale",
    "namespacesUnavailable",
    "pollUntil",
    "rootAvailable",
    "uniquePrefix",
]
