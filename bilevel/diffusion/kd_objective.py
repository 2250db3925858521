"""The lower-level objective: KD fine-tuning of the student on clean (concept-free) data.

draw() runs the frozen teacher once per batch (output and block features) so solvers that evaluate a batch
several times pay for the teacher once; DDPM-only training skips the teacher entirely.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from bilevel.core.config import LossWeights
from bilevel.core.interfaces import FeaturePair, Objective
from bilevel.diffusion.features import FeatureTap
from bilevel.diffusion.losses import KDTargets, kd_loss, min_snr_weights
from bilevel.diffusion.noise import add_noise, task_target
from bilevel.runtime.seeding import draw_generator


@dataclass
class LowerBatch:
    xt: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    noise: torch.Tensor  # the task-loss target: eps, or v for v-prediction models
    targets: KDTargets | None
    task_weights: torch.Tensor | None = None  # per-sample min-SNR weights of the task loss (None: off)


class DrawCounter:
    """Counter-based RNG: draw i uses a generator seeded by (seed, i), so a resumed run draws the same batches."""

    def __init__(self, seed: int, salt: int) -> None:
        self.seed, self.salt, self.count = seed, salt, 0

    def next(self, stream: int = 0) -> torch.Generator:
        """stream > 0: an independent sequence for the same draw (each process's own upper-level batch)."""
        gen = draw_generator(self.seed, self.count, self.salt, stream)
        self.count += 1
        return gen


def make_lower_objective(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    cond_all: torch.Tensor,
    uncond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    weights: LossWeights,
    pairs: list[FeaturePair],
    batch_size: int,
    counter: DrawCounter,
    uncond_prob: float = 0.1,
    prediction_type: str = "epsilon",
    part: slice | None = None,
) -> Objective:
    """images (N, C, H, W) with their prompt embeddings cond_all (N, T, D); uncond (T, D).
    prediction_type: the scheduler's ('epsilon' or 'v_prediction'): what the task loss compares the output with.
    part: this process's slice of every drawn batch in data-parallel training (all processes draw the same global
    batch, so the averaged gradient is the global batch's whatever the number of processes)."""
    device = next(student.parameters()).device
    use_teacher = weights.output > 0 or (weights.feature > 0 and bool(pairs))
    feat_pairs = pairs if weights.feature > 0 else []
    teacher_tap = FeatureTap(teacher, [p.teacher for p in feat_pairs]) if feat_pairs else None
    student_tap = FeatureTap(student, [p.student for p in feat_pairs]) if feat_pairs else None

    def draw() -> LowerBatch:
        gen = counter.next()
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x0 = images[idx].to(device)
        cond = cond_all[idx].clone().to(device)
        drop = torch.rand(batch_size, generator=gen) < uncond_prob
        cond[drop] = uncond.to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(len(alphas_cumprod), (batch_size,), generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1).to(device)
        xt = add_noise(x0, noise, a)
        t = t.to(device)
        if part is not None:
            x0, noise, a, xt, t, cond = x0[part], noise[part], a[part], xt[part], t[part], cond[part]
        targets = None
        if use_teacher:
            with torch.no_grad(), teacher_tap or contextlib.nullcontext():  # hooks only for this one pass
                eps_t = teacher(xt, t, encoder_hidden_states=cond).sample
                feats = dict(teacher_tap.outputs) if teacher_tap else {}
            targets = KDTargets(eps=eps_t, features=feats)
        snr_w = None
        if weights.snr_gamma is not None:
            snr_w = min_snr_weights(alphas_cumprod, t, weights.snr_gamma, prediction_type)
        return LowerBatch(xt, t, cond, task_target(x0, noise, a, prediction_type), targets, snr_w)

    def loss(batch: LowerBatch) -> torch.Tensor:
        with student_tap or contextlib.nullcontext():  # hooks only for this one pass
            eps_s = student(batch.xt, batch.t, encoder_hidden_states=batch.cond).sample
            student_feats = dict(student_tap.outputs) if student_tap else {}
        total, parts = kd_loss(
            eps_s, batch.noise, batch.targets, student_feats, feat_pairs,
            weights.task, weights.output, weights.feature, batch.task_weights,
        )  # fmt: skip
        loss.last_parts = parts  # type: ignore[attr-defined]
        return total

    return Objective(draw=draw, loss=loss)
