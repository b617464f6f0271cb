"""
Tests for L{miniproxy.endpoints}: the C{tproxy:} server endpoint and its
string parser.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
    quoteStringArgument,
    serverFromString,
)
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.plugin import IPlugin, getPlugins
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from miniproxy.endpoints import (
    CAPABILITY_MESSAGE,
    DEFAULT_BACKLOG,
    IP_TRANSPARENT,
    IPV6_TRANSPARENT,
    EndpointStringError,
    TransparentServerEndpoint,
    TransparentServerParser,
)
from miniproxy.service import withBacklog

#: The repository's root, which a C{twistd} subprocess needs on its path.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Deterministic Hypothesis settings for these tests.
HYPOTHESIS = settings(derandomize=True, deadline=None, max_examples=200)


def ipv4() -> st.SearchStrategy[str]:
    """
    IPv4 address literals.
    """
    return st.ip_addresses(v=4).map(str)


def ipv6() -> st.SearchStrategy[str]:
    """
    IPv6 address literals.
    """
    return st.ip_addresses(v=6).map(str)


class ParserTests(unittest.TestCase):
    """
    C{tproxy:} descriptions, through L{serverFromString}.
    """

    def parse(self, description: str) -> Any:
        return serverFromString(MemoryReactor(), description)

    def assertBad(self, description: str, *fragments: str) -> EndpointStringError:
        """
        Assert that C{description} is refused with a L{ValueError} (as
        L{serverFromString} raises) whose message has each of C{fragments}
        and shows the syntax.
        """
        e = self.assertRaises(EndpointStringError, self.parse, description)
        self.assertIsInstance(e, ValueError)
        message = str(e)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertIn("tproxy:port=PORT[:interface=ADDRESS][:backlog=N]", message)
        return e

    def test_plugin(self) -> None:
        """
        The dropin provides a parser plugin for the C{tproxy} prefix.
        """
        parsers = [
            p
            for p in getPlugins(IStreamServerEndpointStringParser)
            if p.prefix == "tproxy"
        ]
        self.assertEqual(len(parsers), 1)
        self.assertIsInstance(parsers[0], TransparentServerParser)
        self.assertTrue(verifyObject(IStreamServerEndpointStringParser, parsers[0]))
        self.assertTrue(IPlugin.providedBy(parsers[0]))

    def test_defaults(self) -> None:
        """
        Only the port is needed: it binds C{0.0.0.0} (IPv4) with a backlog
        of L{DEFAULT_BACKLOG}.
        """
        endpoint = self.parse("tproxy:port=8080")
        self.assertIsInstance(endpoint, TransparentServerEndpoint)
        self.assertTrue(verifyObject(IStreamServerEndpoint, endpoint))
        self.assertEqual(
            (endpoint.port, endpoint.interface, endpoint.backlog, endpoint.addressFamily),
            (8080, "0.0.0.0", DEFAULT_BACKLOG, socket.AF_INET),
        )

    def test_positionalPort(self) -> None:
        """
        The port may be given positionally, as with C{tcp:}.
        """
        endpoint = self.parse("tproxy:3128:interface=10.0.0.1")
        self.assertEqual((endpoint.port, endpoint.interface), (3128, "10.0.0.1"))

    def test_ipv6(self) -> None:
        """
        An interface with colons (escaped in the description) makes an IPv6
        endpoint.
        """
        endpoint = self.parse(r"tproxy:port=8080:interface=\:\::backlog=7")
        self.assertEqual(
            (endpoint.interface, endpoint.backlog, endpoint.addressFamily),
            ("::", 7, socket.AF_INET6),
        )

    def test_serviceBacklog(self) -> None:
        """
        The service's default backlog (L{withBacklog}) is understood.
        """
        endpoint = self.parse(withBacklog("tproxy:port=8080", 4096))
        self.assertEqual(endpoint.backlog, 4096)

    @HYPOTHESIS
    @given(
        port=st.integers(0, 65535),
        interface=st.one_of(st.none(), ipv4(), ipv6()),
        backlog=st.one_of(st.none(), st.integers(1, 65535)),
        positional=st.booleans(),
    )
    def test_validRoundTrip(
        self, port: int, interface: str | None, backlog: int | None, positional: bool
    ) -> None:
        """
        Every valid combination of values is parsed back to them.
        """
        parts = ["tproxy", str(port) if positional else f"port={port}"]
        if interface is not None:
            parts.append(f"interface={quoteStringArgument(interface)}")
        if backlog is not None:
            parts.append(f"backlog={backlog}")
        endpoint = self.parse(":".join(parts))
        expectedInterface = interface if interface is not None else "0.0.0.0"
        self.assertEqual(
            (endpoint.port, endpoint.interface, endpoint.backlog, endpoint.addressFamily),
            (
                port,
                expectedInterface,
                backlog if backlog is not None else DEFAULT_BACKLOG,
                socket.AF_INET6 if ":" in expectedInterface else socket.AF_INET,
            ),
        )

    @HYPOTHESIS
    @given(st.text(max_size=8))
    def test_anyPortText(self, text: str) -> None:
        """
        Any text given as the port is either a port from 0 to 65535 written
        in digits, or refused with L{EndpointStringError}: nothing else.
        """
        description = f"tproxy:port={quoteStringArgument(text)}"
        if text.isascii() and text.isdigit() and int(text) <= 65535:
            self.assertEqual(self.parse(description).port, int(text))
        else:
            self.assertRaises(EndpointStringError, self.parse, description)

    @HYPOTHESIS
    @given(st.text(min_size=1, max_size=20))
    def test_anyInterfaceText(self, text: str) -> None:
        """
        Any text given as the interface is either an IP address literal, or
        refused with L{EndpointStringError}.
        """
        import ipaddress

        description = f"tproxy:port=1:interface={quoteStringArgument(text)}"
        try:
            ipaddress.ip_address(text)
        except ValueError:
            self.assertRaises(EndpointStringError, self.parse, description)
        else:
            self.assertEqual(self.parse(description).interface, text)

    def test_missingPort(self) -> None:
        """
        A description without a port says the port is missing.
        """
        for description in ("tproxy", "tproxy:", "tproxy:interface=127.0.0.1"):
            self.assertBad(description, "missing port")

    def test_badPort(self) -> None:
        """
        A port that is not a whole number from 0 to 65535 is refused, and the
        message shows it.
        """
        for value in ("http", "-1", "65536", "80.0", " 80", "0x50", "１２"):
            self.assertBad(
                f"tproxy:port={quoteStringArgument(value)}", "port must be", repr(value)
            )

    def test_badBacklog(self) -> None:
        """
        A backlog must be a whole number from 1 to 65535.
        """
        for value in ("0", "many", "65536", "-5"):
            self.assertBad(f"tproxy:port=80:backlog={value}", "backlog must be", repr(value))

    def test_badInterface(self) -> None:
        """
        The interface must be an IP literal, not a name.
        """
        self.assertBad(
            "tproxy:port=80:interface=localhost", "interface must be", "'localhost'"
        )
        self.assertBad("tproxy:port=80:interface=", "interface must be")
        self.assertBad("tproxy:port=80:interface=300.1.1.1", "'300.1.1.1'")

    def test_unknownParameter(self) -> None:
        """
        An unknown parameter is refused, naming it and the known ones.
        """
        self.assertBad(
            "tproxy:port=80:mode=early",
            "unknown parameter 'mode'",
            "known: port, interface, backlog",
        )

    def test_portTwice(self) -> None:
        """
        A port given both positionally and as C{port=}, or two positional
        parts, is refused.
        """
        self.assertBad("tproxy:80:port=81", "port is given twice")
        self.assertBad("tproxy:80:81", "too many positional parts")

    def test_constructorChecks(self) -> None:
        """
        The endpoint checks values given to it directly too.
        """
        self.assertRaises(
            EndpointStringError, TransparentServerEndpoint, MemoryReactor(), 70000
        )
        self.assertRaises(
            EndpointStringError,
            TransparentServerEndpoint,
            MemoryReactor(),
            80,
            "0.0.0.0",
            True,
        )


class FakeSocket:
    """
    Records what is done to a socket; fails where told to.

    @ivar calls: The calls, as tuples: the method's name and arguments.
    @ivar failures: Maps the start of a call tuple, such as C{("bind",)} or
        C{("setsockopt", SOL_IP, IP_TRANSPARENT)}, to the L{OSError} that
        call raises.
    """

    nextFileno = 1000

    def __init__(
        self, family: int, type: int, failures: dict[tuple[Any, ...], OSError]
    ) -> None:
        self.family = family
        self.type = type
        self.failures = failures
        self.calls: list[tuple[Any, ...]] = []
        self.closed = False
        FakeSocket.nextFileno += 1
        self._fileno = FakeSocket.nextFileno

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        for start, exception in self.failures.items():
            if call[: len(start)] == start:
                raise exception

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self._call("setsockopt", level, option, value)

    def bind(self, address: tuple[Any, ...]) -> None:
        self._call("bind", address)

    def listen(self, backlog: int) -> None:
        self._call("listen", backlog)

    def setblocking(self, flag: bool) -> None:
        self._call("setblocking", flag)

    def fileno(self) -> int:
        return self._fileno

    def close(self) -> None:
        self.closed = True


class FailingReactor(MemoryReactor):
    """
    A reactor that cannot adopt a port.
    """

    def adoptStreamPort(self, fileno: int, addressFamily: int, factory: Any) -> Any:
        raise error.UnsupportedAddressFamily(addressFamily)


class ListenTests(unittest.TestCase):
    """
    L{TransparentServerEndpoint.listen} with fake sockets: what it sets up,
    and that it always closes its socket.
    """

    def endpoint(
        self,
        interface: str = "0.0.0.0",
        reactor: Any = None,
        failures: dict[tuple[Any, ...], OSError] | None = None,
    ) -> tuple[TransparentServerEndpoint, list[FakeSocket]]:
        made: list[FakeSocket] = []

        def makeSocket(family: int, type: int) -> FakeSocket:
            s = FakeSocket(family, type, failures or {})
            made.append(s)
            return s

        endpoint = TransparentServerEndpoint(
            reactor if reactor is not None else MemoryReactor(), 8080, interface, 77
        )
        endpoint._socketFactory = makeSocket
        return endpoint, made

    def test_ipv4(self) -> None:
        """
        An IPv4 endpoint sets C{SO_REUSEADDR} and C{IP_TRANSPARENT}, binds,
        listens with the backlog, goes non-blocking, has the reactor adopt
        the descriptor, and closes its own copy.
        """
        reactor = MemoryReactor()
        endpoint, made = self.endpoint("10.1.2.3", reactor)
        factory = Factory()
        port = self.successResultOf(endpoint.listen(factory))
        [sock] = made
        self.assertEqual((sock.family, sock.type), (socket.AF_INET, socket.SOCK_STREAM))
        self.assertEqual(
            sock.calls,
            [
                ("setsockopt", socket.SOL_SOCKET, socket.SO_REUSEADDR, 1),
                ("setsockopt", socket.SOL_IP, IP_TRANSPARENT, 1),
                ("bind", ("10.1.2.3", 8080)),
                ("listen", 77),
                ("setblocking", False),
            ],
        )
        self.assertEqual(reactor.adoptedPorts, [(sock.fileno(), socket.AF_INET, factory)])
        self.assertTrue(sock.closed)
        self.assertIsNotNone(port)

    def test_ipv6(self) -> None:
        """
        An IPv6 endpoint sets C{IPV6_TRANSPARENT} and binds an IPv6
        address.
        """
        reactor = MemoryReactor()
        endpoint, made = self.endpoint("fd00::1", reactor)
        self.successResultOf(endpoint.listen(Factory()))
        [sock] = made
        self.assertEqual(sock.family, socket.AF_INET6)
        self.assertIn(("setsockopt", socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1), sock.calls)
        self.assertIn(("bind", ("fd00::1", 8080, 0, 0)), sock.calls)
        self.assertEqual(reactor.adoptedPorts[0][1], socket.AF_INET6)
        self.assertTrue(sock.closed)

    def test_noCapability(self) -> None:
        """
        C{EPERM} from C{IP_TRANSPARENT} fails the listen with a
        L{CannotListenError} that says C{CAP_NET_ADMIN} is needed; the socket
        is closed and nothing adopted.
        """
        reactor = MemoryReactor()
        endpoint, made = self.endpoint(
            reactor=reactor,
            failures={
                ("setsockopt", socket.SOL_IP, IP_TRANSPARENT): PermissionError(
                    errno.EPERM, "Operation not permitted"
                )
            },
        )
        f = self.failureResultOf(endpoint.listen(Factory()), error.CannotListenError)
        self.assertIsInstance(f.value.socketError, PermissionError)
        self.assertEqual(f.value.socketError.errno, errno.EPERM)
        self.assertIn("IP_TRANSPARENT needs CAP_NET_ADMIN", str(f.value))
        self.assertIn(CAPABILITY_MESSAGE, str(f.value))
        self.assertEqual((f.value.interface, f.value.port), ("0.0.0.0", 8080))
        self.assertTrue(made[0].closed)
        self.assertEqual(reactor.adoptedPorts, [])

    def test_otherSetsockoptError(self) -> None:
        """
        Another error from C{setsockopt} is a plain L{CannotListenError}.
        """
        endpoint, made = self.endpoint(
            failures={("setsockopt",): OSError(errno.ENOPROTOOPT, "Protocol not available")}
        )
        f = self.failureResultOf(endpoint.listen(Factory()), error.CannotListenError)
        self.assertEqual(f.value.socketError.errno, errno.ENOPROTOOPT)
        self.assertNotIn("CAP_NET_ADMIN", str(f.value))
        self.assertTrue(made[0].closed)

    def test_addressInUse(self) -> None:
        """
        A bind error fails the listen with L{CannotListenError}, closing the
        socket.
        """
        endpoint, made = self.endpoint(
            failures={("bind",): OSError(errno.EADDRINUSE, "Address already in use")}
        )
        f = self.failureResultOf(endpoint.listen(Factory()), error.CannotListenError)
        self.assertEqual(f.value.socketError.errno, errno.EADDRINUSE)
        self.assertIn("0.0.0.0:8080", str(f.value))
        self.assertTrue(made[0].closed)

    def test_socketFails(self) -> None:
        """
        When no socket can be made the listen fails with
        L{CannotListenError}.
        """
        endpoint = TransparentServerEndpoint(MemoryReactor(), 8080)

        def noSocket(family: int, type: int) -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        endpoint._socketFactory = noSocket
        f = self.failureResultOf(endpoint.listen(Factory()), error.CannotListenError)
        self.assertEqual(f.value.socketError.errno, errno.EMFILE)

    def test_adoptFails(self) -> None:
        """
        If the reactor cannot adopt the socket, the listen fails with its
        error and the socket is closed.
        """
        endpoint, made = self.endpoint(reactor=FailingReactor())
        self.failureResultOf(endpoint.listen(Factory()), error.UnsupportedAddressFamily)
        self.assertTrue(made[0].closed)


def openFiles() -> dict[int, str]:
    """
    This process's open descriptors and what each is (for messages).
    """
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # The directory listed.
    return found


def _skipUnlessRoot() -> None:
    if os.geteuid() != 0:
        raise unittest.SkipTest("IP_TRANSPARENT needs root (CAP_NET_ADMIN)")


@implementer(IHalfCloseableProtocol)
class Echo(Protocol):
    """
    Writes back what it reads, and a FIN after a FIN; fires its factory's
    C{closed} when its connection is closed.
    """

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.factory.closed.callback(reason.value)  # type: ignore[attr-defined]


class Collector(Protocol):
    """
    Sends C{payload} and a FIN; fires C{done} with what it read once the
    connection is closed.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(b"".join(self.chunks))


