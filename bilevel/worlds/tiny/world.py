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
from bilevel.worlds.tiny.dataset import TinyWorldSample, check_colours, make_dataset
from bilevel.worlds.tiny.palette import SHAPES, colour_names, prompt_for

#: the tiny world's stated sampler: DDIM 25 steps at guidance 2 (what the shipped teacher was measured with)
DEFAULT_GUIDANCE = 2.0


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
        concept_data = make_dataset(concept_size, seed + 1, size=size, include=concepts)
        bank.add([""] + [prompt_for(c, s) for c in colour_names() for s in SHAPES])
        return cls(pipe, list(concepts), bank, finetune, concept_data, torch.device(device), precision)

    def concept_prompts(self, concept: str | None = None) -> list[str]:
        chosen = [concept] if concept else self.concepts
        return [prompt_for(c, s) for c in chosen for s in SHAPES]

    def retain_colours(self) -> list[str]:
        return [c for c in colour_names() if c not in self.concepts]

    def retain_prompts(self) -> list[str]:
        return [prompt_for(c, s) for c in self.retain_colours() for s in SHAPES]

    def evaluate(self, unet: torch.nn.Module, settings) -> EvalOutput:
        from bilevel.worlds.tiny.evaluation import evaluate_tiny

        with autocast(self.precision, self.device):
            return evaluate_tiny(
                unet, self, samples_per_colour=settings.samples_per_prompt,
                concept_samples=settings.concept_sample_count(), steps=settings.steps,
                guidance=settings.guidance_or(DEFAULT_GUIDANCE), seed=settings.seed,
            )  # fmt: skip
