"""
Tests for L{miniproxy.functions.discovery} and the built-in dropins.
"""

from __future__ import annotations

import os
import sys
import textwrap

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin, getPlugins, pluginPackagePaths
from twisted.trial import unittest
from zope.interface.verify import verifyObject

import miniproxy.plugins
from miniproxy.errors import FunctionError
from miniproxy.functions.base import FunctionMaker
from miniproxy.functions.discovery import getFunction, getFunctions
from miniproxy.functions.policy import Policy
from miniproxy.functions.splittcp import SplitTCP
from miniproxy.interfaces import IFlowHandlerFactory, IProxyFunction


class BuiltinFunctionTests(unittest.TestCase):
    """
    The built-in functions are found by name and provide their interfaces.
    """

    def test_splitTCPDiscovered(self) -> None:
        function = getFunctions()["split-tcp"]
        self.assertIsInstance(function.configure({}, MemoryReactorClock()), SplitTCP)

    def test_policyDiscovered(self) -> None:
        function = getFunctions()["policy"]
        self.assertIsInstance(function.configure({}, MemoryReactorClock()), Policy)

    def test_verifyObject(self) -> None:
        for name in ("split-tcp", "policy"):
            function = getFunction(name)
            self.assertTrue(verifyObject(IPlugin, function))
            self.assertTrue(verifyObject(IProxyFunction, function))
            self.assertTrue(function.description)
            self.assertTrue(
                verifyObject(IFlowHandlerFactory, function.configure({}, None))
            )

    def test_unknown(self) -> None:
        with self.assertRaises(FunctionError) as raised:
            getFunction("no-such-function")
        self.assertIn("no proxy function named 'no-such-function'", str(raised.exception))
        self.assertIn("policy", str(raised.exception))

    def test_installedName(self) -> None:
        """
        The dropin package is installed as C{miniproxy.plugins}, never as a
        top-level C{plugins} that could clash with another distribution.
        """
        self.assertEqual(miniproxy.plugins.__name__, "miniproxy.plugins")
        self.assertNotIn("plugins", sys.modules)


class TwistdDropinTests(unittest.TestCase):
    """
    The C{twistd miniproxy} dropin is found and lazy.
    """

    def test_serviceMaker(self) -> None:
        import twisted.plugins

        makers = {m.tapname: m for m in getPlugins(IServiceMaker, twisted.plugins)}
        maker = makers["miniproxy"]
        self.assertTrue(verifyObject(IServiceMaker, maker))
        self.assertEqual(maker.module, "miniproxy.tap")


class ThirdPartyDropinTests(unittest.TestCase):
    """
    A dropin in a C{miniproxy/plugins} directory anywhere on C{sys.path} is
    found, as Twisted's own dropins are.
    """

    def setUp(self) -> None:
        root = self.mktemp()
        dropins = os.path.join(root, "miniproxy", "plugins")
        os.makedirs(dropins)
        with open(os.path.join(dropins, "mp_thirdparty_test.py"), "w") as f:
            f.write(textwrap.dedent("""
                from miniproxy.functions.base import FunctionMaker
                shout = FunctionMaker("shout-test", "miniproxy.functions.splittcp",
                                      "A third-party test function.")
            """))
        sys.path.append(root)
        self.addCleanup(sys.path.remove, root)
        paths = pluginPackagePaths("miniproxy.plugins")
        self.assertIn(os.path.abspath(dropins), paths)
        miniproxy.plugins.__path__.append(dropins)
        self.addCleanup(miniproxy.plugins.__path__.remove, dropins)
        self.addCleanup(sys.modules.pop, "miniproxy.plugins.mp_thirdparty_test", None)

    def test_found(self) -> None:
        function = getFunction("shout-test")
        self.assertIsInstance(function, FunctionMaker)
        self.assertTrue(verifyObject(IProxyFunction, function))
        self.assertIn("split-tcp", getFunctions())

    def test_duplicateName(self) -> None:
        """
        Two installed functions with one name are an error, not a silent
        choice.
        """
        dropins = miniproxy.plugins.__path__[-1]
        with open(os.path.join(dropins, "mp_thirdparty_dup.py"), "w") as f:
            f.write(
                "from miniproxy.functions.base import FunctionMaker\n"
                "dup = FunctionMaker('policy', 'x', 'duplicate')\n"
            )
        self.addCleanup(sys.modules.pop, "miniproxy.plugins.mp_thirdparty_dup", None)
        with self.assertRaises(FunctionError) as raised:
            getFunctions()
        self.assertIn("two installed proxy functions are named 'policy'", str(raised.exception))
