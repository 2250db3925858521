"""Diff-Pruning (Fang et al., NeurIPS 2023): structured channel pruning scored by the Taylor expansion of the
diffusion loss, with gradients accumulated from t=0 up to the first timestep whose loss falls below
`threshold x` the running maximum (the timesteps that carry little information are left out).

The channel score is torch-pruning's `TaylorImportance(multivariable=False)`: sum_k |theta_k * g_k| over the coupled
group, g the accumulated gradient. `importance: taylor` accumulates over every sampled timestep, `magnitude` uses
weight norms (no calibration data), both through the same engine as the magnitude pruner.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import CalibrationBatch
from bilevel.toolkit import ChannelPruner, ChannelPrunerConfig, ChannelScores, add_noise


class DiffPruningConfig(ChannelPrunerConfig):
    importance: Literal["diff-pruning", "taylor", "magnitude"] = Field(
        "diff-pruning",
        description="diff-pruning: Taylor scores over timesteps until the loss drops below threshold x its running "
        "max; taylor: Taylor scores over all sampled timesteps; magnitude: L2 weight norms (no data)",
    )
    threshold: float = Field(
        0.05, gt=0, lt=1, description="stop accumulating at the first t with L_t < threshold * max_{s<=t} L_s"
    )
    timestep_stride: int = Field(
        10, ge=1, description="score every stride-th training timestep (0, stride, 2*stride, ...)"
    )
    max_samples: int | None = Field(
        None, ge=1, description="calibration images used per timestep (None: the whole batch)"
    )
    seed: int = Field(0, description="seed of the noise drawn at each timestep")


class LossThresholdStopper:
    """Diff-Pruning's stopping rule: after scoring L_t, stop if L_t < threshold * max_{s<=t} L_s."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.running_max = float("-inf")

    def update(self, loss: float) -> bool:
        """Record one timestep's loss (its gradient is already accumulated); True when accumulation stops here."""
        self.running_max = max(self.running_max, loss)
        return loss < self.threshold * self.running_max


def accumulated_steps(losses: Iterable[float], threshold: float) -> int:
    """How many timesteps of a loss sequence (t increasing) contribute gradients under the stopping rule."""
    stopper = LossThresholdStopper(threshold)
    count = 0
    for loss in losses:
        count += 1
        if stopper.update(float(loss)):
            break
    return count


@dataclass
class GradientAccumulation:
    """What the calibration pass did: the timesteps whose gradients were summed and their losses."""

    timesteps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False


def accumulate_diffusion_gradients(
    unet: nn.Module, calibration: CalibrationBatch, cfg: DiffPruningConfig, stop: bool
) -> GradientAccumulation:
    """Sum grad_theta L_t into `.grad` for t = 0, stride, 2*stride, ... (epsilon-prediction DDPM loss)."""
    p = next(unet.parameters())
    n = cfg.max_samples or calibration.x0.shape[0]
    x0 = calibration.x0[:n].to(p.device, p.dtype)
    cond = calibration.cond[:n].to(p.device, p.dtype)
    abar = calibration.alphas_cumprod.to(p.device, torch.float64)
    generator = torch.Generator(device=p.device).manual_seed(cfg.seed)
    stopper = LossThresholdStopper(cfg.threshold)
    record = GradientAccumulation()
    unet.requires_grad_(True)
    unet.zero_grad(set_to_none=True)
    for t in range(0, len(abar), cfg.timestep_stride):
        noise = torch.randn(x0.shape, generator=generator, device=p.device, dtype=p.dtype)
        a = abar[t]
        x_t = add_noise(x0, noise, a).to(p.dtype)
        timesteps = torch.full((x0.shape[0],), t, device=p.device, dtype=torch.long)
        pred = unet(x_t, timesteps, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        record.timesteps.append(t)
        record.losses.append(float(loss.detach()))
        if not torch.isfinite(loss):
            raise BilevelError(
                f"diff-pruning calibration loss is {loss.item()} at t={t}; check the teacher and the calibration data"
            )
        if stop and stopper.update(record.losses[-1]):
            record.stopped_early = True
            break
    return record


class DiffPruningPruner(ChannelPruner):
    name = "diff-pruning"
    description = "Diff-Pruning: channel pruning by Taylor scores of the diffusion loss over informative timesteps."
    Config = DiffPruningConfig
    api_version = 2

    def scores(self, teacher, calibration: CalibrationBatch | None) -> ChannelScores:
        import torch_pruning as tp

        cfg: DiffPruningConfig = self.config
        if cfg.importance == "magnitude":
            return ChannelScores(tp.importance.MagnitudeImportance(p=2))
        if calibration is None:
            raise BilevelError(
                f"diff-pruning with importance {cfg.importance!r} needs calibration data (on Stable Diffusion: "
                "data.finetune_data); use importance 'magnitude' without data"
            )
        if calibration.x0.shape[0] == 0:
            raise BilevelError("diff-pruning got an empty calibration batch; it needs at least one image")
        record = GradientAccumulation()
        stop = cfg.importance == "diff-pruning"

        def before_step(_pruner: object, student: nn.Module) -> None:
            nonlocal record
            record = accumulate_diffusion_gradients(student, calibration, cfg, stop)

        return ChannelScores(
            tp.importance.TaylorImportance(multivariable=False),
            before_step=before_step,
            notes=lambda: {"timesteps": record.timesteps, "losses": record.losses, "stopped_early": record.stopped_early},
            manifest=lambda: {"scored_timesteps": record.timesteps},
        )
