"""The digits world's concept detector: a small CNN trained on the real train split, with a `none` outcome.

Why `none`: noise, a blank canvas or a smudge from an erased model must not count as the concept (nor as any other
class). An image is `none` when the network puts it in its reject class (trained on synthetic blanks and noise) or
its top-class probability is under a threshold calibrated on real digits the network did not fit.
The penultimate features are exposed for a Frechet distance between generated and held-out real digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bilevel.core.errors import BilevelError
from bilevel.plugins.worlds.digits.data import CLASS_NAMES, IMAGE_SIZE
from bilevel.toolkit import load_tensors, read_format_json

NONE = "none"
FORMAT = "bilevel-digits-detector/1"
SHIPPED = Path(__file__).resolve().parents[3] / "assets" / "digits-detector"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
REJECT = len(CLASS_NAMES)  # index of the reject class among the network's outputs


class DetectorArch(BaseModel):
    """The network's shape (saved with the weights so a folder is self-describing)."""

    model_config = ConfigDict(extra="forbid")
    conv_channels: tuple[int, int] = (16, 32)
    feature_dim: int = Field(64, gt=0)


class DigitClassifier(nn.Module):
    """conv-conv-pool-linear (penultimate features) - linear: ten digits plus a reject class."""

    def __init__(self, arch: DetectorArch | None = None) -> None:
        super().__init__()
        arch = arch or DetectorArch()
        c1, c2 = arch.conv_channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(c2 * (IMAGE_SIZE // 2) ** 2, arch.feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(arch.feature_dim, len(CLASS_NAMES) + 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True)
class Detection:
    labels: list[str]  # class word ("seven") or "none"
    indices: torch.Tensor  # (N,) class index, -1 for none
    probs: torch.Tensor  # (N, 10) softmax probability of each digit (the reject class's share is the rest)


@dataclass
class DigitDetector:
    """A trained classifier and its calibrated confidence threshold."""

    model: DigitClassifier
    threshold: float
    info: dict  # the config.json it was loaded from (training settings, measured accuracy)

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> Detection:
        """Label images (N, 1 or 3, 8, 8) in [-1, 1]."""
        probs = self.model.eval()(prepare(images)).softmax(1)
        conf, top = probs.max(1)
        none = (top == REJECT) | (conf < self.threshold)
        indices = torch.where(none, torch.full_like(top, -1), top)
        labels = [NONE if i < 0 else CLASS_NAMES[i] for i in indices.tolist()]
        return Detection(labels=labels, indices=indices, probs=probs[:, :REJECT])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) penultimate activations, for a Frechet distance."""
        return self.model.eval().features(prepare(images))


def prepare(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) float in [-1, 1]: RGB inputs are averaged to grey, out-of-range samples clamped."""
    x = images.detach().float().cpu()
    if x.ndim != 4 or x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE) or x.shape[1] not in (1, 3):
        raise BilevelError(
            f"the digits detector takes (N, 1 or 3, {IMAGE_SIZE}, {IMAGE_SIZE}) images, got {tuple(x.shape)}"
        )
    return x.mean(1, keepdim=True).clamp(-1, 1)


def load_detector(folder: Path | str = SHIPPED) -> DigitDetector:
    """A detector folder (model.safetensors + config.json); the shipped one by default."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise BilevelError(f"no digits detector at {folder} (missing {CONFIG}); retrain it with "
                           "`python -m bilevel.plugins.worlds.digits.detector_training`")  # fmt: skip
    info = read_format_json(folder / CONFIG, FORMAT, "digits detector config")
    model = DigitClassifier(DetectorArch.model_validate(info["arch"]))
    try:
        model.load_state_dict(load_tensors(folder / WEIGHTS))
    except RuntimeError as exc:
        raise BilevelError(
            f"weights in {folder / WEIGHTS} do not match its {CONFIG}: {str(exc).splitlines()[0]}"
        ) from None
    return DigitDetector(model=model.eval().requires_grad_(False), threshold=float(info["threshold"]), info=info)


@lru_cache(maxsize=1)
def shipped_detector() -> DigitDetector:
    """The shipped detector, loaded once per process."""
    return load_detector(SHIPPED)
