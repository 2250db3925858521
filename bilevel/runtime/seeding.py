"""Counter-based randomness: draw i of a (seed, salt, stream) sequence uses its own generator, so an interrupted and
resumed run draws exactly the batches an uninterrupted one would, and no two sequences share a draw."""

from __future__ import annotations

import torch


def draw_generator(seed: int, index: int, salt: int = 0, stream: int = 0) -> torch.Generator:
    """The generator of draw `index`. salt separates sequences of one run (lower/upper level); stream > 0 gives an
    independent sequence for the same draw (each data-parallel process's own share of a batch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + salt * 7_919 + index + (stream << 44))
