"""The fifth plugin kind: attacks that test whether a suppressed concept is really gone.

"Suppressed" usually means only that the exact concept prompt no longer renders the concept; erased concepts come
back under other names, learned prompt embeddings and further fine-tuning. An `Attack` takes the attacked UNet, the
world and the concept and returns the concept rate under attack (measured by the world's own evaluator, with its
95% Wilson interval) and what the attack used, as one typed `AttackResult`.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from bilevel.core.interfaces import Plugin, PluginConfig

if TYPE_CHECKING:
    from torch import nn

    from bilevel.core.config import EvalConfig
    from bilevel.core.world import Purpose, World


class AttackConfig(PluginConfig):
    """Options every attack shares: how each concept-rate measurement samples, and the attack's own seed."""

    seed: int = Field(0, description="seed of everything the attack draws (batches, noise); same seed, same result")
    samples: int = Field(16, gt=0, description="samples per prompt group in each concept-rate measurement")
    sampler_steps: int = Field(10, gt=0, description="DDIM steps of each concept-rate measurement")


class CurvePoint(BaseModel):
    """The concept rate after `step` attack steps (relearning curves)."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0)
    concept_rate: float = Field(ge=0, le=1)
    interval: tuple[float, float] = Field(description="95% Wilson interval of the rate")


class AttackResult(BaseModel):
    """One attack on one model and concept. `concept_rate` is the attacker's best (the highest rate over the
    variants or checkpoints the attack tried, listed in `used` / `curve`), so a low value is a strong claim."""

    model_config = ConfigDict(extra="forbid")

    attack: str
    concept: str
    concept_rate: float = Field(ge=0, le=1, description="share of concept samples the world's detector flags")
    interval: tuple[float, float] = Field(description="95% Wilson interval of concept_rate")
    samples: int = Field(ge=0, description="how many samples concept_rate rests on")
    used: dict[str, Any] = Field(default_factory=dict, description="what the attack used: prompts, steps, images")
    curve: list[CurvePoint] = Field(default_factory=list, description="concept rate along the attack's steps")
    reached_at: int | None = Field(None, description="first step whose rate reached the attack's threshold")
    note: str | None = Field(None, description="one line a reader needs (e.g. the threshold was not reached)")


class Attack(Plugin):
    """Attack `concept` in `unet` and measure how much of it comes back. The attacked UNet must be left unchanged
    (relearning attacks train a copy); every rate comes from `world.evaluate`, so it means what the world's
    concept rate means; everything drawn comes from `self.config.seed`."""

    kind: ClassVar[str] = "attack"
    Config: ClassVar[type[PluginConfig]] = AttackConfig
    #: what the world must hold: 'eval' (the evaluator), 'unlearn' (concept data), 'run' (fine-tuning data)
    purpose: ClassVar[Purpose] = "eval"

    @abstractmethod
    def run(self, unet: nn.Module, world: World, concept: str, evaluation: EvalConfig) -> AttackResult:
        """`evaluation`: the command's evaluation settings (guidance, sampling seed, world evaluators); the attack
        samples with its own `samples` / `sampler_steps` on top of them."""
