"""Inversion hardening of the upper level (AdvUnlearn-style, with the concept-inversion attack as the adversary).

Why: an erased student still renders the concept when an attacker learns a prompt embedding for it from a few
concept images (the `inversion` attack: 0.81 on the default bilevel student against 0.09 under the plain
prompt). So, every `every` upper updates, the run learns such an embedding against the current student (warm
started from the last one: the concept prompts with the concept word removed, plus one learned offset per
concept, fitted to concept images with the diffusion loss while the student is frozen), and the upper loss
becomes the unlearner's loss plus `weight` times the same loss with the student conditioned on that embedding in
place of the concept prompts. The unlearner's targets (e.g. ESD's frozen-model negative guidance) are unchanged:
the student must give the erased answer to the attacker's embedding too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bilevel.core.config import InversionHardening
from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import Objective, UnlearnContext
from bilevel.core.world import World
from bilevel.diffusion.conditioning_swap import ConditioningSwap
from bilevel.diffusion.kd_objective import DrawCounter
from bilevel.diffusion.noise import prediction_type
from bilevel.diffusion.prompt_mapping import replace_concept
from bilevel.diffusion.prompt_offsets import fit_prompt_offsets
from bilevel.worlds.concept_examples import concept_examples


class InversionAdversary:
    """One learned offset per concept, refreshed against the student; renders the student under it."""

    def __init__(self, world: World, config: InversionHardening, seed: int) -> None:
        self.world, self.config, self.seed = world, config, seed
        keys, base, owner = [], [], []
        self.examples: list[tuple[torch.Tensor, torch.Tensor]] = []  # per concept: (x0, base conditioning)
        for c_index, concept in enumerate(world.concepts):
            prompts = world.concept_prompts(concept)
            keys.append(world.bank(prompts))
            base.append(world.bank([replace_concept(p, concept, None) for p in prompts]))
            owner += [c_index] * len(prompts)
            x0, image_prompts = concept_examples(world, concept, config.k)
            self.examples.append((x0, world.bank([replace_concept(p, concept, None) for p in image_prompts])))
        self.keys, self.base = torch.cat(keys), torch.cat(base)
        self.owner = torch.tensor(owner)
        self.delta = torch.zeros((len(world.concepts), *self.base.shape[1:]), device=self.base.device)
        self.refreshes = 0
        self.last_loss: float | None = None

    def refresh(self, student: nn.Module, index: int) -> None:
        """`steps` Adam steps of every concept's offset against the student as it is now (student frozen);
        index: which refresh this is (its draws are seeded by it)."""
        cfg = self.config
        self.delta, losses = fit_prompt_offsets(
            student, self.examples, self.delta, alphas_cumprod=self.world.alphas_cumprod,
            prediction=prediction_type(self.world.scheduler_config), device=self.world.device, steps=cfg.steps,
            lr=cfg.lr, batch_size=cfg.batch_size,
            generator=lambda step: torch.Generator().manual_seed(self.seed * 1_000_003 + index * 1009 + step),
        )  # fmt: skip
        self.last_loss = losses[-1] if losses else self.last_loss
        self.refreshes += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta.detach().cpu(), "refreshes": torch.tensor(self.refreshes)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if "delta" in state:
            self.delta = state["delta"].to(self.delta.device, self.delta.dtype)
            self.refreshes = int(state["refreshes"])

    def attacked(self, student: nn.Module) -> ConditioningSwap:
        """The student with every concept prompt's conditioning replaced by the learned embedding."""
        values = self.base + self.delta[self.owner.to(self.delta.device)]
        return ConditioningSwap(student, self.keys, values, per_key=True)


def harden(
    upper: Objective, ctx: UnlearnContext, loss: Callable[[UnlearnContext, Any], torch.Tensor], world: World,
    config: InversionHardening, seed: int, counter: DrawCounter,
) -> tuple[Objective, InversionAdversary]:  # fmt: skip
    """The upper objective with the inversion term: draws refresh the adversary every `every` draws (before the
    first one too), and the loss adds `weight` x the unlearner's loss under the adversary's embedding."""
    adversary = InversionAdversary(world, config, seed)

    def draw() -> Any:
        if counter.count % config.every == 0:  # the upper draw counter: a resumed run refreshes at the same draws
            adversary.refresh(ctx.student, counter.count // config.every)
        return upper.draw()

    def hardened_loss(batch: Any) -> torch.Tensor:
        swapped = adversary.attacked(ctx.student)
        adversarial = loss(dataclasses.replace(ctx, student=swapped), batch)
        if swapped.matched == 0:
            raise BilevelError(
                "training.upper_inversion: the unlearner conditioned the student on none of the concept prompts, "
                "so the learned embedding could not stand in for them; it hardens unlearners that do (esd, "
                "concept-ablation, salun with the world's concept prompts)"
            )
        return upper.loss(batch) + config.weight * adversarial

    return Objective(draw=draw, loss=hardened_loss), adversary
