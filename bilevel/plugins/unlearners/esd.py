"""ESD (Gandikota et al., ICCV 2023): train the student's concept prediction towards negative guidance
of the frozen model: target = e(x,0) - eta (e(x,c) - e(x,0)).

x_t comes, by default, from partial DDIM sampling of the frozen model with the concept prompt (as in ESD).
Because the frozen model never changes, the trajectories are sampled once into a pool and every upper step
draws (trajectory, step) pairs from it: the same distribution at a fraction of the cost. The sampler already
evaluates the frozen model with and without the prompt at every pooled state, which is exactly what the target
needs, so the targets are kept with the pool (`cache_targets`) and an upper step runs no frozen-model pass at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import PluginConfig, UnlearnContext, Unlearner
from bilevel.toolkit import (
    RetainBatch,
    add_noise,
    draw_retain,
    model_fingerprint,
    preparation_cache,
    sample_trajectories,
    tensor_fingerprint,
    uncond_cond_eps,
)

POOL_CACHE = "esd_pool.safetensors"  # in the run's unlearner folder (or the shared cache)


class ESDConfig(PluginConfig):
    variant: Literal["x", "u", "full"] = Field(
        "x", description="x: cross-attention only (styles), u: all but cross-attention (objects, nudity), full: all"
    )
    eta: float = Field(1.0, ge=0, description="negative guidance strength")
    xt_source: Literal["sample", "data"] = Field(
        "sample", description="sample: partial sampling of the frozen model; data: noised real concept images"
    )
    sample_steps: int = Field(25, gt=0, description="DDIM steps of the partial sampling")
    sample_guidance: float = Field(3.0, ge=0, description="guidance of the partial sampling")
    pool_size: int = Field(256, gt=0, description="frozen-model trajectories sampled once per run")
    cache_targets: bool = Field(
        True,
        description="xt_source='sample': keep the frozen model's targets of every pooled state (computed by the "
        "sampler anyway; one more pool-sized tensor) instead of two frozen passes per upper step",
    )
    retain_weight: float = Field(
        0.0,
        ge=0,
        description="extension, not in the paper: weight of ||eps(x_t, c_r) - sg(eps_frozen(x_t, c_r))||^2 on noised "
        "retain images with their prompts (for use without a lower level, e.g. `bilevel unlearn`)",
    )


@dataclass
class ESDBatch:
    """x_t of the concept with its prompt embeddings and the frozen model's negative-guidance target."""

    xt: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    target: torch.Tensor
    retain: RetainBatch | None


def esd_target(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, eta: float) -> torch.Tensor:
    return eps_uncond - eta * (eps_cond - eps_uncond)


def select_parameters(student: torch.nn.Module, variant: str) -> dict[str, torch.nn.Parameter]:
    params = dict(student.named_parameters())
    if variant == "x":
        return {k: v for k, v in params.items() if ".attn2." in k}
    if variant == "u":
        return {k: v for k, v in params.items() if ".attn2." not in k}
    return params


