"""bilevel: prune a text-to-image diffusion UNet and keep unwanted concepts out of it in one training phase.

The public API for plugin authors is importable from here (lazily, so `bilevel plugins` stays fast): `hookimpl`,
the plugin bases (`Pruner`, `Unlearner`, `BilevelSolver`, `WorldPlugin`, `Attack`) and their configs, the data
they exchange (`UnlearnContext`, `CalibrationBatch`, `PruneResult`, `BilevelProblem`, `Objective`, `FeaturePair`), the World
protocol (`World`, `Evaluation`, `EvalOutput`), `BilevelError`, `register` (in-process registration) and
`load_pipeline`; helpers built-ins use are in `bilevel.toolkit`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
#: Plugins declare the API major version they were written for; a different major is refused.
#: 2: Unlearner.draw/loss(ctx, batch) (was loss(ctx, batch_size, generator)), SolverConfig.coupling, PluginConfig,
#: api_version required on every plugin class.
PLUGIN_API_VERSION = 2
#: Saved run configs carry this; a config from a newer major version is refused.
CONFIG_VERSION = 1


_PUBLIC = {
    "hookimpl": "bilevel.registry.hookspecs",
    "Plugin": "bilevel.core.interfaces",
    "PluginConfig": "bilevel.core.interfaces",
    "SolverConfig": "bilevel.core.interfaces",
    "Pruner": "bilevel.core.interfaces",
    "Unlearner": "bilevel.core.interfaces",
    "BilevelSolver": "bilevel.core.interfaces",
    "UnlearnContext": "bilevel.core.interfaces",
    "CalibrationBatch": "bilevel.core.interfaces",
    "PruneResult": "bilevel.core.interfaces",
    "BilevelProblem": "bilevel.core.interfaces",
    "Objective": "bilevel.core.interfaces",
    "FeaturePair": "bilevel.core.interfaces",
    "WorldPlugin": "bilevel.core.world",
    "Attack": "bilevel.core.attack",
    "AttackConfig": "bilevel.core.attack",
    "AttackResult": "bilevel.core.attack",
    "World": "bilevel.core.world",
    "WorldData": "bilevel.core.world",
    "Evaluation": "bilevel.core.world",
    "EvalOutput": "bilevel.core.world",
    "BilevelError": "bilevel.core.errors",
    "RunConfig": "bilevel.core.config",
    "toolkit": "bilevel.toolkit",
}
__all__ = [
    "CONFIG_VERSION",
    "PLUGIN_API_VERSION",
    "Attack",
    "AttackConfig",
    "AttackResult",
    "BilevelError",
    "BilevelProblem",
    "BilevelSolver",
    "CalibrationBatch",
    "EvalOutput",
    "Evaluation",
    "FeaturePair",
    "Objective",
    "Plugin",
    "PluginConfig",
    "PruneResult",
    "Pruner",
    "RunConfig",
    "SolverConfig",
    "UnlearnContext",
    "Unlearner",
    "World",
    "WorldData",
    "WorldPlugin",
    "__version__",
    "hookimpl",
    "load_pipeline",
    "register",
    "toolkit",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'bilevel' has no attribute {name!r}")
    return import_module(module) if name == "toolkit" else getattr(import_module(module), name)


def register(cls: type) -> type:
    """Register a plugin class in this process (a notebook, a script): `bilevel.register(MyUnlearner)` or as a
    class decorator. Runs and commands in this process then find it by name, like an installed plugin."""
    from bilevel.registry.manager import register as _register

    return _register(cls)


def load_pipeline(folder: Any, device: str = "cpu") -> Any:
    """Load a pipeline folder written by `bilevel export` (channel-pruned students included); see bilevel.commands.export."""
    from bilevel.commands.export import load_pipeline as _load

    return _load(folder, device)
