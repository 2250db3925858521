"""Procedural images with text prompts: a coloured shape on a dark background, deterministic by seed.

The fine-tuning set excludes the concept colours; the concept set holds only them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bilevel.core.errors import BilevelError
from bilevel.worlds.tiny.palette import BACKGROUND, COLOURS, SHAPES, colour_names, prompt_for


@dataclass(frozen=True)
class TinyWorldSample:
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    colours: list[str]
    shapes: list[str]

    @property
    def prompts(self) -> list[str]:
        return [prompt_for(c, s) for c, s in zip(self.colours, self.shapes)]

    def __len__(self) -> int:
        return len(self.colours)


def check_colours(names: list[str] | tuple[str, ...], what: str = "concept") -> None:
    known = colour_names()
    for name in names:
        if not name or not name.strip():
            raise BilevelError(f"empty {what} name; accepted: {', '.join(known)}")
        if name not in known:
            raise BilevelError(f"unknown {what} {name!r} for the tiny world; accepted: {', '.join(known)}")


def render_shape(colour: str, shape: str, size: int, gen: torch.Generator) -> torch.Tensor:
    """One (3, size, size) image in [0, 1]: random position, size and slight colour jitter."""
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    u = torch.rand(4, generator=gen)
    radius = size * (0.22 + 0.12 * u[0].item())
    cx = size * 0.5 + (u[1].item() - 0.5) * (size - 2 * radius) * 0.8
    cy = size * 0.5 + (u[2].item() - 0.5) * (size - 2 * radius) * 0.8
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        mask = dx**2 + dy**2 <= radius**2
    elif shape == "square":
        half = radius * 0.85
        mask = (dx.abs() <= half) & (dy.abs() <= half)
    elif shape == "triangle":
        # Upward triangle: below the apex, inside two slanted edges.
        mask = (dy >= -radius) & (dy <= radius * 0.8) & (dx.abs() <= (dy + radius) * 0.6)
    else:
        raise BilevelError(f"unknown shape {shape!r}; accepted: {', '.join(SHAPES)}")
    rgb = torch.tensor(COLOURS[colour], dtype=torch.float32) / 255.0
    rgb = (rgb + (torch.rand(3, generator=gen) - 0.5) * 0.08).clamp(0, 1)
    bg = torch.tensor(BACKGROUND, dtype=torch.float32) / 255.0
    img = bg.view(3, 1, 1).expand(3, size, size).clone()
    img = img + torch.randn(3, size, size, generator=gen) * 0.012
    img = torch.where(mask.unsqueeze(0), rgb.view(3, 1, 1).expand(3, size, size), img)
    return img.clamp(0, 1)


def make_dataset(
    n: int,
    seed: int = 0,
    *,
    size: int = 8,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> TinyWorldSample:
    """n samples, colours drawn uniformly from `include` (default all) minus `exclude`."""
    colours = list(include) if include else colour_names()
    check_colours(colours, "colour")
    if exclude:
        check_colours(exclude)
        colours = [c for c in colours if c not in exclude]
    if not colours:
        raise BilevelError("no colours left after excluding the concepts; exclude fewer colours")
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(colours), (n,), generator=gen).tolist()
    shape_picks = torch.randint(len(SHAPES), (n,), generator=gen).tolist()
    chosen_c = [colours[i] for i in picks]
    chosen_s = [SHAPES[i] for i in shape_picks]
    images = torch.stack([render_shape(c, s, size, gen) for c, s in zip(chosen_c, chosen_s)])
    return TinyWorldSample(images=images * 2 - 1, colours=chosen_c, shapes=chosen_s)
