"""The three plugin kinds and the data they exchange with the framework.

A plugin is a class with a `name`, a pydantic `Config` and the kind's methods. The framework guarantees:
the teacher is frozen (eval mode, requires_grad False), every tensor handed over is on the run's device and dtype,
and only the parameters a plugin names are trained by the level it serves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .. import PLUGIN_API_VERSION
from .features import FeaturePair


class NoOptions(BaseModel):
    """Config for a plugin without options."""

    model_config = ConfigDict(extra="forbid")


class Plugin(ABC):
    """Common to all plugin kinds: a registered name, a config model and the API version it targets."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = NoOptions
    api_version: ClassVar[int] = PLUGIN_API_VERSION

    def __init__(self, config: BaseModel | None = None) -> None:
        self.config = config if config is not None else self.Config()


# --------------------------------------------------------------------------------------------------- pruning
@dataclass
class CalibrationBatch:
    """Clean data for data-driven importance (e.g. Diff-Pruning's Taylor scores)."""

    x0: torch.Tensor
    cond: torch.Tensor
    alphas_cumprod: torch.Tensor


@dataclass
class PruneResult:
    """A pruned student and what is needed to rebuild it from weights alone.

    manifest: JSON-serialisable; with the student's safetensors it rebuilds the student without pickle
    (see core.student_io). feature_pairs: (student module, teacher module) names whose outputs feature-KD matches.
    """

    student: nn.Module
    manifest: dict[str, Any]
    feature_pairs: list[FeaturePair]
    notes: dict[str, Any] = field(default_factory=dict)


class Pruner(Plugin):
    kind: ClassVar[str] = "pruner"

    @abstractmethod
    def prune(self, teacher: nn.Module, calibration: CalibrationBatch | None) -> PruneResult:
        """Return a new student; the teacher must be left unchanged."""


# --------------------------------------------------------------------------------------------------- unlearning
@dataclass
class UnlearnContext:
    """What an unlearner may use. `teacher` is the frozen unpruned model (the paper's frozen ESD reference)."""

    student: nn.Module
    teacher: nn.Module
    concepts: list[str]
    concept_prompts: list[str]
    retain_prompts: list[str]
    encode: Callable[[list[str]], torch.Tensor]  # prompt strings -> embeddings (cached)
    concept_images: torch.Tensor | None  # concept x0 (pixels in [-1, 1], or scaled VAE latents), when the world has them
    concept_image_prompts: list[str] | None  # the prompt of each concept image
    retain_images: torch.Tensor | None  # clean (concept-free) images x0, e.g. for a retain loss
    retain_image_prompts: list[str] | None
    alphas_cumprod: torch.Tensor
    scheduler_config: dict[str, Any]
    sample_shape: tuple[int, int, int]  # (C, H, W) of x_t
    run_dir: Path | None
    device: torch.device
    seed: int = 0
    clamp_samples: bool = True  # teacher samples are pixels in [-1, 1] (clamp); False for latent-space worlds
    tokenizer: Any = None  # the teacher's tokenizer (transformers), for token-level methods (e.g. a concept's tokens)


class Unlearner(Plugin):
    kind: ClassVar[str] = "unlearner"

    def prepare(self, ctx: UnlearnContext) -> None:
        """One-off work before training (masks, anchor images). Default: nothing."""

    def trainable_parameters(self, student: nn.Module) -> dict[str, nn.Parameter]:
        """The student parameters the upper level trains. Default: all."""
        return dict(student.named_parameters())

    @abstractmethod
    def loss(self, ctx: UnlearnContext, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """The upper-level (forgetting) loss on a freshly drawn concept batch, differentiable in the student."""

    def before_step(self, student: nn.Module) -> None:
        """Called after backward and before the upper optimiser step (e.g. to mask gradients)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint so a resumed run reuses them (e.g. a saliency mask)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what state_dict returned."""


# --------------------------------------------------------------------------------------------------- solving
@dataclass
class Objective:
    """A stochastic objective: `draw()` returns a batch, `loss(batch)` evaluates it on the current parameters.

    Solvers that re-evaluate one batch (unrolled, implicit) call loss(batch) several times; expensive
    frozen-teacher work belongs in draw() so it is done once per batch.
    """

    draw: Callable[[], Any]
    loss: Callable[[Any], torch.Tensor]


@dataclass
class BilevelProblem:
    """min_upper F s.t. lower in argmin G, over one model's parameters.

    coupling: 'shared' (both levels train the same tensors), 'proximal' (lower regularised towards the upper
    variable) or 'split' (disjoint subsets). Each optimiser already holds its level's parameters.
    """

    model: nn.Module
    lower: Objective
    upper: Objective
    lower_params: dict[str, nn.Parameter]
    upper_params: dict[str, nn.Parameter]
    lower_optimizer: torch.optim.Optimizer
    upper_optimizer: torch.optim.Optimizer
    coupling: str = "shared"
    before_upper_step: Callable[[], None] | None = None
    lower_scheduler: Any = None
    upper_scheduler: Any = None


class BilevelSolver(Plugin):
    kind: ClassVar[str] = "solver"
    couplings: ClassVar[frozenset[str]] = frozenset({"shared"})

    def setup(self, problem: BilevelProblem) -> None:
        """Called once before the first step. Default: nothing."""

    @abstractmethod
    def step(self, problem: BilevelProblem, step: int) -> dict[str, float]:
        """One outer step; returns metrics (at least 'lower_loss', and 'upper_loss' when the upper level ran)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""


PLUGIN_BASES: dict[str, type[Plugin]] = {"pruner": Pruner, "unlearner": Unlearner, "solver": BilevelSolver}
