"""One structured channel-pruning engine (torch-pruning) for every channel pruner; importances plug in.

Handles the diffusers pitfalls: per-Attention head counts, Down/Upsample channel attributes, conv_out kept,
no round_to (GroupNorm groups are respected by torch-pruning itself). It records which teacher channels each
block output kept, so feature KD can compare a channel-pruned student with its teacher.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from bilevel.compression.model_stats import _Wrapped, count_macs, count_params, example_inputs
from bilevel.core.interfaces import CalibrationBatch, FeaturePair, PluginConfig, Pruner, PruneResult
from bilevel.diffusion.features import sd_block_names


def _block_output_producer(unet: nn.Module, block_name: str) -> str:
    """The module whose output channels are the block's output channels (exact for diffusers' SD blocks)."""
    block = unet.get_submodule(block_name)
    for sampler in ("downsamplers", "upsamplers"):
        if getattr(block, sampler, None):
            return f"{block_name}.{sampler}.0.conv"
    if block_name != "mid_block" and getattr(block, "attentions", None):
        return f"{block_name}.attentions.{len(block.attentions) - 1}.proj_out"
    return f"{block_name}.resnets.{len(block.resnets) - 1}.conv2"


def prune_unet_channels(
    teacher: nn.Module,
    importance: object,
    ratio: float,
    *,
    keep_time_embedding: bool = True,
    before_step: Callable[[object, nn.Module], None] | None = None,
    outer_ratio: float | None = None,
    prune_heads: bool = False,
    round_to: int | None = None,
) -> tuple[nn.Module, list[FeaturePair]]:
    """Return a channel-pruned copy of `teacher` and the feature pairs (with kept teacher channels).

    before_step(pruner, student) runs after the pruner is built and before channels are removed
    (data-driven importances accumulate gradients there). outer_ratio (None: `ratio`) applies to the outermost
    stage (first down block, last up block), so a MAC target can be met finer than one uniform ratio allows.
    prune_heads: remove whole attention heads (at `ratio`) instead of narrowing every head; round_to: keep channel
    counts multiples of it (torch-pruning's round_to).
    """
    import torch_pruning as tp

    student = copy.deepcopy(teacher).float().train().requires_grad_(True)
    wrapped = _Wrapped(student)
    from diffusers.models.attention_processor import Attention

    num_heads: dict[nn.Module, int] = {}
    for m in student.modules():
        if isinstance(m, Attention):
            for proj in (m.to_q, m.to_k, m.to_v):
                num_heads[proj] = m.heads
    ignored: list[nn.Module] = [student.conv_out]
    if keep_time_embedding:
        ignored += [student.time_embedding.linear_1, student.time_embedding.linear_2]
    producers = {b: _block_output_producer(student, b) for b in sd_block_names(student)}
    producer_modules = {student.get_submodule(p): b for b, p in producers.items()}
    originals = {b: _out_channels(student.get_submodule(p)) for b, p in producers.items()}
    removed: dict[str, set[int]] = {b: set() for b in producers}
    with contextlib.redirect_stdout(io.StringIO()):  # torch-pruning prints warnings about kwargs-only inputs
        pruner = tp.pruner.MetaPruner(
            wrapped,
            example_inputs(student, 1),
            importance=importance,
            pruning_ratio=ratio,
            pruning_ratio_dict=_outer_stage(student, outer_ratio),
            ignored_layers=ignored,
            num_heads=dict(num_heads),
            prune_num_heads=prune_heads,
            prune_head_dims=not prune_heads,
            head_pruning_ratio=ratio if prune_heads else 0.0,
            round_to=round_to,
            in_channel_groups={},
            out_channel_groups={},
        )
        if before_step is not None:
            before_step(pruner, student)
        for group in pruner.step(interactive=True):
            for dep, idxs in group:
                module = dep.target.module
                if module in producer_modules and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                    removed[producer_modules[module]].update(int(i) for i in idxs)
            group.prune()
    if prune_heads:
        for m in student.modules():
            if isinstance(m, Attention):
                m.heads = pruner.num_heads[m.to_q]
    _fix_diffusers_attributes(student)
    student.zero_grad(set_to_none=True)  # drop gradients a data-driven importance accumulated
    student.requires_grad_(True)  # the copy inherits the frozen teacher's flags; a student is trained
    pairs = [
        FeaturePair(b, b, tuple(i for i in range(originals[b]) if i not in removed[b]) if removed[b] else None)
        for b in producers
    ]
    return student.eval(), pairs


def _outer_stage(unet: nn.Module, ratio: float | None) -> dict[nn.Module, float]:
    """torch-pruning's per-module ratios for the outermost stage (the highest resolution: most MACs per channel)."""
    if ratio is None:
        return {}
    return {unet.down_blocks[0]: ratio, unet.up_blocks[-1]: ratio}


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _fix_diffusers_attributes(unet: nn.Module) -> None:
    """torch-pruning resizes weights but not the channel attributes diffusers' samplers assert on."""
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.upsampling import Upsample2D

    for m in unet.modules():
        if isinstance(m, (Downsample2D, Upsample2D)) and getattr(m, "conv", None) is not None:
            m.channels = m.conv.in_channels
            m.out_channels = m.conv.out_channels


@torch.no_grad()
def check_forward(unet: nn.Module) -> None:
    """Raise if the pruned model no longer runs (a pruning bug caught before training starts)."""
    out = unet(**example_inputs(unet, 2)).sample
    if out.shape[1] != unet.config.out_channels:
        raise RuntimeError(f"pruned UNet returns {out.shape[1]} channels, expected {unet.config.out_channels}")


#: BK-SDM Small's share of the teacher's MACs (0.640 on the tiny teacher; about 0.64 on SD-v1 too): channel
#: pruners prune to the same compute by default, so pruners are compared like for like.
DEFAULT_TARGET_MACS = 0.64


class ChannelPrunerConfig(PluginConfig):
    """Options every channel pruner has; subclasses add their importance's options."""

    target_macs: float | None = Field(
        DEFAULT_TARGET_MACS,
        gt=0,
        lt=1,
        description="share of the teacher's MACs the student keeps (the per-layer ratio is searched to reach it; "
        "default: BK-SDM Small's share, so pruners compare at matched compute)",
    )
    ratio: float | None = Field(
        None, gt=0, lt=1, description="share of channels removed per layer group instead of a MAC target"
    )
    keep_time_embedding: bool = Field(True, description="never prune the timestep embedding MLP")
    prune_heads: bool = Field(
        False,
        description="remove whole attention heads (so the attention matmuls shrink in count, not only in width) "
        "instead of narrowing every head; off by default until measured to keep quality",
    )
    round_to: int | None = Field(
        None, ge=1, description="keep channel counts multiples of this (e.g. 8 for tensor cores); None: no rounding "
        "beyond GroupNorm's equal groups",
    )  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _ratio_or_target(cls, data: Any) -> Any:
        """A ratio given alone replaces the default MAC target; both given is ambiguous."""
        if isinstance(data, dict) and data.get("ratio") is not None:
            if data.get("target_macs") is not None:
                raise ValueError("give ratio or target_macs, not both")
            data = {**data, "target_macs": None}
        return data


@dataclass
class ChannelScores:
    """How a channel pruner scores channels: a torch-pruning importance, an optional hook that runs on the student
    before channels are removed (data-driven importances accumulate gradients there), and what to record."""

    importance: object
    before_step: Callable[[object, nn.Module], None] | None = None
    notes: Callable[[], dict[str, Any]] = field(default=dict)
    manifest: Callable[[], dict[str, Any]] = field(default=dict)


class ChannelPruner(Pruner):
    """One engine for every channel pruner (torch-pruning's pruner/importance split): a subclass only says how
    channels are scored; pruning, the forward check and the result are the same for all. The framework records the
    pruner's name and options in the student's manifest."""

    Config: ClassVar[type[PluginConfig]] = ChannelPrunerConfig

    @abstractmethod
    def scores(self, teacher: nn.Module, calibration: CalibrationBatch | None) -> ChannelScores:
        """The importance to prune `teacher` with (may raise BilevelError when it needs calibration data)."""

    def prune(self, teacher: nn.Module, calibration: CalibrationBatch | None) -> PruneResult:
        cfg = self.config
        ratio, outer = cfg.ratio, None
        search: dict[str, Any] = {}
        shape = {"prune_heads": cfg.prune_heads, "round_to": cfg.round_to}
        scoring = self.scores(teacher, calibration)  # first: a missing-data error must not wait for the search
        if ratio is None:
            ratio, outer, search = ratio_for_macs(
                teacher, cfg.target_macs, keep_time_embedding=cfg.keep_time_embedding, **shape
            )
        student, pairs = prune_unet_channels(
            teacher, scoring.importance, ratio, keep_time_embedding=cfg.keep_time_embedding,
            before_step=scoring.before_step, outer_ratio=outer, **shape,
        )  # fmt: skip
        student.zero_grad(set_to_none=True)
        student.requires_grad_(True)
        check_forward(student)
        notes = {"ratio": ratio, **({"outer_ratio": outer} if outer is not None else {}), **search, **scoring.notes()}
        return PruneResult(student=student, manifest=scoring.manifest(), feature_pairs=pairs, notes=notes)


#: Outermost-stage ratios tried by the MAC-target search. GroupNorm keeps every group the same size, so a layer
#: loses channels in steps of one per group (1/8 of a 64-channel layer): one uniform ratio jumps past most targets
#: (tiny teacher: 0.70 -> 0.60 of the MACs), and pruning the outermost stage at its own ratio fills the gaps.
OUTER_RATIOS = (None, 0.0, 0.13, 0.26)


def ratio_for_macs(
    teacher: nn.Module,
    target: float,
    *,
    keep_time_embedding: bool = True,
    tolerance: float = 0.01,
    tries: int = 8,
    prune_heads: bool = False,
    round_to: int | None = None,
) -> tuple[float, float | None, dict[str, Any]]:
    """(ratio, outer_ratio) whose student keeps the share of the teacher's MACs nearest `target`: for each outer
    ratio in OUTER_RATIOS (None: the same as the rest), a bisection on the ratio of the other stages (MACs fall as
    it rises). How many channels a layer loses depends on the ratios only, not on which channels an importance
    picks, so the search prunes a stand-in (`search_stand_in`) and the caller prunes once with its own score."""
    config = json.dumps(dict(teacher.config), sort_keys=True, default=str)
    key = (config, target, keep_time_embedding, tolerance, tries, prune_heads, round_to)
    if key in _SEARCHED:
        return _SEARCHED[key]
    teacher, importance = search_stand_in(teacher)
    full = count_macs(teacher)
    best: tuple[float, float | None, float] = (0.0, None, 1.0)  # (ratio, outer, share)
    pruned = 0
    for outer in OUTER_RATIOS:
        low, high = 0.0, 0.95
        for _ in range(tries):
            ratio = (low + high) / 2
            student, _ = prune_unet_channels(
                teacher, importance, ratio, keep_time_embedding=keep_time_embedding,
                outer_ratio=outer, prune_heads=prune_heads, round_to=round_to,
            )  # fmt: skip
            pruned += 1
            share = count_macs(student) / full
            if abs(share - target) < abs(best[2] - target):
                best = (ratio, outer, share)
            if abs(share - target) <= tolerance:
                break
            low, high = (ratio, high) if share > target else (low, ratio)
        if abs(best[2] - target) <= tolerance:
            break
    _SEARCHED[key] = best[0], best[1], {"target_macs": target, "macs_share": best[2], "ratio_search_prunes": pruned}
    return _SEARCHED[key]


#: teachers with more parameters than this are searched on a weightless copy (the meta device): there copying the
#: weights and running two forward passes per try dominate (SD-v1's UNet: 22 s per try instead of 145 s on one
#: CPU core); below it torch-pruning's bookkeeping, which grows on meta tensors, costs more (tiny teacher: 10.8 s
#: per try instead of 3.5 s). Both give the same channel counts (tested; benchmarks/bench_mac_search.py).
WEIGHTLESS_SEARCH_PARAMS = 50_000_000


def search_stand_in(teacher: nn.Module, weightless: bool | None = None) -> tuple[nn.Module, object]:
    """The model the MAC-target search prunes and the importance it prunes with: the teacher with the magnitude
    score, or (weightless: None decides by size) a meta-device copy of its architecture with a data-free score."""
    import torch_pruning as tp

    if weightless is None:
        weightless = count_params(teacher) > WEIGHTLESS_SEARCH_PARAMS
    if not weightless:
        return teacher, tp.importance.MagnitudeImportance(p=1)
    with torch.device("meta"):
        copy_ = type(teacher).from_config(teacher.config)
    return copy_.eval().requires_grad_(False), _channel_order()()


@functools.cache
def _channel_order() -> type:
    """A data-free torch-pruning importance: channel i scores i, concrete even on meta tensors. Which channels go
    does not change how many go, which is all the search measures. (A factory: torch-pruning loads lazily.)"""
    import torch_pruning as tp

    class ChannelOrder(tp.importance.Importance):
        def __call__(self, group: Any, **_: Any) -> torch.Tensor:
            return torch.arange(len(group[0][1]), dtype=torch.float32)

    return ChannelOrder


#: searches already made in this process, by architecture (an ablation grid prunes the same teacher many times)
_SEARCHED: dict[tuple, tuple[float, float | None, dict[str, Any]]] = {}
