# -*- test-case-name: tests.test_connect -*-
"""
Starting an outgoing leg: from a L{NextHop} to a connected protocol.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint

from miniproxy.address import NextHop


def _tlsOptions(nextHop: NextHop) -> Any:
    from twisted.internet import ssl

    hostname = nextHop.tlsHostname or nextHop.address.host
    trustRoot = None
    if nextHop.caCertificates is not None:
        with open(nextHop.caCertificates, "rb") as f:
            pem = f.read()
        trustRoot = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(pem)]
        )
    return ssl.optionsForClientTLS(hostname, trustRoot=trustRoot)


class Dialer:
    """
    Connects outgoing legs.

    @ivar reactor: The reactor to connect with.
    @ivar timeout: Seconds a connection attempt may take.
    """

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout

    def endpointFor(self, nextHop: NextHop) -> IStreamClientEndpoint:
        """
        The client endpoint that reaches C{nextHop}: plain TCP to an address
        literal, happy-eyeballs to a name, wrapped in TLS (verified with
        service-identity) when asked.
        """
        host = nextHop.address.host
        port = nextHop.address.port
        bind = (nextHop.bindAddress, 0) if nextHop.bindAddress else None
        endpoint: IStreamClientEndpoint
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            endpoint = HostnameEndpoint(
                self.reactor,
                host.encode("idna"),
                port,
                timeout=self.timeout,
                bindAddress=bind,
            )
        else:
            cls = TCP4ClientEndpoint if ip.version == 4 else TCP6ClientEndpoint
            endpoint = cls(
                self.reactor, host, port, timeout=self.timeout, bindAddress=bind
            )
        if nextHop.tls:
            endpoint = wrapClientTLS(_tlsOptions(nextHop), endpoint)
        return endpoint

    def connect(self, nextHop: NextHop, factory: IProtocolFactory) -> Deferred:
        """
        Connect to C{nextHop} with C{factory}.

        @return: A cancellable L{Deferred} that fires with the protocol, or
            fails (with L{twisted.internet.error.TimeoutError} on timeout).
        """
        try:
            return self.endpointFor(nextHop).connect(factory)
        except Exception:
            from twisted.internet.defer import fail

            return fail()
