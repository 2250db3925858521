"""The three plugin kinds and the data they exchange with the framework.

A plugin is a class with a `name`, a pydantic `Config` and the kind's methods. The framework guarantees:
the teacher is frozen (eval mode, requires_grad False), every tensor handed over is on the run's device and dtype,
and only the parameters a plugin names are trained by the level it serves.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


@dataclass(frozen=True)
class FeaturePair:
    """Student module output matched to a teacher module output.

    teacher_channels: for channel-pruned students, the teacher channels the student kept (in student order);
    None when the shapes already agree.
    """

    student: str
    teacher: str
    teacher_channels: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        return {"student": self.student, "teacher": self.teacher, "teacher_channels": self.teacher_channels}

    @classmethod
    def from_json(cls, d: dict) -> FeaturePair:
        ch = d.get("teacher_channels")
        return cls(d["student"], d["teacher"], tuple(ch) if ch is not None else None)


class PluginConfig(BaseModel):
    """Base of every plugin's `Config`: unknown options are refused, so a misspelt option is a one-line error
    instead of a silent default."""

    model_config = ConfigDict(extra="forbid")


class NoOptions(PluginConfig):
    """Config for a plugin without options."""


class Plugin(ABC):
    """Common to all plugin kinds: a registered name, a config model and the API version it targets.

    `api_version` has no default on purpose: each registered class declares the `bilevel.PLUGIN_API_VERSION` it was
    written against, so a plugin for another version is refused at registration instead of failing mid-run.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[PluginConfig]] = NoOptions
    api_version: ClassVar[int]

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
    (see bilevel.compression.student_io). feature_pairs: (student module, teacher module) names whose outputs feature-KD matches.
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
    #: pixels in [-1, 1] (N, C, H, W) -> x0 in the sample space (identity in pixel space, the VAE on SD): for
    #: unlearners that read image folders (e.g. Concept Ablation's anchors)
    encode_images: Callable[[torch.Tensor], torch.Tensor] | None = None
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of such images in pixels
    #: a folder shared by runs (config.cache_dir): preparations that depend only on what their cache metadata names
    #: (the frozen model, prompts, settings, seed) go there, so the cells of a grid sample them once
    cache_dir: Path | None = None


def _marks_prepared(prepare: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(prepare)
    def wrapper(self: Unlearner, *args: Any, **kwargs: Any) -> None:
        prepare(self, *args, **kwargs)
        self._prepared = True

    return wrapper


def _needs_prepare(method: Callable[..., Any], what: str) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: Unlearner, *args: Any, **kwargs: Any) -> Any:
        if not getattr(self, "_prepared", False) and type(self).prepare is not Unlearner.prepare:
            raise RuntimeError(f"unlearner {self.name!r}: prepare(ctx) must run before {what}()")
        return method(self, *args, **kwargs)

    return wrapper


