# -*- test-case-name: tests.test_config -*-
"""
Exceptions of miniproxy.
"""


class ConfigError(ValueError):
    """
    A configuration value is bad.  The message names the key and, when the
    value came from a file, the file.
    """


class FunctionError(LookupError):
    """
    A proxy function could not be found or loaded.
    """
