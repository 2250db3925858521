"""The World contract: what a run, a command or a plugin may ask of the place a teacher lives in.

A world bundles a frozen teacher with its prompt encoder, its clean (concept-free) fine-tuning data, its concept
data, its noise schedule and sample space, and an evaluator that turns a UNet into one typed `Evaluation` (the same
keys on every world). The tiny world, Stable Diffusion and third-party worlds implement `World`; a `WorldPlugin`
(the fourth plugin kind, registered like pruners, unlearners and solvers) says which model sources it serves and
builds its world from a run config.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bilevel.core.interfaces import CalibrationBatch, Plugin

if TYPE_CHECKING:
    from bilevel.core.config import EvalConfig, RunConfig
    from bilevel.diffusion.conditioning import PromptBank

#: What a command needs a world for. 'run' needs everything; 'prune' the teacher (and calibration data when the
#: world has some); 'unlearn' the teacher, concept data and retain data when available; 'eval' the evaluator only.
Purpose = Literal["run", "prune", "unlearn", "eval"]


@runtime_checkable
class WorldData(Protocol):
    """Training examples in the world's sample space: x0 (N, C, H, W) and one prompt per example."""

    images: torch.Tensor
    prompts: list[str]

    def __len__(self) -> int: ...


class Evaluation(BaseModel):
    """One model's evaluation, with the same keys on every world (None where a world cannot measure a metric).

    Rates are shares of samples the world's detector classifies as asked; `samples` is how many samples each rate
    rests on, so intervals can be computed from a saved row.
    """

    model_config = ConfigDict(extra="forbid")

    concept_rate: float = Field(description="mean over concepts: share of concept-prompt samples showing the concept")
    concept_rates: dict[str, float] = Field(description="per concept")
    retained_accuracy: float | None = Field(None, description="share of other prompts rendered as asked")
    collateral: float | None = Field(None, description="rendered-as-asked rate on the concepts' nearest neighbours")
    quality_distance: float | None = Field(None, description="distance to real data (lower is better)")
    quality_metric: str | None = Field(None, description="what quality_distance is, e.g. 'swd' or 'fid'")
    per_group: dict[str, float] = Field(
        default_factory=dict, description="rendered-as-asked rate per prompt group (a colour, a class, a concept)"
    )
    samples: int = Field(0, ge=0, description="samples per prompt group (the concept groups may have more)")
    concept_samples: int = Field(0, ge=0, description="samples per concept prompt group")
    intervals: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="95% intervals (Wilson) of the rates above, by row key: concept_rate, concept_rate/<c>, "
        "retained_accuracy, collateral",
    )
    extra: dict[str, float] = Field(default_factory=dict, description="world-specific metrics (e.g. clip_score)")

    def row(self) -> dict[str, Any]:
        """A flat metrics row for tables and JSON: the common keys, then concept_rate/<c>, then the extras."""
        out: dict[str, Any] = {
            "concept_rate": self.concept_rate,
            "retained_accuracy": self.retained_accuracy,
            "collateral": self.collateral,
            "quality_distance": self.quality_distance,
            "quality_metric": self.quality_metric,
            "samples": self.samples,
        }
        out.update({f"concept_rate/{c}": v for c, v in self.concept_rates.items()})
        out.update({f"{key}_ci": list(interval) for key, interval in self.intervals.items()})
        out["concept_samples"] = self.concept_samples
        out.update(self.extra)
        return out


def rate_intervals(counts: dict[str, tuple[int, int]]) -> dict[str, tuple[float, float]]:
    """Wilson 95% intervals of rates given as (successes, trials), by the row key they belong to."""
    from bilevel.core.stats import wilson_interval

    return {key: wilson_interval(k, n) for key, (k, n) in counts.items()}


