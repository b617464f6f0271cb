# -*- test-case-name: tests.test_wire_proxyv2 -*-
"""
The error every codec raises on bad input.
"""


class MalformedInput(ValueError):
    """
    Bytes that do not follow the format.  The message says what is wrong.
    """
