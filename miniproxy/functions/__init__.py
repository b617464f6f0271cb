"""
The built-in proxy functions, and what every function is made of.

 - L{miniproxy.functions.base}: L{FlowHandler} and L{FunctionMaker}, the
   pieces a function author starts from.
 - L{miniproxy.functions.discovery}: finding installed functions.
 - L{miniproxy.functions.splittcp}: the relay's TCP tuning.
 - L{miniproxy.functions.policy}: per-flow allow/deny, next hops, limits.
"""
