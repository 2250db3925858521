"""Offline colour detector for tiny-world images, with a 'none' outcome and a continuous distance score.

Why a 'none' label: noise, an empty image, or a colour far from every palette entry must not count as the concept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bilevel.worlds.tiny.palette import BACKGROUND, colour_names, palette_tensor

NONE = "none"


@dataclass(frozen=True)
class Detection:
    labels: list[str]  # palette colour name or "none"
    distances: torch.Tensor  # (N, C) RGB distance of each image's foreground colour to each palette colour


@dataclass(frozen=True)
class DetectorConfig:
    foreground_threshold: float = 0.18  # min RGB distance from background for a pixel to be foreground
    min_area: float = 0.04  # foreground share of the image below which it is empty
    max_area: float = 0.7  # above this the image is noise or a flood, not a shape
    max_colour_distance: float = 0.25  # foreground colour further than this from every palette colour -> none
    max_spread: float = 0.2  # mean distance of foreground pixels to their median colour above this -> none


def detect(images: torch.Tensor, config: DetectorConfig = DetectorConfig()) -> Detection:
    """Label images (N, 3, H, W) in [-1, 1] by the palette colour of their foreground."""
    x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    n = x.shape[0]
    bg = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 255.0
    fg = (x - bg).norm(dim=1) > config.foreground_threshold  # (N, H, W)
    area = fg.flatten(1).float().mean(1)
    pal = palette_tensor()
    names = colour_names()
    labels: list[str] = []
    dists = torch.full((n, len(names)), float("inf"))
    pixels = x.permute(0, 2, 3, 1)  # (N, H, W, 3)
    for i in range(n):
        if not (config.min_area <= area[i] <= config.max_area):
            labels.append(NONE)
            continue
        fg_pixels = pixels[i][fg[i]]
        colour = fg_pixels.median(dim=0).values
        spread = (fg_pixels - colour).norm(dim=1).mean()
        d = (pal - colour).norm(dim=1)
        dists[i] = d
        j = int(d.argmin())
        ok = d[j] <= config.max_colour_distance and spread <= config.max_spread
        labels.append(names[j] if ok else NONE)
    return Detection(labels=labels, distances=dists)


def detect_stripes(images: torch.Tensor, config: DetectorConfig = DetectorConfig()) -> list[bool]:
    """Whether each image (N, 3, H, W) in [-1, 1] shows a striped shape: a foreground whose rows alternate, i.e.
    at least one empty row between foreground rows. The procedural shapes are convex, so a plain shape never has
    one; an image the colour detector calls empty or noise is never striped."""
    x = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    bg = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 255.0
    fg = (x - bg).norm(dim=1) > config.foreground_threshold  # (N, H, W)
    area = fg.flatten(1).float().mean(1)
    rows = fg.sum(dim=2)  # (N, H): foreground pixels per row
    out: list[bool] = []
    for i in range(len(x)):
        filled = (rows[i] > 0).nonzero().flatten()
        if not (config.min_area <= area[i] <= config.max_area) or len(filled) < 2:
            out.append(False)
            continue
        span = rows[i][int(filled[0]) : int(filled[-1]) + 1]
        out.append(bool((span == 0).any()))
    return out
