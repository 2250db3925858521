"""The real digits (scikit-learn's `load_digits`: 1,797 8x8 grey-level scans, 10 classes), split and prompted.

One channel: the scans are grey, and a 3-channel copy would only give the teacher a colour dimension to get wrong and
the detector one to ignore; a forward costs the same either way (only conv_in/conv_out see the channels).
The train / held-out split is stratified and fixed by a seed, drawn with torch (not sklearn) so it does not move
between scikit-learn versions. Every class has two names, a word and a numeral, so prompts can be paraphrased.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from bilevel.core.errors import BilevelError

CLASS_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Prompt templates, one per class name: the word ("a handwritten seven") and the numeral ("the digit 7").
TEMPLATES: tuple[str, ...] = ("a handwritten {word}", "the digit {numeral}")
IMAGE_SIZE = 8
CHANNELS = 1
MAX_GREY = 16.0
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.25
INSTALL_HINT = "the digits world needs scikit-learn: pip install 'bilevel[digits]'"


def prompt_for(digit: int, name: int = 0) -> str:
    """The prompt for a class under one of its two names (0: the word, 1: the numeral)."""
    return TEMPLATES[name].format(word=CLASS_NAMES[digit], numeral=digit)


def prompts_for(digit: int) -> list[str]:
    """Both prompts of a class."""
    return [prompt_for(digit, n) for n in range(len(TEMPLATES))]


def digit_of_prompt(prompt: str) -> int:
    """The class a prompt names (inverse of prompt_for)."""
    for digit in range(len(CLASS_NAMES)):
        if prompt in prompts_for(digit):
            return digit
    raise BilevelError(
        f"{prompt!r} is not a digits-world prompt; expected e.g. {prompt_for(7, 0)!r} or {prompt_for(7, 1)!r}"
    )


def parse_digit(name: str | int) -> int:
    """A class from its word ('seven') or numeral ('7'); anything else is a one-line error listing what is accepted."""
    text = str(name).strip().lower()
    if text in CLASS_NAMES:
        return CLASS_NAMES.index(text)
    if text.isdigit() and int(text) < len(CLASS_NAMES):
        return int(text)
    accepted = ", ".join(f"{w} ({i})" for i, w in enumerate(CLASS_NAMES))
    raise BilevelError(f"unknown digit {name!r}; accepted: {accepted}")


@lru_cache(maxsize=1)
def _load() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BilevelError(INSTALL_HINT) from None
    bunch = load_digits()  # read from the installed scikit-learn package; never downloaded
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / MAX_GREY * 2 - 1
    return images, torch.tensor(bunch.target, dtype=torch.long)


def load_real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images (N, 1, 8, 8) in [-1, 1] and labels (N,). Copies, so callers may modify them."""
    images, labels = _load()
    return images.clone(), labels.clone()


def split_indices(
    labels: torch.Tensor, seed: int = SPLIT_SEED, held_out_fraction: float = HELD_OUT_FRACTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices, stratified: each class contributes round(fraction * its count) to held-out."""
    if not 0 < held_out_fraction < 1:
        raise BilevelError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train, held = [], []
    for digit in range(len(CLASS_NAMES)):
        idx = (labels == digit).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(held_out_fraction * len(idx))
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


@dataclass(frozen=True)
class DigitsSample:
    images: torch.Tensor  # (N, 1, 8, 8) in [-1, 1]
    labels: torch.Tensor  # (N,) class indices
    names: torch.Tensor  # (N,) which name the prompt uses: 0 word, 1 numeral

    @property
    def prompts(self) -> list[str]:
        return [prompt_for(d, n) for d, n in zip(self.labels.tolist(), self.names.tolist())]

    @property
    def classes(self) -> list[str]:
        return [CLASS_NAMES[d] for d in self.labels.tolist()]

    def __len__(self) -> int:
        return len(self.labels)


def make_dataset(
    split: str = "train",
    seed: int = 0,
    *,
    include: list[str | int] | None = None,
    exclude: list[str | int] | None = None,
    split_seed: int = SPLIT_SEED,
) -> DigitsSample:
    """The real digits of one split ('train', 'held_out' or 'all') in `include` (default all) minus `exclude`.

    seed draws which name each sample's prompt uses; the images themselves are fixed by the split.
    """
    images, labels = _load()
    train, held = split_indices(labels, split_seed)
    chosen = {"train": train, "held_out": held, "all": torch.arange(len(labels))}.get(split)
    if chosen is None:
        raise BilevelError(f"unknown split {split!r}; accepted: train, held_out, all")
    keep = {parse_digit(d) for d in include} if include else set(range(len(CLASS_NAMES)))
    keep -= {parse_digit(d) for d in exclude or []}
    if not keep:
        raise BilevelError("no digits left after excluding the concepts; exclude fewer digits")
    mask = torch.tensor([int(label) in keep for label in labels[chosen]], dtype=torch.bool)
    chosen = chosen[mask]
    gen = torch.Generator().manual_seed(seed)
    names = torch.randint(len(TEMPLATES), (len(chosen),), generator=gen)
    return DigitsSample(images=images[chosen].clone(), labels=labels[chosen].clone(), names=names)
