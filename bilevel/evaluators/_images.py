"""Checks shared by the evaluators: they all take float image batches in [0, 1], shape [N, 3, H, W]."""

from __future__ import annotations

import torch

from bilevel.core.errors import BilevelError

#: A VAE decode mapped with (x + 1) / 2 overshoots [0, 1] by a few percent; that is clamped, as diffusers' own
#: post-processing does. Further out means another convention ([-1, 1] or 0..255), which would score silently wrong.
RANGE_SLACK = 0.25


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Refuse batches in another range convention ([-1, 1], 0..255), then clamp the slight overshoot to [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise BilevelError(f"{what} must be a torch.Tensor [N, 3, H, W] in [0, 1]; got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise BilevelError(f"{what} must have shape [N, 3, H, W] (RGB); got {list(images.shape)}")
    if not images.is_floating_point():
        raise BilevelError(f"{what} must be floating point in [0, 1]; got {images.dtype} (divide uint8 images by 255)")
    if images.numel() == 0:
        return images
    low, high = float(images.min()), float(images.max())
    if not (low >= -RANGE_SLACK and high <= 1 + RANGE_SLACK):  # also catches NaN
        raise BilevelError(
            f"{what} must be in [0, 1]; got values in [{low:.3g}, {high:.3g}] (map [-1, 1] images with (x + 1) / 2)"
        )
    return images.clamp(0, 1)