class Unlearner(Plugin):
    """The upper level: `draw` a concept batch (all randomness and frozen-teacher work), then `loss(ctx, batch)`.

    The split lets solvers evaluate the loss several times on one batch (at other parameters); `loss` must draw
    nothing. Lifecycle: when a subclass overrides `prepare`, calling `draw`, `loss` or `before_step` before it is
    an error raised here, once for every unlearner.
    """

    kind: ClassVar[str] = "unlearner"
    _LIFECYCLE: ClassVar[tuple[str, ...]] = ("draw", "loss", "before_step")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "prepare" in cls.__dict__:
            cls.prepare = _marks_prepared(cls.__dict__["prepare"])  # type: ignore[method-assign]
        for what in cls._LIFECYCLE:
            if what in cls.__dict__:
                setattr(cls, what, _needs_prepare(cls.__dict__[what], what))

    def prepare(self, ctx: UnlearnContext) -> None:
        """One-off work before training (masks, anchor images). Default: nothing."""

    def trainable_parameters(self, student: nn.Module) -> dict[str, nn.Parameter]:
        """The student parameters the upper level trains. Default: all."""
        return dict(student.named_parameters())

    @abstractmethod
    def draw(self, ctx: UnlearnContext, batch_size: int, generator: torch.Generator) -> Any:
        """A concept batch drawn with `generator` only (deterministic by seed); frozen-teacher targets belong here,
        so they are computed once per batch however often the solver evaluates it."""

    @abstractmethod
    def loss(self, ctx: UnlearnContext, batch: Any) -> torch.Tensor:
        """The upper-level (forgetting) loss on a drawn batch, differentiable in the student; it draws nothing, so
        the same batch at the same parameters gives the same value."""

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

    Each optimiser already holds its level's parameters, partitioned for the solver's coupling (its config's
    `coupling`, the one place it is chosen: 'split' gives the lower level the complement of the upper set).
    """

    model: nn.Module
    lower: Objective
    upper: Objective
    lower_params: dict[str, nn.Parameter]
    upper_params: dict[str, nn.Parameter]
    lower_optimizer: torch.optim.Optimizer
    upper_optimizer: torch.optim.Optimizer
    before_upper_step: Callable[[], None] | None = None
    lower_scheduler: Any = None
    upper_scheduler: Any = None
    #: name -> object with state_dict() / load_state_dict() (tensors) that a checkpoint must keep for an exact
    #: resume, e.g. the upper level's learned adversarial embedding
    extra_state: dict[str, Any] = field(default_factory=dict)


#: shared: both levels train the same tensors; proximal: the lower level is pulled towards a separate upper
#: variable; split: disjoint subsets.
Coupling = Literal["shared", "proximal", "split"]


class SolverConfig(PluginConfig):
    """Base of every solver's `Config`. `coupling` is the run's one coupling setting: a solver narrows the Literal to
    the couplings it supports (its `couplings` are read from it), so an unsupported value fails config validation."""

    coupling: Literal["shared"] = Field("shared", description="shared: both levels train the same tensors")


class ProximalSolverConfig(SolverConfig):
    """Base of solvers that keep an upper variable x apart from the lower y: the proximal coupling (x an anchor copy,
    G = L_low(y) + mu/2 ||y - x||^2) or split (disjoint subsets); never shared."""

    coupling: Literal["proximal", "split"] = Field(
        "proximal", description="proximal (anchor x, lower pulled towards it) or split (disjoint subsets); not shared"
    )
    mu: float = Field(1.0, gt=0, description="proximal coupling: G = L_low(y) + mu/2 ||y - x||^2")


def _literal_couplings(config: type[BaseModel]) -> frozenset[str]:
    field_info = config.model_fields.get("coupling")
    if field_info is None:
        raise TypeError(f"{config.__name__} has no `coupling` field; subclass bilevel.core.interfaces.SolverConfig")
    annotation = field_info.annotation
    if get_origin(annotation) is not Literal or not set(get_args(annotation)) <= set(get_args(Coupling)):
        raise TypeError(f"{config.__name__}.coupling must be a Literal of {', '.join(get_args(Coupling))}")
    return frozenset(get_args(annotation))


class BilevelSolver(Plugin):
    """One outer step of a bilevel method. `couplings` is derived from `Config.coupling`'s Literal, never declared."""

    kind: ClassVar[str] = "solver"
    Config: ClassVar[type[SolverConfig]] = SolverConfig
    couplings: ClassVar[frozenset[str]] = frozenset({"shared"})
    second_order: ClassVar[bool] = False  # differentiates through gradients (double backward): no model.compile

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if isinstance(cls.Config, type) and issubclass(cls.Config, SolverConfig):  # others: refused at registration
            cls.couplings = _literal_couplings(cls.Config)

    @property
    def coupling(self) -> str:
        """The coupling this solver runs (its config's, validated against `couplings`)."""
        return self.config.coupling

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
