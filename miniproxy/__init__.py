"""
miniproxy: a pluggable split-TCP middlebox platform with early SYN hooks.

A proxied connection is a L{miniproxy.flow.Flow}: an accepted leg facing the
client and an outgoing leg facing the server (L{miniproxy.legs}).  Proxy
functions are plugins (L{miniproxy.interfaces.IProxyFunction}) whose hooks
run on every flow.  C{twistd miniproxy} runs the service
(L{miniproxy.tap}); L{miniproxy.testing} helps plugin authors test theirs.
"""

__version__ = "0.1.0.dev0"
