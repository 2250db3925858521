"""`relearn-benign`: concept resurgence. Continue fine-tuning a copy of the attacked model on the world's
concept-free data (the diffusion loss; optionally plus output KD from the world's unerased teacher, the paper's
lower level without feature KD) and measure the concept along the way."""

from __future__ import annotations

import copy
from typing import ClassVar

from pydantic import Field

from bilevel.core.attack import Attack, AttackConfig, AttackResult
from bilevel.core.errors import BilevelError
from bilevel.toolkit import RelearnData, measure_concept_rate, prediction_type, relearn


class RelearnBenignConfig(AttackConfig):
    steps: int = Field(100, ge=0, description="fine-tuning steps on concept-free data")
    curve_points: int = Field(3, gt=0, description="concept-rate measurements after step 0, evenly spaced")
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (the tiny world's lower-level rate)")
    kd: bool = Field(False, description="add output KD from the world's teacher (the paper's lower level)")
    kd_weight: float = Field(1.0, ge=0, description="weight of the output-KD term when kd is on")


class RelearnBenign(Attack):
    name: ClassVar[str] = "relearn-benign"
    description: ClassVar[str] = "fine-tune a copy on concept-free data (DDPM, optionally + KD); concept rate curve"
    Config = RelearnBenignConfig
    purpose: ClassVar[str] = "run"
    api_version = 2

    def run(self, unet, world, concept, evaluation) -> AttackResult:
        cfg: RelearnBenignConfig = self.config  # type: ignore[assignment]
        if len(world.finetune) == 0:
            raise BilevelError(
                f"relearn-benign needs concept-free fine-tuning data and world {world.name!r} has none "
                "(Stable Diffusion: set data.finetune_data)"
            )
        data = RelearnData(world.finetune.images, world.bank(list(world.finetune.prompts)), world.bank.empty(1)[0])
        at = [round(cfg.steps * i / cfg.curve_points) for i in range(cfg.curve_points + 1)]
        curve = relearn(
            copy.deepcopy(unet), data, world.alphas_cumprod,
            lambda m: measure_concept_rate(world, m, concept, evaluation, cfg.samples, cfg.sampler_steps),
            steps=cfg.steps, measure_at=at, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
            prediction_type=prediction_type(world.scheduler_config),
            teacher=world.teacher if cfg.kd else None, kd_weight=cfg.kd_weight,
        )  # fmt: skip
        step, best = max(curve, key=lambda p: p[1].rate)  # the attacker keeps the checkpoint that works best
        return AttackResult(
            attack=self.name, concept=concept, concept_rate=best.rate, interval=best.interval, samples=best.samples,
            curve=[m.point(s) for s, m in curve],
            used={"data": f"world fine-tuning data ({len(world.finetune)} concept-free examples)",
                  "objective": "ddpm + output KD from the teacher" if cfg.kd else "ddpm",
                  "steps": cfg.steps, "lr": cfg.lr, "batch_size": cfg.batch_size, "best_at": step},
        )  # fmt: skip
