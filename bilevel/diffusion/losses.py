"""The lower-level loss: weighted DDPM task loss + output KD + feature KD (BK-SDM / the paper's KD objective)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bilevel.core.interfaces import FeaturePair
from bilevel.diffusion.noise import PREDICTION_TYPES


@dataclass
class KDTargets:
    """What the frozen teacher says about a batch, computed once per batch."""

    eps: torch.Tensor
    features: dict[str, torch.Tensor]


def ddpm_loss(pred: torch.Tensor, noise: torch.Tensor, sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error; with sample_weights (B,), each sample's mean error is weighted, then the batch averaged
    (diffusers' min-SNR reduction). None keeps the plain MSE, bit for bit."""
    if sample_weights is None:
        return F.mse_loss(pred, noise)
    per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=list(range(1, pred.dim())))
    return (per_sample * sample_weights.to(per_sample.device, per_sample.dtype)).mean()


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) per sample, as diffusers' training scripts' `--snr_gamma`:
    snr = alpha_bar / (1 - alpha_bar) at t; epsilon: min(snr, gamma) / snr; v_prediction: min(snr, gamma) / (snr + 1).
    Where snr is 0 (zero-terminal-SNR schedules) the epsilon weight takes its limit, 1, instead of 0/0."""
    a = alphas_cumprod.to(t.device)[t].float()
    snr = (a**0.5 / (1.0 - a) ** 0.5) ** 2  # diffusers.training_utils.compute_snr
    clipped = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}")


def output_kd_loss(student_eps: torch.Tensor, teacher_eps: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student_eps, teacher_eps)


def feature_kd_loss(
    student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor], pairs: list[FeaturePair]
) -> torch.Tensor:
    """Sum over pairs of the mean squared error; channel-pruned pairs compare the teacher's kept channels."""
    total = torch.zeros((), device=next(iter(student_feats.values())).device)
    for pair in pairs:
        s = student_feats[pair.student]
        t = teacher_feats[pair.teacher]
        if pair.teacher_channels is not None:
            t = t[:, list(pair.teacher_channels)]
        total = total + F.mse_loss(s, t)
    return total


def kd_loss(
    student_eps: torch.Tensor,
    noise: torch.Tensor,
    targets: KDTargets | None,
    student_feats: dict[str, torch.Tensor],
    pairs: list[FeaturePair],
    w_task: float,
    w_out: float,
    w_feat: float,
    task_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total lower loss and its parts (as floats, for logging); task_weights (B,): per-sample weights of the task
    loss only (min-SNR), the KD terms stay unweighted."""
    parts: dict[str, torch.Tensor] = {"task": ddpm_loss(student_eps, noise, task_weights)}
    total = w_task * parts["task"]
    if targets is not None and w_out > 0:
        parts["out_kd"] = output_kd_loss(student_eps, targets.eps)
        total = total + w_out * parts["out_kd"]
    if targets is not None and w_feat > 0 and pairs:
        parts["feat_kd"] = feature_kd_loss(student_feats, targets.features, pairs)
        total = total + w_feat * parts["feat_kd"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
