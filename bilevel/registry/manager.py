"""Discovers plugins through the `bilevel` entry-point group and keeps them by kind and name.

A plugin that fails to import or register is recorded (and shown by `bilevel plugins`) while the rest keep
working; BILEVEL_STRICT_PLUGINS=1 re-raises instead.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from bilevel.core.errors import BilevelError
from bilevel.registry import hookspecs

KINDS = ("pruner", "unlearner", "solver", "world", "attack")
HOOK_FOR_KIND = {
    "pruner": "register_pruners",
    "unlearner": "register_unlearners",
    "solver": "register_solvers",
    "world": "register_worlds",
    "attack": "register_attacks",
}
STRICT_ENV = "BILEVEL_STRICT_PLUGINS"


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    cls: type
    source: str  # distribution (package) that registered it
    version: str

    def config_fields(self) -> dict[str, Any]:
        """Each option's default; a sub-model option (e.g. a prompt mapping) as its dict."""
        out = {}
        for k, f in self.cls.Config.model_fields.items():
            value = f.get_default(call_default_factory=True)
            out[k] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return out


@dataclass
class LoadFailure:
    source: str
    error: str


@dataclass
class Registry:
    plugins: dict[str, dict[str, PluginInfo]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failures: list[LoadFailure] = field(default_factory=list)
    conflicts: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def names(self, kind: str) -> list[str]:
        return sorted(self.plugins[kind])

    def get(self, kind: str, name: str) -> PluginInfo:
        if (kind, name) in self.conflicts:
            raise BilevelError(
                f"two plugins claim {kind} {name!r}: {' and '.join(self.conflicts[(kind, name)])}; uninstall one"
            )
        found = self.plugins[kind].get(name)
        if found is None:
            available = self.names(kind)
            close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise BilevelError(f"unknown {kind} {name!r}; available: {', '.join(available) or 'none'}{hint}")
        return found

    def create(self, kind: str, name: str, options: dict[str, Any] | None = None) -> Any:
        """Instantiate a plugin with validated options (unknown or invalid options are one-line errors)."""
        info = self.get(kind, name)
        return info.cls(validate_options(info, options or {}))


def validate_options(info: PluginInfo, options: dict[str, Any]) -> BaseModel:
    """The plugin's Config from user options; unknown keys are refused even where a plugin's Config would ignore
    them, so a typo never silently runs with a default."""
    fields = info.cls.Config.model_fields
    known = set(fields) | {f.alias for f in fields.values() if f.alias}
    unknown = sorted(set(options) - known)
    if unknown:
        accepted = ", ".join(fields) or "none"
        raise BilevelError(f"{info.kind} {info.name!r} has no option {unknown[0]!r}; options: {accepted}")
    try:
        return info.cls.Config(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "options"
        accepted = ", ".join(info.cls.Config.model_fields) or "none"
        raise BilevelError(
            f"{info.kind} {info.name!r} option {where}: {err['msg']} (got {err.get('input')!r}); options: {accepted}"
        ) from None


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "").lower() in {"1", "true", "yes"}


def _check_plugin_class(kind: str, cls: type) -> None:
    from bilevel import PLUGIN_API_VERSION
    from bilevel.core.attack import Attack
    from bilevel.core.interfaces import PLUGIN_BASES, PluginConfig, SolverConfig
    from bilevel.core.world import WorldPlugin

    base = {**PLUGIN_BASES, "world": WorldPlugin, "attack": Attack}[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{cls!r} registered as a {kind} but does not subclass {base.__name__}")
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no `name`")
    what = f"{kind} {cls.name!r} ({cls.__module__}.{cls.__qualname__})"
    if "api_version" not in vars(cls):  # declared by the class itself, never inherited: the check must be able to fire
        raise TypeError(
            f"{what} declares no api_version; add `api_version = {PLUGIN_API_VERSION}` if it is written for this bilevel"
        )
    if cls.api_version != PLUGIN_API_VERSION:
        raise TypeError(f"{what} targets plugin API {cls.api_version}, this bilevel provides {PLUGIN_API_VERSION}")
    config_base = SolverConfig if kind == "solver" else PluginConfig
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, config_base)):
        raise TypeError(f"{what}: Config must subclass bilevel.core.interfaces.{config_base.__name__}")


