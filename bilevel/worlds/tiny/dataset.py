"""Procedural images with text prompts: a coloured shape on a dark background, deterministic by seed.

The world's prompt distribution (`PromptMix`) is what the teacher was trained on: colours named by either of their
names or not at all, and a style ("striped") drawn when asked and, unasked, on a share of the others: so the teacher
renders a concept on prompts that do not name it, the property through which distillation can re-teach a concept
absent from the data (as Stable Diffusion renders unwanted content for innocent prompts). The fine-tuning set
excludes every concept under all its names; the concept set holds only the concepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bilevel.core.errors import BilevelError
from bilevel.worlds.tiny.palette import (
    ALIASES,
    BACKGROUND,
    COLOURS,
    SHAPES,
    STYLES,
    colour_names,
    concept_names,
    is_style,
    prompt_for,
)


@dataclass(frozen=True)
class PromptMix:
    """How prompts describe images. Defaults are the shipped teacher's training distribution."""

    alias_share: float = 0.4  # colour named by its second name
    colourless_share: float = 0.15  # no colour word at all ("a circle")
    style_asked_share: float = 0.2  # the prompt names the style and the image is striped
    style_unasked_share: float = 0.25  # of the rest: striped although the prompt does not say so
    style_alias_share: float = 0.3  # of the asked: the style named by its second name


#: Primary names only, no colourless prompts, no style: the first tiny world's data (tests that need plain prompts).
PLAIN = PromptMix(alias_share=0.0, colourless_share=0.0, style_asked_share=0.0, style_unasked_share=0.0)


@dataclass(frozen=True)
class TinyWorldSample:
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    colours: list[str]
    shapes: list[str]
    colour_words: list[str | None] = field(default_factory=list)  # the word the prompt uses (None: colourless)
    striped: list[bool] = field(default_factory=list)  # drawn striped
    style_words: list[str | None] = field(default_factory=list)  # the style word the prompt uses (None: unasked)

    @property
    def prompts(self) -> list[str]:
        words = self.colour_words or list(self.colours)
        styles = self.style_words or [None] * len(self)
        return [prompt_for(w, s, st) for w, s, st in zip(words, self.shapes, styles, strict=True)]

    def __len__(self) -> int:
        return len(self.colours)


def check_colours(names: list[str] | tuple[str, ...], what: str = "concept") -> None:
    """Refuse anything that is not a tiny-world concept (a colour or a style) in one line."""
    known = concept_names()
    for name in names:
        if not name or not name.strip():
            raise BilevelError(f"empty {what} name; accepted: {', '.join(known)}")
        if name not in known:
            raise BilevelError(f"unknown {what} {name!r} for the tiny world; accepted: {', '.join(known)}")


def render_shape(colour: str, shape: str, size: int, gen: torch.Generator, *, striped: bool = False) -> torch.Tensor:
    """One (3, size, size) image in [0, 1]: random position, size and slight colour jitter; `striped` leaves every
    other row of the shape out, starting from its top row (so every striped shape shows a gap between rows)."""
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
    if striped:
        top = int(mask.any(dim=1).nonzero().min()) if mask.any() else 0
        mask = mask & ((torch.arange(size).view(size, 1) - top) % 2 == 0)
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
    mix: PromptMix = PromptMix(),
) -> TinyWorldSample:
    """n samples drawn from the world's prompt distribution `mix`.

    `include`: only these concepts (colours: only those colours, always named; a style: every image striped and
    the prompt naming it). `exclude`: never these concepts under any name (colours: not drawn; a style: never drawn,
    never named)."""
    include, exclude = list(include or []), list(exclude or [])
    check_colours(include, "colour")
    check_colours(exclude)
    include_colours = [c for c in include if not is_style(c)]
    colours = [c for c in (include_colours or colour_names()) if c not in exclude]
    if not colours:
        raise BilevelError("no colours left after excluding the concepts; exclude fewer colours")
    forced_style = next((c for c in include if is_style(c)), None)
    banned_styles = {c for c in exclude if is_style(c)}
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(colours), (n,), generator=gen).tolist()
    shape_picks = torch.randint(len(SHAPES), (n,), generator=gen).tolist()
    draws = torch.rand(n, 5, generator=gen).tolist()
    chosen_c = [colours[i] for i in picks]
    chosen_s = [SHAPES[i] for i in shape_picks]
    colour_words: list[str | None] = []
    striped: list[bool] = []
    style_words: list[str | None] = []
    style = forced_style or next((s for s in STYLES if s not in banned_styles), None)
    for colour, (d_alias, d_colourless, d_asked, d_unasked, d_style_alias) in zip(chosen_c, draws, strict=True):
        if include_colours or d_colourless >= mix.colourless_share:
            colour_words.append(ALIASES[colour] if d_alias < mix.alias_share else colour)
        else:
            colour_words.append(None)
        asked = style is not None and (forced_style is not None or d_asked < mix.style_asked_share)
        if asked:
            style_words.append(STYLES[style] if d_style_alias < mix.style_alias_share else style)
            striped.append(True)
        else:
            style_words.append(None)
            striped.append(style is not None and d_unasked < mix.style_unasked_share)
    images = torch.stack(
        [render_shape(c, s, size, gen, striped=st) for c, s, st in zip(chosen_c, chosen_s, striped, strict=True)]
    )
    return TinyWorldSample(images * 2 - 1, chosen_c, chosen_s, colour_words, striped, style_words)
