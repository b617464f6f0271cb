# -*- test-case-name: tests.test_discovery -*-
"""
Finding the installed proxy functions with L{twisted.plugin}.

Functions are dropins of the L{miniproxy.plugins} package.  Like
L{twisted.plugins}, that package extends its path with every
C{miniproxy/plugins/} directory on C{sys.path}, so a third-party
distribution (or a directory on C{PYTHONPATH}) adds a function by shipping
C{miniproxy/plugins/<something>.py} without an C{__init__.py}.
"""

from __future__ import annotations

from types import ModuleType

from twisted.plugin import getPlugins

from miniproxy.errors import FunctionError
from miniproxy.interfaces import IProxyFunction


def _defaultPackage() -> ModuleType:
    import miniproxy.plugins

    return miniproxy.plugins


def getFunctions(package: ModuleType | None = None) -> dict[str, IProxyFunction]:
    """
    The installed proxy functions by name.

    @param package: The dropin package to search; L{miniproxy.plugins} by
        default.
    @raise FunctionError: If two installed functions have the same name.
    """
    found: dict[str, IProxyFunction] = {}
    for function in getPlugins(IProxyFunction, package or _defaultPackage()):
        name = function.name
        if name in found and found[name] is not function:
            raise FunctionError(
                f"two installed proxy functions are named {name!r}: "
                f"{found[name]!r} and {function!r}"
            )
        found[name] = function
    return found


def getFunction(name: str, package: ModuleType | None = None) -> IProxyFunction:
    """
    The installed proxy function called C{name}.

    @raise FunctionError: If there is none; the message lists the installed
        ones.
    """
    functions = getFunctions(package)
    try:
        return functions[name]
    except KeyError:
        known = ", ".join(sorted(functions)) or "none"
        raise FunctionError(
            f"no proxy function named {name!r} is installed (installed: {known})"
        ) from None
