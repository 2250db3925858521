"""A concept rate with its interval, read from the world's own evaluation (so it means what the world means)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bilevel.core.attack import CurvePoint
from bilevel.core.config import EvalConfig
from bilevel.core.errors import BilevelError
from bilevel.core.stats import wilson_interval
from bilevel.core.world import World
from bilevel.diffusion.conditioning_swap import ConditioningSwap


@dataclass(frozen=True)
class RateMeasure:
    """rate = successes / samples, with the 95% Wilson interval of the proportion."""

    rate: float
    interval: tuple[float, float]
    samples: int

    @property
    def successes(self) -> int:
        return round(self.rate * self.samples)

    def point(self, step: int) -> CurvePoint:
        return CurvePoint(step=step, concept_rate=self.rate, interval=self.interval)


def measure_concept_rate(
    world: World, unet: nn.Module, concept: str, evaluation: EvalConfig, samples: int, steps: int
) -> RateMeasure:
    """world.evaluate with `samples` per prompt group and `steps` DDIM steps (the rest of `evaluation` kept: the
    guidance, the sampling seed, a Stable Diffusion world's evaluators); evaluation.concept_rates[concept]."""
    # `samples` per concept too; an attack reads the concept rate only, so the secondary sets are not sampled
    update = {"samples_per_prompt": samples, "concept_samples": samples, "steps": steps, "secondary": False}
    settings = evaluation.model_copy(update=update)
    result = world.evaluate(unet, settings).evaluation
    if concept not in result.concept_rates:
        raise BilevelError(
            f"world {world.name!r} reported no rate for concept {concept!r}; it measures: "
            f"{', '.join(result.concept_rates) or 'none'}"
        )
    rate = float(result.concept_rates[concept])
    n = int(result.concept_samples or result.samples) or samples  # the concept group's own size
    return RateMeasure(rate, wilson_interval(round(rate * n), n), n)


def measure_swapped_rate(
    world: World,
    unet: nn.Module,
    concept: str,
    evaluation: EvalConfig,
    samples: int,
    steps: int,
    values: torch.Tensor,
    per_key: bool = True,
) -> RateMeasure:
    """The concept rate when the world's evaluation renders `values` (text-encoder states) in place of the concept's
    prompts (per_key: values[i] replaces world.concept_prompts(concept)[i]; else the values are spread over the
    concept samples in turn). A world whose evaluation never conditions on those prompts is a one-line error."""
    keys = world.bank(world.concept_prompts(concept))
    swapped = ConditioningSwap(unet, keys, values, per_key=per_key)
    measured = measure_concept_rate(world, swapped, concept, evaluation, samples, steps)
    if swapped.matched == 0:
        raise BilevelError(
            f"world {world.name!r} did not render the concept prompts of {concept!r} in its evaluation; an attack "
            "that replaces them cannot be measured there"
        )
    return measured
