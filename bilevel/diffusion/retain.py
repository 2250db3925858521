"""The retain extension's batch, shared by unlearners that keep other concepts with a frozen model's outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import UnlearnContext
from bilevel.diffusion.noise import noised


@dataclass
class RetainBatch:
    """Noised retain images with their prompts and the frozen model's prediction on them (the retain target)."""

    xt: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    target: torch.Tensor


def draw_retain(ctx: UnlearnContext, batch_size: int, generator: torch.Generator, who: str) -> RetainBatch:
    """The retain extension's batch: noised retain images, their prompts, and sg(eps_frozen(x_t, c_r)) as target."""
    if ctx.retain_images is None or not ctx.retain_image_prompts:
        raise BilevelError(f"{who} retain_weight > 0 needs retain images; set retain_weight=0")
    j = torch.randint(ctx.retain_images.shape[0], (batch_size,), generator=generator)
    xr, tr, _ = noised(ctx.retain_images[j], ctx.alphas_cumprod, generator, ctx.device)
    c_r = ctx.encode([ctx.retain_image_prompts[k] for k in j.tolist()])
    with torch.no_grad():
        target = ctx.teacher(xr, tr, encoder_hidden_states=c_r).sample
    return RetainBatch(xr, tr, c_r, target)
