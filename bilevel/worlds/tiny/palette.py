"""The tiny world's vocabulary: colours (the concept attribute, each with a second name), shapes (a nuisance
attribute in prompts) and one style ("striped", compositional like an artist's style: it applies to any colour and
shape)."""

from __future__ import annotations

import torch

#: Colour name -> RGB in 0..255. Far enough apart that a small model's imperfect colours still classify.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 225, 40),
    "green": (40, 185, 60),
    "cyan": (40, 210, 220),
    "blue": (40, 70, 230),
    "purple": (140, 40, 210),
    "pink": (250, 120, 200),
}
#: Each colour's second name: the teacher learns both; unlearners are given only the primary one, so the alias is
#: the paraphrase attack of the robustness work.
ALIASES: dict[str, str] = {
    "red": "crimson",
    "orange": "amber",
    "yellow": "gold",
    "green": "emerald",
    "cyan": "teal",
    "blue": "azure",
    "purple": "violet",
    "pink": "rose",
}
#: Style concepts (primary name -> second name). A style is drawn on any colour and shape.
STYLES: dict[str, str] = {"striped": "banded"}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Background colour (dark grey); the detector treats pixels close to it as background.
BACKGROUND: tuple[int, int, int] = (24, 24, 24)


def colour_names() -> list[str]:
    return list(COLOURS)


def style_names() -> list[str]:
    return list(STYLES)


def concept_names() -> list[str]:
    """Everything `--concept` accepts on the tiny world: the colours and the styles."""
    return colour_names() + style_names()


def is_style(name: str) -> bool:
    return name in STYLES


def names_of(concept: str) -> list[str]:
    """Every word that names a concept (primary first): what the fine-tuning data must never contain."""
    second = ALIASES.get(concept) or STYLES.get(concept)
    return [concept, second] if second else [concept]


def prompt_for(colour: str | None, shape: str | None = None, style: str | None = None) -> str:
    """`a <colour> <shape> [style]`; the colour may be any of its names or None (a colourless prompt)."""
    words = ["a"] + ([colour] if colour else []) + [shape or "shape"] + ([style] if style else [])
    return " ".join(words)


def palette_tensor() -> torch.Tensor:
    """(C, 3) float tensor of the palette in [0, 1], in `colour_names()` order."""
    return torch.tensor([COLOURS[c] for c in COLOURS], dtype=torch.float32) / 255.0


def nearest_colours(colour: str, k: int = 2) -> list[str]:
    """The k palette colours closest in RGB to `colour`: where collateral damage of erasing it shows first."""
    pal = palette_tensor()
    names = colour_names()
    i = names.index(colour)
    d = (pal - pal[i]).norm(dim=1)
    d[i] = float("inf")
    return [names[j] for j in d.argsort()[:k].tolist()]