def build_registry(extra_modules: dict[str, ModuleType] | None = None) -> Registry:
    """Load every entry point in the `bilevel` group (plus `extra_modules`, for tests) and collect plugins."""
    registry = Registry()
    pm = pluggy.PluginManager("bilevel")
    pm.add_hookspecs(hookspecs)
    sources: dict[str, tuple[str, str]] = {}
    candidates: list[tuple[str, str, str, Any]] = []
    for ep in entry_points(group="bilevel"):
        dist = getattr(ep, "dist", None)
        candidates.append((ep.name, dist.name if dist else "?", dist.version if dist else "?", ep))
    for name, module in (extra_modules or {}).items():
        candidates.append((name, name, "local", module))
    for ep_name, dist_name, version, target in candidates:
        try:
            module = target.load() if hasattr(target, "load") and not isinstance(target, ModuleType) else target
            pm.register(module, name=f"{dist_name}:{ep_name}")
            sources[f"{dist_name}:{ep_name}"] = (dist_name, version)
        except Exception as exc:  # a broken third-party plugin must not take the others down
            if _strict():
                raise
            registry.failures.append(LoadFailure(f"{dist_name}:{ep_name}", f"{type(exc).__name__}: {exc}"))
    for kind in KINDS:
        caller = getattr(pm.hook, HOOK_FOR_KIND[kind])
        for impl in caller.get_hookimpls():
            dist_name, version = sources.get(impl.plugin_name, (impl.plugin_name, "?"))

            def register(cls: type, _kind: str = kind, _src: str = dist_name, _ver: str = version) -> None:
                _check_plugin_class(_kind, cls)
                _add(registry, PluginInfo(_kind, cls.name, cls, _src, _ver))

            try:
                impl.function(register=register)
            except Exception as exc:
                if _strict():
                    raise
                registry.failures.append(LoadFailure(impl.plugin_name, f"{type(exc).__name__}: {exc}"))
    for cls in _IN_PROCESS:  # bilevel.register(...) from a notebook or script
        _add(registry, PluginInfo(cls.kind, cls.name, cls, IN_PROCESS, "local"))
    if _strict() and registry.conflicts:
        (kind, name), owners = next(iter(registry.conflicts.items()))
        raise BilevelError(f"two plugins claim {kind} {name!r}: {' and '.join(owners)}")
    return registry


def _add(registry: Registry, info: PluginInfo) -> None:
    existing = registry.plugins[info.kind].get(info.name)
    key = (info.kind, info.name)
    if key in registry.conflicts:
        registry.conflicts[key].append(f"{info.source} ({info.cls.__module__})")
    elif existing is not None and existing.cls is not info.cls:
        registry.conflicts[key] = [f"{existing.source} ({existing.cls.__module__})", f"{info.source} ({info.cls.__module__})"]
        del registry.plugins[info.kind][info.name]
    else:
        registry.plugins[info.kind][info.name] = info


_REGISTRY: Registry | None = None
#: plugin classes registered in this process with `bilevel.register` (kept across registry rebuilds)
_IN_PROCESS: list[type] = []
IN_PROCESS = "in-process"


def register(cls: type) -> type:
    """Register a plugin class in this process (notebooks, scripts), as an entry point would; usable as a class
    decorator. The class is checked like any plugin (kind, name, Config, api_version): a problem is one line."""
    kind = getattr(cls, "kind", None)
    if kind not in KINDS:
        raise BilevelError(
            f"{getattr(cls, '__name__', cls)!r} is not a plugin class; subclass bilevel.Pruner, Unlearner, "
            "BilevelSolver, WorldPlugin or Attack"
        )
    try:
        _check_plugin_class(kind, cls)
    except TypeError as exc:
        raise BilevelError(str(exc)) from None
    _IN_PROCESS[:] = [c for c in _IN_PROCESS if not (c.kind == kind and c.name == cls.name)] + [cls]
    if _REGISTRY is not None:
        _REGISTRY.plugins[kind].pop(cls.name, None)  # re-registering a name (a notebook cell run twice) replaces it
        _add(_REGISTRY, PluginInfo(kind, cls.name, cls, IN_PROCESS, "local"))
    return cls


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY
