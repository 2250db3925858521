"""The tiny world bundled for a run: frozen teacher, prompt embeddings, clean and concept data, evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import PromptBank
from .dataset import TinyWorldSample, check_colours, make_dataset
from .palette import SHAPES, colour_names, prompt_for


@dataclass
class TinyWorld:
    pipe: object  # TinyTextToImagePipeline
    concepts: list[str]
    bank: PromptBank
    finetune: TinyWorldSample
    concept_data: TinyWorldSample
    device: torch.device

    @classmethod
    def build(cls, pipe, concepts: list[str], finetune_size: int, concept_size: int, seed: int, device: str = "cpu"):
        check_colours(concepts)
        size = pipe.unet.config.sample_size
        bank = PromptBank(pipe.encode_prompts, device)
        finetune = make_dataset(finetune_size, seed, size=size, exclude=concepts)
        concept_data = make_dataset(concept_size, seed + 1, size=size, include=concepts)
        bank.add([""] + [prompt_for(c, s) for c in colour_names() for s in SHAPES])
        return cls(pipe, concepts, bank, finetune, concept_data, torch.device(device))

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def teacher(self):
        return self.pipe.unet

    @property
    def scheduler_config(self) -> dict:
        return dict(self.pipe.scheduler.config)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.pipe.scheduler.alphas_cumprod.float()

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.pipe.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def concept_prompts(self, concept: str | None = None) -> list[str]:
        chosen = [concept] if concept else self.concepts
        return [prompt_for(c, s) for c in chosen for s in SHAPES]

    def retain_colours(self) -> list[str]:
        return [c for c in colour_names() if c not in self.concepts]

    def retain_prompts(self) -> list[str]:
        return [prompt_for(c, s) for c in self.retain_colours() for s in SHAPES]
