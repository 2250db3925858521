"""Block-output taps for feature KD: forward hooks store each named module's output (tuple outputs use [0])."""

from __future__ import annotations

from typing import Self

import torch
from torch import nn


def sd_block_names(unet: nn.Module) -> list[str]:
    """The 9 BK-SDM/paper feature blocks of an SD-shaped UNet: every down block, the mid block, every up block."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    return names


class FeatureTap:
    """Collects outputs of named submodules during forward passes, as a context manager.

    Hooks exist only inside `with tap:`; leaving the block removes them and drops the stored outputs, so a tap on
    the shared (frozen) teacher never outlives its use nor pins the last batch's features (large at SD scale).
    Copy `outputs` inside the block to keep them.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"feature modules not found in model: {missing}")
        self._modules = [(n, modules[n]) for n in names]
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def __enter__(self) -> Self:
        if self._handles:
            raise RuntimeError("FeatureTap is already active; it cannot be entered twice")
        self.outputs = {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self._modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.outputs = {}
