"""
The built-in proxy functions.
"""

from miniproxy.functions.base import FunctionMaker

splitTCP = FunctionMaker(
    "split-tcp",
    "miniproxy.functions.splittcp",
    "Split-TCP relay tuning: TCP_NODELAY and a send buffer of twice the "
    "receive window on both legs.",
)

policy = FunctionMaker(
    "policy",
    "miniproxy.functions.policy",
    "Per-flow policy: allow or deny by source and destination CIDR and port, "
    "choose the next hop or chain, limit flows per source.",
)