class LoopbackTests(unittest.TestCase):
    """
    The endpoint on real loopback sockets, in this (root) namespace.
    """

    timeout = 30

    def setUp(self) -> None:
        _skipUnlessRoot()

    @defer.inlineCallbacks
    def roundTrip(self, interface: str, clientEndpointClass: Any) -> Any:
        from twisted.internet import reactor

        payload = bytes(range(256)) * 512
        factory = Factory.forProtocol(Echo)
        factory.closed = defer.Deferred()  # type: ignore[attr-defined]
        endpoint = serverFromString(
            reactor, f"tproxy:port=0:interface={quoteStringArgument(interface)}"
        )
        # Twisted opens a spare descriptor (/dev/null, for EMFILE) at its
        # first listen and keeps it: have that happen before counting.
        warmUp = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        yield warmUp.stopListening()
        before = openFiles()
        port = yield endpoint.listen(factory)
        try:
            handle = port.socket
            level = socket.IPPROTO_IPV6 if ":" in interface else socket.SOL_IP
            option = IPV6_TRANSPARENT if ":" in interface else IP_TRANSPARENT
            self.assertEqual(handle.getsockopt(level, option), 1)
            self.assertEqual(handle.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR), 1)
            self.assertEqual(port.getHost().host, interface)
            # The endpoint closed its copy: one more descriptor, the port's.
            self.assertEqual(len(openFiles()), len(before) + 1, (before, openFiles()))
            client = Collector(payload)
            yield connectProtocol(
                clientEndpointClass(reactor, interface, port.getHost().port), client
            )
            received = yield client.done
            reason = yield factory.closed
        finally:
            yield port.stopListening()
        self.assertEqual(received, payload)
        self.assertIsInstance(reason, error.ConnectionDone)
        self.assertEqual(len(openFiles()), len(before), (before, openFiles()))

    def test_ipv4(self) -> None:
        """
        A C{tproxy} listener on 127.0.0.1 has C{IP_TRANSPARENT} set, accepts
        a connection and relays its bytes, and leaks no descriptor.
        """
        return self.roundTrip("127.0.0.1", TCP4ClientEndpoint)

    def test_ipv6(self) -> None:
        """
        The same on C{::1} with C{IPV6_TRANSPARENT}.
        """
        if not socket.has_ipv6 or not os.path.exists("/proc/net/if_inet6"):
            raise unittest.SkipTest("no IPv6 in this namespace")
        return self.roundTrip("::1", TCP6ClientEndpoint)

    @defer.inlineCallbacks
    def test_twistdWithoutCapability(self) -> Any:
        """
        C{twistd miniproxy} with a C{tproxy} listener, run without any
        capability, exits with an error saying C{IP_TRANSPARENT} needs
        C{CAP_NET_ADMIN}.
        """
        from twisted.internet import reactor
        from twisted.internet.utils import getProcessOutputAndValue

        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise unittest.SkipTest("setpriv (util-linux) is not installed")
        out, err, code = yield getProcessOutputAndValue(
            setpriv,
            [
                "--bounding-set=-all",
                "--inh-caps=-all",
                sys.executable,
                "-c",
                "import sys; sys.argv[0] = 'twistd'; "
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "miniproxy",
                "--listen",
                "tproxy:port=0:interface=127.0.0.1",
            ],
            env={**os.environ, "PYTHONPATH": REPO},
            reactor=reactor,
        )
        output = (out + err).decode("utf-8", "replace")
        self.assertNotEqual(code, 0, output)
        self.assertIn("IP_TRANSPARENT needs CAP_NET_ADMIN", output)
