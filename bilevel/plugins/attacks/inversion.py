"""`inversion`: concept inversion against the attacked model (textual inversion in the text encoder's output
space, Pham et al. 2023): learn one offset of the prompt states from k concept images with the diffusion loss, the
model frozen, then render the concept prompts (concept word removed) plus the offset and score them."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from bilevel.core.attack import Attack, AttackConfig, AttackResult
from bilevel.toolkit import (
    concept_examples,
    draw_generator,
    fit_prompt_offsets,
    measure_swapped_rate,
    prediction_type,
    replace_concept,
)


class InversionConfig(AttackConfig):
    images: Path | None = Field(None, description="a folder of concept PNGs (default: the world's concept data)")
    k: int = Field(16, gt=0, description="concept images the embedding is learned from")
    steps: int = Field(100, ge=0, description="optimisation steps of the learned embedding")
    lr: float = Field(2e-2, gt=0, description="Adam learning rate of the embedding")
    batch_size: int = Field(8, gt=0)
    init: Literal["without-concept", "concept"] = Field(
        "without-concept", description="start from the prompts with the concept word removed (textual inversion: "
        "the attacker must find the concept), or from the concept prompts themselves"
    )  # fmt: skip


class Inversion(Attack):
    name: ClassVar[str] = "inversion"
    description: ClassVar[str] = "learn a prompt embedding from k concept images against the attacked model"
    Config = InversionConfig
    purpose: ClassVar[str] = "unlearn"
    api_version = 2

    def base_prompts(self, prompts: list[str], concept: str) -> list[str]:
        drop = self.config.init == "without-concept"
        return [replace_concept(p, concept, None) if drop else p for p in prompts]

    def run(self, unet, world, concept, evaluation) -> AttackResult:
        cfg: InversionConfig = self.config  # type: ignore[assignment]
        x0, prompts = concept_examples(world, concept, cfg.k, cfg.images)
        cond = world.bank(self.base_prompts(prompts, concept))
        was_training = unet.training
        unet.eval()
        try:  # the attacked model is frozen: only the embedding learns
            offsets, losses = fit_prompt_offsets(
                unet, [(x0, cond)], torch.zeros((1, *cond.shape[1:]), device=cond.device),
                alphas_cumprod=world.alphas_cumprod, prediction=prediction_type(world.scheduler_config),
                device=world.device, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                generator=lambda step: draw_generator(cfg.seed, step),
            )  # fmt: skip
        finally:
            unet.train(was_training)
        delta = offsets[0]
        base = world.bank(self.base_prompts(world.concept_prompts(concept), concept))
        before = measure_swapped_rate(world, unet, concept, evaluation, cfg.samples, cfg.sampler_steps, base)
        learned = base + delta.detach()
        after = measure_swapped_rate(world, unet, concept, evaluation, cfg.samples, cfg.sampler_steps, learned)
        best = after if after.rate >= before.rate else before
        return AttackResult(
            attack=self.name, concept=concept, concept_rate=best.rate, interval=best.interval, samples=best.samples,
            curve=[before.point(0), after.point(cfg.steps)],
            used={
                "images": len(x0), "image_source": str(cfg.images) if cfg.images else "world concept data",
                "steps": cfg.steps, "lr": cfg.lr, "init": cfg.init,
                "rendered_prompts": self.base_prompts(world.concept_prompts(concept), concept)[:8],
                "embedding_norm": float(delta.detach().norm()),
                "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            },
        )  # fmt: skip
