"""The tiny world bundled for a run: frozen teacher, prompt embeddings, clean and concept data, evaluation.
It implements `core.world.World` in pixel space (x0 are the images themselves, in [-1, 1])."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bilevel.core.world import EvalOutput
from bilevel.diffusion.conditioning import PromptBank
from bilevel.runtime.precision import autocast
from bilevel.worlds.pixel_pipeline import PixelPipelineWorld
from bilevel.worlds.tiny.dataset import PromptMix, TinyWorldSample, check_colours, make_dataset
from bilevel.worlds.tiny.palette import ALIASES, SHAPES, STYLES, colour_names, is_style, names_of, prompt_for

#: the tiny world's stated sampler: DDIM 25 steps, no classifier-free guidance (the shipped teacher renders every colour
#: under both names at >= 0.95 so; guidance 2 desaturates orange and pink below 0.7, see its model card)
DEFAULT_GUIDANCE = 1.0


@dataclass
class TinyWorld(PixelPipelineWorld):
    pipe: Any  # TinyTextToImagePipeline
    concepts: list[str]
    bank: PromptBank
    finetune: TinyWorldSample
    concept_data: TinyWorldSample
    device: torch.device
    precision: str = "no"
    name: str = "tiny"
    clamp_samples: bool = field(default=True, init=False)
    quality_metric: str = field(default="swd", init=False)

    @classmethod
    def build(
        cls,
        pipe,
        concepts: list[str],
        finetune_size: int,
        concept_size: int,
        seed: int,
        device: str = "cpu",
        precision: str = "no",
    ) -> TinyWorld:
        check_colours(concepts)
        size = pipe.unet.config.sample_size
        bank = PromptBank(pipe.encode_prompts, device)
        finetune = make_dataset(finetune_size, seed, size=size, exclude=concepts)
        # unlearners are given the concepts' primary names only (the second names are the paraphrase attack)
        concept_data = make_dataset(concept_size, seed + 1, size=size, include=concepts, mix=PromptMix(alias_share=0))
        names = [w for c in colour_names() for w in (c, ALIASES[c], None)]
        bank.add([""] + [prompt_for(c, s, st) for c in names for s in SHAPES for st in (None, *STYLES)])
        return cls(pipe, list(concepts), bank, finetune, concept_data, torch.device(device), precision)

    def concept_prompts(self, concept: str | None = None) -> list[str]:
        """Colour concepts: `a <colour> <shape>`; a style: `a <shape> <style>` (the style alone, no colour)."""
        chosen = [concept] if concept else self.concepts
        return [prompt_for(None, s, c) if is_style(c) else prompt_for(c, s) for c in chosen for s in SHAPES]

    def retain_colours(self) -> list[str]:
        return [c for c in colour_names() if c not in self.concepts]

    @property
    def colour_concepts(self) -> list[str]:
        return [c for c in self.concepts if not is_style(c)]

    @property
    def style_concepts(self) -> list[str]:
        return [c for c in self.concepts if is_style(c)]

    def retain_prompts(self) -> list[str]:
        return [prompt_for(c, s) for c in self.retain_colours() for s in SHAPES]

    def evaluate(self, unet: torch.nn.Module, settings) -> EvalOutput:
        from bilevel.worlds.tiny.evaluation import evaluate_tiny

        with autocast(self.precision, self.device):
            return evaluate_tiny(
                unet, self, samples_per_colour=settings.samples_per_prompt,
                concept_samples=settings.concept_sample_count(), steps=settings.steps,
                guidance=settings.guidance_or(DEFAULT_GUIDANCE), seed=settings.seed, secondary=settings.secondary,
            )  # fmt: skip

    def concept_aliases(self, concept: str) -> list[str]:
        """The concept's second name, which the teacher learned and the unlearners are never given."""
        return [name for name in names_of(concept) if name != concept]
