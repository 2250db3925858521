"""Relearning attacks' training loop: fine-tune a copy of a model on given data and measure the concept along the
way ("concept resurgence": does an erased concept come back under further fine-tuning?)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from bilevel.diffusion.noise import noised
from bilevel.optim.adamw import adamw
from bilevel.optim.steps import gradient_step
from bilevel.runtime.seeding import draw_generator

M = TypeVar("M")


@dataclass(frozen=True)
class RelearnData:
    """x0 (N, C, H, W) in the sample space, their prompt states cond (N, T, D) and the empty prompt's uncond (T, D)."""

    images: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor


def relearn(
    student: nn.Module,
    data: RelearnData,
    alphas_cumprod: torch.Tensor,
    measure: Callable[[nn.Module], M],
    *,
    steps: int,
    measure_at: list[int],
    batch_size: int,
    lr: float,
    seed: int,
    prediction_type: str = "epsilon",
    uncond_prob: float = 0.1,
    teacher: nn.Module | None = None,
    kd_weight: float = 1.0,
    stop: Callable[[M], bool] | None = None,
) -> list[tuple[int, M]]:
    """Train `student` in place (pass a copy) for `steps` AdamW steps of the diffusion loss (plus, with a teacher,
    kd_weight x the output-KD loss against it) and `measure` it before the steps listed in `measure_at` (step 0:
    before any training; `steps`: after the last). Batch i is drawn from draw_generator(seed, i): deterministic by
    seed. Stops after the first measurement `stop` accepts. Returns [(step, measurement), ...]."""
    device = next(student.parameters()).device
    params = {n: p for n, p in student.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    optimizer = adamw(params.values(), lr)
    points = sorted({s for s in measure_at if 0 <= s <= steps})
    curve: list[tuple[int, M]] = []
    for step in range(steps + 1):
        if step in points:
            result = measure(student)
            curve.append((step, result))
            if stop is not None and stop(result):
                break
        if step == steps:
            break
        student.train()
        gen = draw_generator(seed, step)
        idx = torch.randint(len(data.images), (batch_size,), generator=gen)
        cond = data.cond[idx].clone()
        cond[torch.rand(batch_size, generator=gen) < uncond_prob] = data.uncond
        xt, t, target = noised(data.images[idx], alphas_cumprod, gen, device, prediction_type)
        cond = cond.to(device)
        pred = student(xt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, target)
        if teacher is not None and kd_weight > 0:
            with torch.no_grad():
                teacher_pred = teacher(xt, t, encoder_hidden_states=cond).sample
            loss = loss + kd_weight * F.mse_loss(pred, teacher_pred)
        gradient_step(loss, params, optimizer)
    student.eval()
    return curve
