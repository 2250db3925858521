"""Which world serves a model, and building it. Commands ask here and stay world-agnostic.

`world.name` in the config picks a world plugin explicitly; otherwise every registered world is asked whether it
serves `model.source`, highest priority first (the tiny world claims 'tiny' and tiny pipeline folders, Stable
Diffusion claims other pipeline folders and hub ids; a third-party world can claim its own sources).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bilevel.core.config import RunConfig
from bilevel.core.errors import BilevelError
from bilevel.core.world import EvalOutput, Purpose, World, WorldPlugin, missing_world_attributes


def world_plugin(config: RunConfig) -> WorldPlugin:
    """The world plugin serving config.model.source (or the one config.world.name names)."""
    from bilevel.registry import get_registry

    reg = get_registry()
    if config.world.name is not None:
        return reg.create("world", config.world.name, config.world.options)
    infos = sorted(reg.plugins["world"].values(), key=lambda i: (-i.cls.priority, i.name))
    source = config.model.source
    for info in infos:
        plugin = reg.create("world", info.name, config.world.options if config.world.options else {})
        if plugin.accepts(source):
            return plugin
    names = ", ".join(i.name for i in infos) or "none"
    path = Path(source).expanduser()
    if path.is_dir():
        raise BilevelError(
            f"{path} is not a diffusers pipeline folder (no model_index.json) and no world claims it; "
            f"pick one with --world NAME (worlds: {names})"
        )
    if not path.exists() and ("/" in source or source.startswith((".", "~"))) and source.count("/") != 1:
        raise BilevelError(
            f"model {source!r} not found; accepted: 'tiny', a local diffusers pipeline folder or a hub id (owner/name)"
        )
    raise BilevelError(
        f"no world serves model {source!r}; accepted: 'tiny', a local diffusers pipeline folder, a hub id "
        f"(owner/name), or a source a world plugin claims (pick one with --world NAME; worlds: {names})"
    )


def build_world(config: RunConfig, purpose: Purpose = "run") -> World:
    """The world for `purpose`; cheap checks (e.g. unknown concepts) run before anything is loaded."""
    plugin = world_plugin(config)
    if purpose not in plugin.serves:
        raise BilevelError(
            f"world {plugin.name!r} cannot serve `bilevel {purpose}`; it serves: {', '.join(sorted(plugin.serves))}"
        )
    plugin.check(config, purpose)
    world = plugin.build(config, purpose)
    missing = missing_world_attributes(world)
    if missing:
        raise BilevelError(
            f"world plugin {plugin.name!r} built a {type(world).__name__} that lacks {', '.join(missing)} "
            "of the World protocol (bilevel.core.world.World)"
        )
    return world


def evaluate_world(unet: torch.nn.Module, world: World, config: RunConfig) -> EvalOutput:
    """Metrics (.metrics, .per_group) and grid images (.images, one group per concept at least) of `unet`."""
    return world.evaluate(unet, config.evaluation)
