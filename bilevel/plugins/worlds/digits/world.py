"""The digits world bundled for a run: frozen teacher, prompt embeddings, real clean and concept data, evaluation.

Pixel space (x0 are the real 8x8 grey digits in [-1, 1]), like the tiny world. Fine-tuning data is every real
train-split digit of the non-concept classes (about 1,210 images; `data.finetune_size` caps it by a seeded subset,
never repeats it: the training loop draws batches from it with replacement anyway); concept data is every real
train-split image of the concepts (`data.concept_size` caps it). Each image's prompt uses a seeded random one of
its class's two names, so both names are seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bilevel.core.world import EvalOutput
from bilevel.plugins.worlds.digits.data import CLASS_NAMES, DigitsSample, make_dataset, parse_digit, prompts_for
from bilevel.toolkit import PromptBank, autocast
from bilevel.worlds.pixel_pipeline import PixelPipelineWorld

#: the shipped teacher's stated sampler: DDIM 25 steps at guidance 1.25 (its model card: at 2 it renders badly)
DEFAULT_GUIDANCE = 1.25


def _subset(sample: DigitsSample, size: int, seed: int, device: torch.device) -> DigitsSample:
    """At most `size` examples (a seeded subset when there are more), on `device`."""
    keep = torch.arange(len(sample))
    if len(sample) > size:
        keep = torch.randperm(len(sample), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return DigitsSample(images=sample.images[keep].to(device), labels=sample.labels[keep], names=sample.names[keep])


@dataclass
class DigitsWorld(PixelPipelineWorld):
    pipe: Any  # TinyTextToImagePipeline
    source: Path  # the teacher's pipeline folder (its confusability is cached there)
    concepts: list[str]  # as given ("seven" or "7"); rates are reported under these names
    bank: PromptBank
    finetune: DigitsSample
    concept_data: DigitsSample
    device: torch.device
    precision: str = "no"
    name: str = "digits"
    clamp_samples: bool = field(default=True, init=False)
    quality_metric: str = field(default="fid-digits", init=False)

    @classmethod
    def build(
        cls, pipe, source: Path, concepts: list[str], finetune_size: int, concept_size: int, seed: int,
        device: str = "cpu", precision: str = "no",
    ) -> DigitsWorld:  # fmt: skip
        dev = torch.device(device)
        finetune = _subset(make_dataset("train", seed, exclude=list(concepts)), finetune_size, seed, dev)
        concept_data = _subset(make_dataset("train", seed + 1, include=list(concepts)), concept_size, seed + 1, dev)
        bank = PromptBank(pipe.encode_prompts, device)
        bank.add([""] + [p for d in range(len(CLASS_NAMES)) for p in prompts_for(d)])
        return cls(pipe, source, list(concepts), bank, finetune, concept_data, dev, precision)

    @property
    def concept_digits(self) -> list[int]:
        return [parse_digit(c) for c in self.concepts]

    @property
    def retain_digits(self) -> list[int]:
        return [d for d in range(len(CLASS_NAMES)) if d not in self.concept_digits]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1]; RGB inputs (e.g. PNG anchor images) are averaged to the world's one grey channel."""
        pixels = pixels.to(self.device)
        return pixels.mean(1, keepdim=True) if pixels.shape[1] == 3 and self.sample_shape[0] == 1 else pixels

    def concept_prompts(self, concept: str | None = None) -> list[str]:
        """Both names of each concept ("a handwritten seven", "the digit 7"): erasing one name must erase the other."""
        chosen = [parse_digit(concept)] if concept else self.concept_digits
        return [p for d in chosen for p in prompts_for(d)]

    def retain_prompts(self) -> list[str]:
        return [p for d in self.retain_digits for p in prompts_for(d)]

    def concept_aliases(self, concept: str) -> list[str]:
        """The concept's other name: the numeral for a word ("seven" -> "7") and the word for a numeral."""
        digit = parse_digit(concept)
        return [c for c in (CLASS_NAMES[digit], str(digit)) if c != concept.strip().lower()]

    def confusability(self) -> list[list[float]]:
        from bilevel.plugins.worlds.digits.neighbours import confusability

        return confusability(self.source, self.pipe, guidance=DEFAULT_GUIDANCE)

    def evaluate(self, unet: torch.nn.Module, settings) -> EvalOutput:
        from bilevel.plugins.worlds.digits.evaluation import evaluate_digits

        with autocast(self.precision, self.device):
            return evaluate_digits(
                unet, self, samples_per_class=settings.samples_per_prompt,
                concept_samples=settings.concept_sample_count(), steps=settings.steps,
                guidance=settings.guidance_or(DEFAULT_GUIDANCE), seed=settings.seed,
            )  # fmt: skip

    def pipeline_parts(self) -> dict[str, Any]:
        return {
            "text_encoder": self.pipe.text_encoder,
            "tokenizer": self.pipe.tokenizer,
            "scheduler": self.pipe.scheduler,
        }
