"""The tiny world's vocabulary: colours (the concept attribute) and shapes (a nuisance attribute in prompts)."""

from __future__ import annotations

import torch

#: Colour name -> RGB in 0..255. Far enough apart that a 16x16 model's imperfect colours still classify.
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
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Background colour (dark grey); the detector treats pixels close to it as background.
BACKGROUND: tuple[int, int, int] = (24, 24, 24)


def colour_names() -> list[str]:
    return list(COLOURS)


def prompt_for(colour: str, shape: str | None = None) -> str:
    return f"a {colour} {shape}" if shape else f"a {colour} shape"


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
