"""
The C{twistd miniproxy} dropin.  It imports nothing of miniproxy until the
command is used.
"""

from twisted.application.service import ServiceMaker

miniproxy = ServiceMaker(
    "miniproxy",
    "miniproxy.tap",
    "A split-TCP proxy with early SYN hooks and pluggable proxy functions.",
    "miniproxy",
)
