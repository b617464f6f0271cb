"""
The C{tproxy:} server endpoint string parser dropin, so that
C{serverFromString(reactor, "tproxy:port=8080")} makes a
L{miniproxy.endpoints.TransparentServerEndpoint}.

Keep it thin: L{miniproxy.endpoints} holds the parser, and imports no
reactor.
"""

from miniproxy.endpoints import TransparentServerParser

tproxyEndpointParser = TransparentServerParser()
