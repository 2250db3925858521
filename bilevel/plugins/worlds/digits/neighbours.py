"""Which digits sit next to a concept: measured, never chosen by hand.

- `confusability`: the teacher's soft confusion under its stated sampler (mean detector probability of class j on
  samples asked for class i, symmetrised). Hard counts are nearly all zero for a teacher that renders 98% as asked,
  so the probability mass is what ranks the neighbours; collateral is measured on the top ones.
- `farthest_digit`: the digit whose real train images are farthest from the concept's in the detector's
  penultimate features (the digits analogue of the tiny world's farthest colour), for unlearners that map the
  concept onto another class (Concept Ablation's anchor, SalUn's relabelling).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from bilevel.plugins.worlds.digits.data import CLASS_NAMES, make_dataset
from bilevel.plugins.worlds.digits.detector import shipped_detector

CONFUSABILITY = "confusability.json"
FORMAT = "bilevel-digits-confusability/1"
SAMPLES_PER_CLASS = 64
SEED = 0


@torch.no_grad()
def measure_confusability(pipe, *, steps: int = 25, guidance: float = 1.25) -> list[list[float]]:
    """(10, 10) symmetric: P(detected j | asked i) + P(detected i | asked j), detector probabilities averaged."""
    from bilevel.plugins.worlds.digits.quality import class_samples

    images = class_samples(pipe, SAMPLES_PER_CLASS, steps=steps, guidance=guidance, seed=SEED)
    probs = shipped_detector().detect(images.flatten(0, 1)).probs.view(len(CLASS_NAMES), SAMPLES_PER_CLASS, -1)
    soft = probs.mean(1)
    return (soft + soft.T).tolist()


def teacher_of(folder: Path) -> Path:
    """The teacher a pipeline folder stands for: the one an exported student came from (`bilevel export` records
    it), else the folder itself. Collateral is about the teacher's confusions, not the student's."""
    from bilevel.plugins.worlds.digits.plugin import teacher_folder

    record = Path(folder) / "bilevel_export.json"
    if record.is_file():
        origin = teacher_folder(str(json.loads(record.read_text()).get("pipeline", "")))
        if (origin / "model_index.json").is_file():
            return origin
    return Path(folder)


def confusability(folder: Path, pipe=None, *, steps: int = 25, guidance: float = 1.25) -> list[list[float]]:
    """The teacher's confusability, cached in its folder (measured there on first use, if writable). `pipe` is the
    folder's loaded pipeline when the caller has it; the teacher of an exported student is loaded when needed."""
    teacher = teacher_of(folder)
    if teacher.resolve() != Path(folder).resolve():
        pipe = None
    return _cached(str(teacher.resolve()), pipe, steps, guidance)


@lru_cache(maxsize=4)
def _cached(folder: str, pipe, steps: int, guidance: float) -> list[list[float]]:
    path = Path(folder) / CONFUSABILITY
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("format") == FORMAT and record.get("sampler") == {"steps": steps, "guidance": guidance}:
            return record["matrix"]
    if pipe is None:
        from bilevel.worlds.models import load_tiny_pipeline

        pipe = load_tiny_pipeline(folder)
    matrix = measure_confusability(pipe, steps=steps, guidance=guidance)
    record = {"format": FORMAT, "sampler": {"steps": steps, "guidance": guidance}, "seed": SEED,
              "samples_per_class": SAMPLES_PER_CLASS, "classes": list(CLASS_NAMES), "matrix": matrix}  # fmt: skip
    try:
        path.write_text(json.dumps(record, indent=1))
    except OSError:
        pass  # a read-only install: measured again next time, same numbers
    return matrix


def nearest_digits(matrix: list[list[float]], digit: int, exclude: set[int], k: int = 2) -> list[int]:
    """The k digits the teacher most confuses with `digit` (ties broken by class order), skipping `exclude`."""
    row = matrix[digit]
    order = sorted((d for d in range(len(CLASS_NAMES)) if d != digit and d not in exclude), key=lambda d: -row[d])
    return order[:k]


@lru_cache(maxsize=1)
def _class_means() -> torch.Tensor:
    data = make_dataset("train")
    feats = shipped_detector().features(data.images)
    return torch.stack([feats[data.labels == d].mean(0) for d in range(len(CLASS_NAMES))])


def farthest_digit(digit: int, exclude: set[int]) -> int:
    """The non-excluded digit whose real train images' mean detector features lie farthest from `digit`'s."""
    means = _class_means()
    dist = (means - means[digit]).norm(dim=1)
    for d in exclude | {digit}:
        dist[d] = -1.0
    return int(dist.argmax())
