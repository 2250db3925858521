"""The k concept examples attacks learn from: the world's concept data, or a folder of PNG images."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from bilevel.core.errors import BilevelError
from bilevel.core.world import World
from bilevel.diffusion.image_sets import load_png_folder


def concept_examples(world: World, concept: str, k: int, folder: Path | None = None) -> tuple[torch.Tensor, list[str]]:
    """(x0 (k', C, H, W) in the sample space, one prompt each), k' <= k, in a fixed order (deterministic).

    folder: PNG images (prompt from a `<stem>.txt` beside each, else the world's concept prompts in turn);
    otherwise world.concept_data's examples of `concept` (all of them when the world has only this concept, as a
    Stable Diffusion concept folder's captions need not name it)."""
    concept_prompts = world.concept_prompts(concept)
    if folder is not None:
        pixels, _, prompts = load_png_folder(Path(folder), world.image_shape)
        x0 = world.encode_images(pixels[:k].to(world.device))
        filled = [p or concept_prompts[i % len(concept_prompts)] for i, p in enumerate(prompts[:k])]
        return x0, filled
    data = world.concept_data
    word = re.compile(rf"(?<!\w){re.escape(concept)}(?!\w)", re.IGNORECASE)
    picks = [i for i, p in enumerate(data.prompts) if len(world.concepts) == 1 or word.search(p)][:k]
    if not picks:
        raise BilevelError(f"world {world.name!r} has no concept data for {concept!r}; give a PNG folder (images=DIR)")
    return data.images[picks].to(world.device), [data.prompts[i] for i in picks]
