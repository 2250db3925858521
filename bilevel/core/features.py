"""Block-output taps for feature KD: forward hooks store each named module's output (tuple outputs use [0])."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FeaturePair:
    """Student module output matched to a teacher module output.

    teacher_channels: for channel-pruned students, the teacher channels the student kept (in student order);
    None when the shapes already agree.
    """

    student: str
    teacher: str
    teacher_channels: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        return {"student": self.student, "teacher": self.teacher, "teacher_channels": self.teacher_channels}

    @classmethod
    def from_json(cls, d: dict) -> FeaturePair:
        ch = d.get("teacher_channels")
        return cls(d["student"], d["teacher"], tuple(ch) if ch is not None else None)


def sd_block_names(unet: nn.Module) -> list[str]:
    """The 9 BK-SDM/paper feature blocks of an SD-shaped UNet: every down block, the mid block, every up block."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    return names


class FeatureTap:
    """Collects outputs of named submodules during forward passes; `clear()` between passes."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"feature modules not found in model: {missing}")
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def clear(self) -> None:
        self.outputs = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
