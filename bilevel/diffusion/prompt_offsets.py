"""Concept inversion in the text encoder's output space: learn offsets of prompt conditioning that make a frozen
model render given images (the `inversion` attack, and the adversary of `training.upper_inversion`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bilevel.diffusion.noise import noised
from bilevel.optim.steps import gradient_step


def fit_prompt_offsets(
    unet: nn.Module, examples: list[tuple[torch.Tensor, torch.Tensor]], offsets: torch.Tensor, *,
    alphas_cumprod: torch.Tensor, prediction: str, device: torch.device | str, steps: int, lr: float,
    batch_size: int, generator: Callable[[int], torch.Generator],
) -> tuple[torch.Tensor, list[float]]:  # fmt: skip
    """Adam on offsets[i] added to the conditioning of examples[i] = (x0, base conditioning, one row per image),
    the diffusion loss summed over the example sets, `generator(step)` drawing each step's images, times and noise.
    The model is frozen meanwhile (its requires_grad flags restored after). Returns the offsets and the loss of
    every step."""
    delta = offsets.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=lr)
    flags = {p: p.requires_grad for p in unet.parameters()}
    unet.requires_grad_(False)
    losses: list[float] = []
    try:
        for step in range(steps):
            gen = generator(step)
            loss: torch.Tensor | float = 0.0
            for i, (x0, base) in enumerate(examples):
                idx = torch.randint(len(x0), (min(batch_size, len(x0)),), generator=gen)
                xt, t, target = noised(x0[idx], alphas_cumprod, gen, device, prediction)
                loss = loss + F.mse_loss(unet(xt, t, encoder_hidden_states=base[idx] + delta[i]).sample, target)
            gradient_step(loss, {"offsets": delta}, optimizer)
            losses.append(float(loss.detach()))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return delta.detach(), losses
