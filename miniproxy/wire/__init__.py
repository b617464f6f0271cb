"""
Pure codecs, no I/O: bytes in, objects out, and back.

 - L{miniproxy.wire.proxyv2}: the PROXY protocol version 2 header (HAProxy's
   spec): a streaming parser and a writer.
 - L{miniproxy.wire.tcpoption}: the TCP option carrying a flow's addresses
   in its SYN (RFC 6994 experimental option).
 - L{miniproxy.wire.packet}: IPv4/IPv6 and TCP headers of a captured SYN.
"""
