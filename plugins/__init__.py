"""
The dropin package of miniproxy's proxy functions, installed as
C{miniproxy.plugins}.

Each module here holds L{miniproxy.functions.base.FunctionMaker} objects (or
any objects providing L{twisted.plugin.IPlugin} and
L{miniproxy.interfaces.IProxyFunction}).  Third-party dropins go in a
C{miniproxy/plugins/} directory (without C{__init__.py}) anywhere on
C{sys.path}.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]
__all__: list[str] = []
