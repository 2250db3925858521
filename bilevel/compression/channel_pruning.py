"""One structured channel-pruning engine (torch-pruning) for every channel pruner; importances plug in.

Handles the diffusers pitfalls: per-Attention head counts, Down/Upsample channel attributes, conv_out kept,
no round_to (GroupNorm groups are respected by torch-pruning itself). It records which teacher channels each
block output kept, so feature KD can compare a channel-pruned student with its teacher.
"""

from __future__ import annotations

import contextlib
import copy
import io
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from bilevel.compression.model_stats import _Wrapped, example_inputs
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
) -> tuple[nn.Module, list[FeaturePair]]:
    """Return a channel-pruned copy of `teacher` and the feature pairs (with kept teacher channels).

    before_step(pruner, student) runs after the pruner is built and before channels are removed
    (data-driven importances accumulate gradients there).
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
            ignored_layers=ignored,
            num_heads=dict(num_heads),
            prune_num_heads=False,
            prune_head_dims=True,
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
    _fix_diffusers_attributes(student)
    student.zero_grad(set_to_none=True)  # drop gradients a data-driven importance accumulated
    student.requires_grad_(True)  # the copy inherits the frozen teacher's flags; a student is trained
    pairs = [
        FeaturePair(b, b, tuple(i for i in range(originals[b]) if i not in removed[b]) if removed[b] else None)
        for b in producers
    ]
    return student.eval(), pairs


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


class ChannelPrunerConfig(PluginConfig):
    """Options every channel pruner has; subclasses add their importance's options."""

    ratio: float = Field(0.3, gt=0, lt=1, description="share of channels removed per layer group")
    keep_time_embedding: bool = Field(True, description="never prune the timestep embedding MLP")


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
        scoring = self.scores(teacher, calibration)
        student, pairs = prune_unet_channels(
            teacher, scoring.importance, cfg.ratio, keep_time_embedding=cfg.keep_time_embedding,
            before_step=scoring.before_step,
        )  # fmt: skip
        student.zero_grad(set_to_none=True)
        student.requires_grad_(True)
        check_forward(student)
        return PruneResult(student=student, manifest=scoring.manifest(), feature_pairs=pairs, notes=scoring.notes())