@dataclass
class EvalOutput:
    """An evaluation and its images (group label -> samples (N, 3, H, W) in [-1, 1]) for PNG grids."""

    evaluation: Evaluation
    images: dict[str, torch.Tensor] = field(repr=False)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.evaluation.row()

    @property
    def per_group(self) -> dict[str, float]:
        return self.evaluation.per_group


@runtime_checkable
class World(Protocol):
    """What every world offers. Tensors are on `device`; the teacher is frozen (eval mode, no grad)."""

    name: str  # the world plugin's name
    concepts: list[str]
    device: torch.device
    bank: PromptBank  # prompt strings -> frozen text-encoder states (each prompt encoded once)
    finetune: WorldData  # clean fine-tuning data; the concepts are absent (may be empty outside `run`)
    clamp_samples: bool  # x0 are pixels in [-1, 1] (True) or latents (False)
    quality_metric: str  # the name of Evaluation.quality_distance on this world

    @property
    def teacher(self) -> nn.Module: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def scheduler_config(self) -> dict[str, Any]: ...

    @property
    def alphas_cumprod(self) -> torch.Tensor: ...

    @property
    def sample_shape(self) -> tuple[int, int, int]: ...

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the world's images in pixels (equal to sample_shape in pixel-space worlds)."""
        ...

    @property
    def concept_data(self) -> WorldData:
        """Concept x0 (real images, or the teacher's samples; made on first use)."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (N, C, H, W) -> x0 in the sample space (identity in pixel-space worlds)."""
        ...

    def concept_prompts(self, concept: str | None = None) -> list[str]: ...

    def retain_prompts(self) -> list[str]: ...

    def evaluate(self, unet: nn.Module, settings: EvalConfig) -> EvalOutput:
        """Sample with `unet` and score it; every model gets the same prompts and noise for the same settings."""
        ...

    def pipeline_parts(self) -> dict[str, Any]:
        """The teacher pipeline's parts other than the UNet, by model_index name (for `bilevel export`)."""
        ...


def calibration_batch(world: World, n: int = 64) -> CalibrationBatch | None:
    """Clean data for data-driven importances (Diff-Pruning's Taylor scores); None when the world has none."""
    n = min(n, len(world.finetune))
    if n == 0:
        return None
    return CalibrationBatch(
        x0=world.finetune.images[:n],
        cond=world.bank(world.finetune.prompts[:n]),
        alphas_cumprod=world.alphas_cumprod,
    )


class WorldPlugin(Plugin):
    """A world kind: which model sources it serves and how to build its world from a run config.

    Resolution: `--world NAME` picks a world explicitly; otherwise every registered world is asked `accepts(source)`
    in decreasing `priority` and the first that accepts serves the model. `accepts` must be cheap (read at most a
    config file) and must not raise for sources it does not serve.
    """

    kind: ClassVar[str] = "world"
    priority: ClassVar[int] = 0
    #: the commands this world can serve (a world without training data may serve only `eval`)
    serves: ClassVar[frozenset[str]] = frozenset({"run", "prune", "unlearn", "eval"})

    @abstractmethod
    def accepts(self, source: str) -> bool:
        """Whether this world serves the model source (a name, a local folder or a hub id)."""

    def check(self, config: RunConfig, purpose: Purpose) -> None:
        """Cheap validation of the config before anything is loaded (e.g. unknown concepts). Default: nothing."""

    @abstractmethod
    def build(self, config: RunConfig, purpose: Purpose) -> World:
        """Load the teacher and the data `purpose` needs."""



def missing_world_attributes(obj: Any) -> list[str]:
    """Names of the World protocol that `obj` lacks (empty: it is a World)."""
    import typing

    names = getattr(World, "__protocol_attrs__", None) or typing._get_protocol_attrs(World)  # type: ignore[attr-defined]
    # looked up without evaluating properties: some are lazy and costly (a world's teacher-sampled concept data)
    return sorted(a for a in names if a not in getattr(obj, "__dict__", {}) and not hasattr(type(obj), a))
