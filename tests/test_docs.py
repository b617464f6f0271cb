"""
Tests for the documentation in C{docs/}: what it says must be what the code
does.

 - The example function of C{docs/plugin-guide.md} is extracted verbatim
   (every fenced block marked with C{<!-- file: PATH -->}), laid out as a
   third-party distribution would be, found by discovery, configured from
   its config snippet, and its own tests are run.
 - Every TOML example of C{docs/configuration.md} is accepted by
   L{miniproxy.config.buildConfig} and by the service (functions and
   endpoints); every documented key is used by an example and known to
   the code; every command-line option is documented, and the documented
   defaults and error messages are the code's.
 - Every module named in C{docs/architecture.md}'s module map exists, and
   its access-log line has the fields the code writes.
 - The cache sketch of C{docs/cache.md} never connects upstream on a hit.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import tomllib
import unittest as pyunit
from typing import Any, Iterator

from twisted.internet import defer
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python.filepath import FilePath
from twisted.trial import reporter, unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from miniproxy import config as configModule
from miniproxy import tap
from miniproxy.accesslog import flowFields
from miniproxy.config import buildConfig
from miniproxy.errors import ConfigError
from miniproxy.flow import ConnectMode, Outcome
from miniproxy.functions.base import FunctionMaker, HandlerFactory
from miniproxy.functions.discovery import getFunctions
from miniproxy.interfaces import ICachePolicy, ICacheStore, IFlowHandlerFactory
from miniproxy.limits import Limits
from miniproxy.service import ProxyService, configureFunctions
from miniproxy.testing import FlowHarness

REPO = FilePath(__file__).parent().parent()
DOCS = REPO.child("docs")

_MARKED = re.compile(
    r"^<!-- file: (?P<name>\S+) -->\n```(?P<lang>\w*)\n(?P<code>.*?)^```\s*$",
    re.S | re.M,
)
_FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<code>.*?)^```\s*$", re.S | re.M)
_HEADING = re.compile(r"^(#+) (.*)$", re.M)
_TICKED = re.compile(r"`([^`]+)`")


def readDoc(name: str) -> str:
    """
    The text of C{docs/NAME}.
    """
    return DOCS.child(name).getContent().decode("utf-8")


def markedFiles(text: str) -> dict[str, str]:
    """
    The fenced blocks marked C{<!-- file: PATH -->}, by path.
    """
    files: dict[str, str] = {}
    for match in _MARKED.finditer(text):
        name = match.group("name")
        if name in files:
            raise AssertionError(f"{name} is marked twice")
        files[name] = match.group("code")
    return files


def fencedBlocks(text: str, lang: str) -> list[str]:
    """
    The code of every fenced block in language C{lang}.
    """
    return [m.group("code") for m in _FENCE.finditer(text) if m.group("lang") == lang]


def sections(text: str) -> Iterator[tuple[str, str]]:
    """
    Each heading's title and its text, up to the next heading of any level.
    """
    matches = list(_HEADING.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        yield match.group(2).strip(), text[match.end():end]


def section(text: str, title: str) -> str:
    """
    The text under the heading C{title}.
    """
    for heading, body in sections(text):
        if heading == title:
            return body
    raise AssertionError(f"no heading {title!r}")


def tableRows(text: str) -> list[list[str]]:
    """
    The body rows of the markdown tables in C{text}, as lists of cells.
    """
    # A table's header row is the one right before its separator line.
    bodies = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith("|"):
            continue
        if set(stripped) <= set("|-: "):
            continue
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if following.startswith("|") and set(following) <= set("|-: "):
            continue
        bodies.append([c.strip() for c in re.split(r"(?<!\\)\|", stripped.strip("|"))])
    return bodies


def ticked(cell: str) -> str | None:
    """
    The first C{`code`} span of a table cell, or L{None}.
    """
    match = _TICKED.search(cell)
    return match.group(1) if match else None


def flatKeys(document: Any, prefix: str = "") -> set[str]:
    """
    Every key of a parsed TOML document as a dotted path; the tables of an
    array of tables share their array's path.
    """
    keys: set[str] = set()
    if isinstance(document, dict):
        for key, value in document.items():
            path = f"{prefix}.{key}" if prefix else key
            keys.add(path)
            keys |= flatKeys(value, path)
    elif isinstance(document, list):
        for item in document:
            if isinstance(item, dict):
                keys |= flatKeys(item, prefix)
    return keys


# -- the plugin guide's example distribution ---------------------------------

#: What the plugin guide's example is made of, as marked in the guide.
EXAMPLE_FILES = {
    "example_quota.py",
    "miniproxy/plugins/example_quota_plugin.py",
    "pyproject.toml",
    "quota.toml",
    "test_example_quota.py",
}

#: The modules of the example, as imported.
EXAMPLE_MODULES = (
    "example_quota",
    "test_example_quota",
    "miniproxy.plugins.example_quota_plugin",
)


def installExample(case: pyunit.TestCase) -> FilePath:
    """
    Write the plugin guide's example files into a new directory laid out as
    the example distribution, put it on C{sys.path} and its dropin
    directory on C{miniproxy.plugins.__path__}; all of it is undone in
    C{case}'s cleanup.

    @return: The distribution's root.
    """
    import miniproxy.plugins

    files = markedFiles(readDoc("plugin-guide.md"))
    root = FilePath(case.mktemp())  # type: ignore[attr-defined]
    root.makedirs()
    case.addCleanup(root.remove)
    for name, code in files.items():
        child = root.preauthChild(name)
        child.parent().makedirs(ignoreExistingDirectory=True)
        child.setContent(code.encode("utf-8"))
    importlib.invalidate_caches()

    def forgetModules() -> None:
        for module in EXAMPLE_MODULES:
            sys.modules.pop(module, None)

    case.addCleanup(forgetModules)
    sys.path.insert(0, root.path)
    case.addCleanup(sys.path.remove, root.path)
    dropins = root.child("miniproxy").child("plugins").path
    miniproxy.plugins.__path__.append(dropins)
    case.addCleanup(miniproxy.plugins.__path__.remove, dropins)
    return root


class PluginGuideExampleTests(unittest.SynchronousTestCase):
    """
    The plugin guide's example function works as the guide shows it.
    """

    def setUp(self) -> None:
        self.guide = readDoc("plugin-guide.md")
        self.files = markedFiles(self.guide)

    def test_exampleFiles(self) -> None:
        """
        The guide marks every file of the example distribution, and none of
        them is an C{__init__.py} under C{miniproxy/}.
        """
        self.assertEqual(set(self.files), EXAMPLE_FILES)
        self.assertEqual([n for n in self.files if n.endswith("__init__.py")], [])

    def test_discovery(self) -> None:
        """
        With the example distribution on C{sys.path}, discovery finds its
        function by name, with the dropin's description, next to the
        built-in ones.
        """
        installExample(self)
        functions = getFunctions()
        self.assertIn("quota", functions)
        self.assertIn("policy", functions)
        self.assertIsInstance(functions["quota"], FunctionMaker)
        self.assertEqual(
            functions["quota"].description,
            "Reset a flow once it carried more than max-bytes bytes.",
        )
        self.assertEqual(functions["quota"].module, "example_quota")

    def test_configSnippet(self) -> None:
        """
        The example's config snippet configures the function with the
        settings it gives.
        """
        installExample(self)
        document = tomllib.loads(self.files["quota.toml"])
        config = buildConfig(document)
        functions = dict(configureFunctions(config, MemoryReactorClock()))
        self.assertEqual(list(functions), document["functions"])
        quota = functions["quota"]
        self.assertTrue(IFlowHandlerFactory.providedBy(quota))
        self.assertEqual(quota.maxBytes, document["function"]["quota"]["max-bytes"])
        self.assertEqual(
            [str(n) for n in quota.exempt], document["function"]["quota"]["exempt"]
        )

    def test_badSettingNamesKey(self) -> None:
        """
        A bad setting of the example function stops the service with a
        message that names C{function.quota.KEY}.
        """
        installExample(self)
        config = buildConfig(
            {"functions": ["quota"], "function": {"quota": {"max-bytes": 0}}}
        )
        error = self.assertRaises(
            ConfigError, configureFunctions, config, MemoryReactorClock()
        )
        self.assertTrue(str(error).startswith("function.quota.max-bytes: "), str(error))

    def test_exampleTestsPass(self) -> None:
        """
        The example's own tests pass.
        """
        installExample(self)
        module = importlib.import_module("test_example_quota")
        suite = pyunit.TestLoader().loadTestsFromModule(module)
        result = reporter.TestResult()
        suite.run(result)
        problems = [str(f) for _, f in result.errors + result.failures]
        self.assertEqual(problems, [])
        self.assertTrue(result.wasSuccessful())
        self.assertEqual(result.testsRun, suite.countTestCases())
        self.assertGreaterEqual(result.testsRun, 4)

    def test_testingKitNames(self) -> None:
        """
        Every C{harness.NAME} and C{driver.NAME} the guide's table of the
        testing kit shows exists on L{FlowHarness} and L{FlowDriver}.
        """
        from miniproxy import testing

        table = section(self.guide, "Testing with `miniproxy.testing`")
        names = re.findall(r"`(harness|driver)\.(\w+)", table)
        self.assertGreaterEqual(len(names), 15)
        for owner, name in names:
            cls = testing.FlowHarness if owner == "harness" else testing.FlowDriver
            if name in ("closedFlows", "drivers", "refusedAtAccept", "flow"):
                # Instance attributes, and the flow property.
                self.assertTrue(
                    name in cls.__init__.__code__.co_names or hasattr(cls, name),
                    f"{owner}.{name}",
                )
                continue
            self.assertTrue(hasattr(cls, name), f"{owner}.{name}")
        for name in re.findall(r"`(\w+)\(", table):
            if name[0].isupper() or name in ("configured",):
                self.assertTrue(hasattr(testing, name), name)

    def test_packaging(self) -> None:
        """
        The example's C{pyproject.toml} ships the implementation module and
        the dropin directory, and nothing else of the example but tests.
        """
        project = tomllib.loads(self.files["pyproject.toml"])
        setuptools = project["tool"]["setuptools"]
        self.assertEqual(setuptools["packages"], ["miniproxy.plugins"])
        topLevel = {
            name[: -len(".py")]
            for name in self.files
            if name.endswith(".py") and "/" not in name and not name.startswith("test_")
        }
        self.assertEqual(set(setuptools["py-modules"]), topLevel)
        self.assertIn("miniproxy", project["project"]["dependencies"])


class PluginGuideCommandTests(unittest.TestCase):
    """
    The commands the plugin guide gives work on the example distribution.
    """

    def run_(self, args: list[str], root: FilePath) -> Deferred:
        from twisted.internet import reactor
        from twisted.internet.utils import getProcessOutputAndValue

        # The repository first: under an editable install of miniproxy, a
        # "miniproxy" directory without __init__.py earlier on sys.path
        # would make miniproxy a namespace package (see the guide).
        pythonPath = os.pathsep.join([REPO.path, root.path])
        return getProcessOutputAndValue(
            sys.executable,
            args,
            env={**os.environ, "PYTHONPATH": pythonPath},
            path=root.path,
            reactor=reactor,
        )

    @defer.inlineCallbacks
    def test_listFunctions(self) -> Any:
        """
        C{twistd miniproxy --list-functions} lists the example function
        found on C{sys.path}, with its description.
        """
        root = installExample(self)
        out, err, code = yield self.run_(
            [
                "-c",
                "import sys; sys.argv[0] = 'twistd'; "
                "from twisted.scripts.twistd import run; run()",
                "miniproxy",
                "--list-functions",
            ],
            root,
        )
        output = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, output)
        lines = {line.split()[0]: line for line in output.splitlines() if line.strip()}
        self.assertIn("quota", lines, output)
        self.assertIn("Reset a flow once it carried more than max-bytes bytes.", lines["quota"])
        self.assertIn("split-tcp", lines, output)

    @defer.inlineCallbacks
    def test_trialCommand(self) -> Any:
        """
        The command the guide gives to run the example's tests passes.
        """
        root = installExample(self)
        out, err, code = yield self.run_(
            ["-m", "twisted.trial", "--temp-directory", root.child("_trial").path,
             "test_example_quota"],
            root,
        )
        output = (out + err).decode("utf-8", "replace")
        self.assertEqual(code, 0, output)
        self.assertRegex(output, r"PASSED \(successes=[1-9]")


# -- configuration.md ----------------------------------------------------------

#: The tables of the reference, by heading, and the dotted prefix of their keys.
REFERENCE_TABLES = {
    "Top-level keys": "",
    "`[limits]`": "limits",
    "`[[listeners]]`": "listeners",
    "`[control]`": "control",
    "`[log]`": "log",
    "`[function.split-tcp]`": "function.split-tcp",
    "`[function.policy]`": "function.policy",
    "`[[function.policy.rules]]`": "function.policy.rules",
}


class ConfigurationTests(unittest.SynchronousTestCase):
    """
    C{docs/configuration.md} documents what the code accepts.
    """

    def setUp(self) -> None:
        self.doc = readDoc("configuration.md")
        self.examples = [tomllib.loads(b) for b in fencedBlocks(self.doc, "toml")]

    def documentedKeys(self, title: str) -> set[str]:
        prefix = REFERENCE_TABLES[title]
        keys = set()
        for row in tableRows(section(self.doc, title)):
            key = ticked(row[0])
            self.assertIsNotNone(key, f"{title}: row without a key: {row}")
            keys.add(f"{prefix}.{key}" if prefix else key)
        return keys

    def test_examplesAccepted(self) -> None:
        """
        Every TOML example builds a configuration and a service (its
        functions configured and its endpoints parsed).
        """
        self.assertGreaterEqual(len(self.examples), 6)
        for document in self.examples:
            config = buildConfig(document)
            service = ProxyService(config, MemoryReactorClock())
            # The service shares the process's option emitter; let go of it.
            self.addCleanup(service.optionEmitter.release)
            self.assertEqual(
                [name for name, _ in service.functions],
                list(document.get("functions", [])),
            )
            self.assertEqual(len(service.listeners), len(config.listeners))

    def test_documentedKeysAreExampled(self) -> None:
        """
        Every key in the reference tables is used by an example (so it is
        accepted), and every key an example uses is in the reference.
        """
        documented: set[str] = set()
        for title in REFERENCE_TABLES:
            documented |= self.documentedKeys(title)
        used: set[str] = set()
        for document in self.examples:
            used |= flatKeys(document)
        # The table names themselves are documented by their headings.
        tables = {"limits", "listeners", "function", "function.split-tcp",
                  "function.policy", "control", "log"}
        self.assertEqual(documented - used, set())
        self.assertEqual(used - documented - tables, set())

    def test_keysKnownToCode(self) -> None:
        """
        The reference documents exactly the keys the config parser knows.
        """
        tables = {"limits", "listeners", "function", "control", "log"}
        self.assertEqual(
            self.documentedKeys("Top-level keys"), configModule._TOP_KEYS - tables
        )
        self.assertEqual(
            self.documentedKeys("`[limits]`"),
            {f"limits.{k}" for k in configModule._LIMIT_KEYS},
        )
        self.assertEqual(
            self.documentedKeys("`[[listeners]]`"),
            {f"listeners.{k}" for k in configModule._LISTENER_KEYS},
        )

    def test_limitDefaults(self) -> None:
        """
        The defaults in the C{[limits]} table are L{Limits}'s.
        """
        defaults = Limits()
        rows = tableRows(section(self.doc, "`[limits]`"))
        self.assertEqual(len(rows), len(configModule._LIMIT_KEYS))
        for row in rows:
            attribute, kind = configModule._LIMIT_KEYS[ticked(row[0]) or ""]
            documented = kind(ticked(row[1]) or "")
            self.assertEqual(documented, getattr(defaults, attribute), row)

    def test_commandLineOptions(self) -> None:
        """
        The command-line table lists exactly the options of
        C{twistd miniproxy}, with their short forms.
        """
        expected: dict[str, str] = {}
        for parameter in tap.Options.optParameters:
            expected[parameter[0]] = parameter[1] or ""
        for flag in tap.Options.optFlags:
            expected[flag[0]] = flag[1] or ""
        expected["listen"] = "l"
        expected["function"] = "f"
        self.assertTrue(hasattr(tap.Options, "opt_listen"))
        self.assertTrue(hasattr(tap.Options, "opt_function"))
        documented: dict[str, str] = {}
        for row in tableRows(section(self.doc, "Command line: `twistd miniproxy`")):
            option = ticked(row[0]) or ""
            self.assertTrue(option.startswith("--"), row)
            short = ticked(row[1]) or ""
            documented[option[2:]] = short[1:]
        self.assertEqual(documented, expected)

    def test_errorMessages(self) -> None:
        """
        The error messages the guide shows are the ones the code gives.
        """
        examples = []
        e = self.assertRaises(ConfigError, buildConfig, {"limits": {"max-buffer": 100}})
        examples.append(str(e))
        e = self.assertRaises(ConfigError, buildConfig, {}, to="udp:1.2.3.4:53")
        examples.append(str(e))
        config = buildConfig(
            {
                "to": "tcp:host=127.0.0.1:port=9",
                "functions": ["policy"],
                "function": {
                    "policy": {"rules": [{"action": "allow"},
                                         {"action": "allow", "ports": ["90-80"]}]}
                },
            }
        )
        e = self.assertRaises(ConfigError, configureFunctions, config, MemoryReactorClock())
        examples.append(str(e))
        for message in examples:
            self.assertIn(f"`{message}`", self.doc.replace("/etc/miniproxy.toml: ", ""))


# -- architecture.md -----------------------------------------------------------


class ArchitectureTests(unittest.SynchronousTestCase):
    """
    C{docs/architecture.md} names what exists.
    """

    def setUp(self) -> None:
        self.doc = readDoc("architecture.md")

    def test_moduleMapExists(self) -> None:
        """
        Every module the module map names exists.
        """
        rows = tableRows(section(self.doc, "Module map"))
        self.assertGreaterEqual(len(rows), 20)
        for row in rows:
            path = ticked(row[0])
            self.assertIsNotNone(path, row)
            self.assertTrue(REPO.preauthChild(path).isfile(), f"{path} does not exist")

    def test_accessLogFields(self) -> None:
        """
        The access-log line shown has the fields, in order, of the line the
        code writes.
        """
        from miniproxy.accesslog import _FORMAT

        shown = section(self.doc, "The access log")
        (line,) = [l for l in fencedBlocks(shown, "") if "outcome=" in l]
        fields = flowFields(self.closedFlow())
        written = _FORMAT.format(**fields)
        key = re.compile(r"(\S+)=")
        self.assertEqual(key.findall(line), key.findall(written))
        self.assertEqual(line.split()[1::2][:2], written.split()[1::2][:2])

    def closedFlow(self) -> Any:
        harness = FlowHarness()
        driver = harness.accept()
        driver.connectOutgoing()
        driver.clientSends(b"up")
        driver.serverSends(b"down")
        driver.clientHalfCloses()
        driver.serverHalfCloses()
        self.assertEqual(harness.closedFlows, [driver.flow])
        return driver.flow

    def test_outcomesDocumented(self) -> None:
        """
        The access-log table lists every outcome.
        """
        rows = tableRows(section(self.doc, "The access log"))
        (outcomeRow,) = [r for r in rows if ticked(r[0]) == "outcome"]
        listed = set(_TICKED.findall(outcomeRow[1]))
        self.assertEqual(listed, {o.value for o in Outcome})


# -- cache.md --------------------------------------------------------------------


@implementer(ICacheStore)
class MemoryStore:
    """
    A cache store in a dict; C{get} answers when the test says.
    """

    def __init__(self, responses: dict[bytes, bytes]) -> None:
        self.responses = dict(responses)
        self.lookups: list[Deferred] = []
        self.answerAtOnce = True

    def get(self, key: bytes) -> Deferred:
        if self.answerAtOnce:
            return succeed(self.responses.get(key))
        d: Deferred = Deferred()
        d.addCallback(lambda _: self.responses.get(key))
        self.lookups.append(d)
        return d

    def put(self, key: bytes, response: bytes) -> Deferred:
        self.responses[key] = response
        return succeed(None)


@implementer(ICachePolicy)
class LinePolicy:
    """
    Requests and responses are one line each; the request line is the key.
    """

    def requestKey(self, request: bytes) -> bytes | None:
        if request.startswith(b"!"):
            raise ValueError("malformed")
        line, newline, _ = request.partition(b"\n")
        return line if newline else None

    def responseComplete(self, response: bytes) -> bool:
        return response.count(b"\n") == 1 and response.endswith(b"\n")


class CacheSketchTests(unittest.SynchronousTestCase):
    """
    The handler sketched in C{docs/cache.md} behaves as the page says, on
    the real relay.
    """

    def setUp(self) -> None:
        code = markedFiles(readDoc("cache.md"))["cache_sketch.py"]
        namespace: dict[str, Any] = {"__name__": "cache_sketch"}
        exec(compile(code, "docs/cache.md", "exec"), namespace)
        self.store = MemoryStore({b"GET /cached": b"cached answer\n"})
        self.policy = LinePolicy()
        verifyObject(ICacheStore, self.store)
        verifyObject(ICachePolicy, self.policy)
        handler = namespace["CacheHandler"]
        self.harness = FlowHarness(
            [HandlerFactory("cache", lambda flow: handler(self.store, self.policy))],
            mode=ConnectMode.FIRST_DATA,
        )

    def test_hitNeverConnects(self) -> None:
        """
        A hit is answered by the handler and closed; no upstream connection
        is ever attempted.
        """
        driver = self.harness.accept()
        driver.clientSends(b"GET /cac")
        self.assertIsNone(driver.dialed)
        driver.clientSends(b"hed\n")
        self.assertEqual(driver.sentToClient(), b"cached answer\n")
        self.assertEqual(self.harness.dialer.attempts, [])
        self.assertTrue(driver.closed)
        fields = flowFields(driver.flow)
        self.assertEqual(
            (fields["outcome"], fields["startedBy"], fields["connectMs"],
             fields["bytesFromServer"]),
            ("ok", "-", "-", 0),
        )

    def test_missReleasesAndStores(self) -> None:
        """
        A miss releases the request upstream, relays the response and
        stores it; the next flow is a hit.
        """
        driver = self.harness.accept()
        driver.clientSends(b"GET /new\n")
        self.assertIsNotNone(driver.dialed)
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), b"GET /new\n")
        driver.serverSends(b"fresh\n")
        self.assertEqual(driver.sentToClient(), b"fresh\n")
        self.assertEqual(self.store.responses[b"GET /new"], b"fresh\n")
        second = self.harness.accept()
        second.clientSends(b"GET /new\n")
        self.assertEqual(second.sentToClient(), b"fresh\n")
        self.assertEqual(len(self.harness.dialer.attempts), 1)

    def test_heldHalfClose(self) -> None:
        """
        A FIN after the request, while the store looks, starts nothing; on
        a miss it follows the released request.
        """
        self.store.answerAtOnce = False
        driver = self.harness.accept()
        driver.clientSends(b"GET /slow\n")
        driver.clientHalfCloses()
        self.assertEqual(self.harness.dialer.attempts, [])
        self.store.lookups[0].callback(None)
        self.harness.flush()
        self.assertIsNotNone(driver.dialed)
        driver.connectOutgoing()
        self.assertEqual(driver.sentToServer(), b"GET /slow\n")
        self.assertTrue(driver.finSentToServer)

    def test_malformedPassesThrough(self) -> None:
        """
        A request the policy calls malformed goes upstream untouched.
        """
        driver = self.harness.accept()
        driver.clientSends(b"!odd")
        driver.connectOutgoing()
        driver.clientSends(b" more")
        self.assertEqual(driver.sentToServer(), b"!odd more")
        self.assertIs(driver.flow.outcome, None)
