"""Plugin registry: pluggy hooks + the `bilevel` entry-point group."""

from .hookspecs import hookimpl
from .manager import PluginInfo, Registry, build_registry, get_registry

__all__ = ["PluginInfo", "Registry", "build_registry", "get_registry", "hookimpl"]
