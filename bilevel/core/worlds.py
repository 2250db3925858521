"""Which world a run trains in: the tiny world (the shipped tiny teacher or a tiny pipeline folder) or a real
Stable Diffusion pipeline (SDWorld). The runner asks here and stays world-agnostic."""

from __future__ import annotations

from typing import Any

import torch

from .config import RunConfig
from .errors import BilevelError
from .precision import autocast

SD_ONLY_DATA = ("finetune_data", "concept_data", "concept_prompts", "retain_prompts", "resolution")


def is_tiny(config: RunConfig) -> bool:
    from .sdworld.loading import is_tiny_pipeline

    return is_tiny_pipeline(config.model.source)


def build_world(config: RunConfig) -> Any:
    """The run's world; the tiny world's colour check runs before anything is loaded."""
    if is_tiny(config):
        from .models import load_tiny_pipeline
        from .tinyworld.dataset import check_colours
        from .tinyworld.world import TinyWorld

        check_colours(config.concepts)
        given = [k for k in SD_ONLY_DATA if getattr(config.data, k) is not None]
        if given:
            raise BilevelError(
                f"data.{given[0]} applies to Stable Diffusion models; the tiny world makes its own data and prompts"
            )
        pipe = load_tiny_pipeline(config.model.source, config.model.device)
        d = config.data
        return TinyWorld.build(pipe, config.concepts, d.finetune_size, d.concept_size, d.seed, config.model.device)
    from .sdworld.evaluation import prepare_evaluators
    from .sdworld.world import SDWorld

    world = SDWorld.build(config)
    prepare_evaluators(world, config)
    return world


def evaluate_world(unet: torch.nn.Module, world: Any, config: RunConfig) -> Any:
    """Metrics (.metrics, .per_colour) and grid images (.images, one group per concept at least) of `unet`."""
    from .sdworld.world import SDWorld

    if isinstance(world, SDWorld):
        from .sdworld.evaluation import evaluate_sd

        return evaluate_sd(unet, world, config)
    from .tinyworld.evaluation import evaluate_tiny

    ev = config.evaluation
    with autocast(config.model.mixed_precision, world.device):
        return evaluate_tiny(
            unet, world, samples_per_colour=ev.samples_per_prompt, steps=ev.steps, guidance=ev.guidance, seed=ev.seed
        )