class ESD(Unlearner):
    name = "esd"
    description = "Erased Stable Diffusion: negative guidance of the frozen model as the target (ESD-x/-u/full)."
    Config = ESDConfig
    api_version = 2

    def __init__(self, config: ESDConfig | None = None) -> None:
        super().__init__(config)
        self._pool: torch.Tensor | None = None  # (P, steps, C, H, W)
        self._pool_cond: torch.Tensor | None = None
        self._timesteps: torch.Tensor | None = None
        self._pool_target: torch.Tensor | None = None  # (P, steps, C, H, W) when cache_targets

    def trainable_parameters(self, student: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return select_parameters(student, self.config.variant)

    def prepare(self, ctx: UnlearnContext) -> None:
        """Sample the pool of frozen-model trajectories, or reuse a cached one made by the same frozen model,
        prompts and settings (another arm of the run, or, through ctx.cache_dir, another cell of a grid)."""
        cfg: ESDConfig = self.config
        if cfg.xt_source != "sample":
            return
        prompts = [ctx.concept_prompts[i % len(ctx.concept_prompts)] for i in range(cfg.pool_size)]
        cond = ctx.encode(prompts)

        def sample() -> dict[str, torch.Tensor]:
            gen = torch.Generator().manual_seed(ctx.seed + 17)
            score = (lambda e_u, e_c: esd_target(e_u, e_c, cfg.eta)) if cfg.cache_targets else None
            out = sample_trajectories(
                ctx.teacher, ctx.scheduler_config, cond, ctx.encode([""]),
                steps=cfg.sample_steps, guidance=cfg.sample_guidance, generator=gen, shape=ctx.sample_shape,
                score=score,
            )  # fmt: skip
            return {"pool": out[0], "timesteps": out[1]} | ({"target": out[2]} if cfg.cache_targets else {})

        keys = ["pool", "timesteps"] + (["target"] if cfg.cache_targets else [])
        cached = preparation_cache(ctx, POOL_CACHE, self._pool_meta(ctx, cond), keys, sample)
        self._pool, self._timesteps = cached["pool"], cached["timesteps"]
        self._pool_target = cached.get("target")
        self._pool_cond = cond

    def _pool_meta(self, ctx: UnlearnContext, cond: torch.Tensor) -> dict[str, str]:
        cfg: ESDConfig = self.config
        return {
            "frozen_model": model_fingerprint(ctx.teacher), "prompt_embeddings": tensor_fingerprint(cond),
            "steps": str(cfg.sample_steps), "guidance": repr(cfg.sample_guidance), "seed": str(ctx.seed),
            "eta": repr(cfg.eta) if cfg.cache_targets else "-", "shape": repr(tuple(ctx.sample_shape)),
            "scheduler": json.dumps(ctx.scheduler_config, sort_keys=True, default=str),
        }  # fmt: skip

    def draw_xt(
        self, ctx: UnlearnContext, batch_size: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, concept embeddings) for one upper batch."""
        return self._draw(ctx, batch_size, gen)[:3]

    def _draw(
        self, ctx: UnlearnContext, batch_size: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """draw_xt plus the cached frozen-model target of each drawn state (None when not cached)."""
        cfg: ESDConfig = self.config
        if cfg.xt_source == "sample":
            assert self._pool is not None  # sampled by prepare(), which the base class checks has run
            i = torch.randint(self._pool.shape[0], (batch_size,), generator=gen)
            j = torch.randint(self._pool.shape[1], (batch_size,), generator=gen)
            target = self._pool_target[i, j].to(ctx.device) if self._pool_target is not None else None
            return self._pool[i, j].to(ctx.device), self._timesteps[j].to(ctx.device), self._pool_cond[i], target
        if ctx.concept_images is None:
            raise BilevelError("ESD with xt_source='data' needs concept images; use xt_source='sample'")
        i = torch.randint(ctx.concept_images.shape[0], (batch_size,), generator=gen)
        x0 = ctx.concept_images[i].to(ctx.device)
        t = torch.randint(len(ctx.alphas_cumprod), (batch_size,), generator=gen)
        a = ctx.alphas_cumprod[t].view(-1, 1, 1, 1).to(ctx.device)
        noise = torch.randn(x0.shape, generator=gen).to(ctx.device)
        if ctx.concept_image_prompts:  # each image with its own prompt (right concept when there are several)
            prompts = [ctx.concept_image_prompts[k] for k in i.tolist()]
        else:
            prompts = [ctx.concept_prompts[k % len(ctx.concept_prompts)] for k in i.tolist()]
        return add_noise(x0, noise, a), t.to(ctx.device), ctx.encode(prompts), None

    def draw(self, ctx: UnlearnContext, batch_size: int, generator: torch.Generator) -> ESDBatch:
        xt, t, cond, target = self._draw(ctx, batch_size, generator)
        if target is None:
            uncond = ctx.encode([""]).expand(len(xt), -1, -1)
            with torch.no_grad():  # cond and uncond in one batched forward
                e_u, e_c = uncond_cond_eps(ctx.teacher, xt, t, cond, uncond)
                target = esd_target(e_u, e_c, self.config.eta)
        retain = draw_retain(ctx, batch_size, generator, "ESD") if self.config.retain_weight > 0 else None
        return ESDBatch(xt, t, cond, target, retain)

    def loss(self, ctx: UnlearnContext, batch: ESDBatch) -> torch.Tensor:
        b = batch
        if b.retain is None:
            return F.mse_loss(ctx.student(b.xt, b.t, encoder_hidden_states=b.cond).sample, b.target)
        r = b.retain
        out = ctx.student(
            torch.cat([b.xt, r.xt]), torch.cat([b.t, r.t]), encoder_hidden_states=torch.cat([b.cond, r.cond])
        ).sample
        pred, pred_r = out.split([len(b.xt), len(r.xt)])
        return F.mse_loss(pred, b.target) + self.config.retain_weight * F.mse_loss(pred_r, r.target)
