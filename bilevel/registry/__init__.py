"""Plugin registry: pluggy hooks + the `bilevel` entry-point group."""

from bilevel.registry.hookspecs import hookimpl
from bilevel.registry.manager import PluginInfo, Registry, build_registry, get_registry

__all__ = ["PluginInfo", "Registry", "build_registry", "get_registry", "hookimpl"]
