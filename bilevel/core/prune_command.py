"""`bilevel prune`: prune a teacher with a registered pruner and write the student folder plus a size/speed report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .errors import BilevelError
from .interfaces import CalibrationBatch, PruneResult
from .modelinfo import ModelStats, model_stats
from .report import console, results_table, write_json
from .student_io import MANIFEST, make_manifest, save_student

REPORT = "prune_report.json"
COLUMNS = [("model", "model"), ("params", "params"), ("macs", "MACs"), ("latency_ms", "latency (ms)")]


def calibration_batch(pipe: Any, n: int, seed: int) -> CalibrationBatch:
    """Clean tiny-world images with their prompt embeddings (for data-driven importances such as Diff-Pruning)."""
    from .tinyworld.dataset import make_dataset

    unet = pipe.unet
    data = make_dataset(n, seed, size=unet.config.sample_size)
    with torch.no_grad():
        cond = pipe.encode_prompts(data.prompts)
    p = next(unet.parameters())
    return CalibrationBatch(
        x0=data.images.to(p.device, p.dtype),
        cond=cond.to(p.device, p.dtype),
        alphas_cumprod=pipe.scheduler.alphas_cumprod.float().to(p.device),
    )


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def prune_to_folder(
    teacher_source: str,
    pruner_name: str,
    options: dict[str, Any] | None,
    out: Path,
    *,
    device: str = "cpu",
    calibration_size: int = 64,
    seed: int = 0,
    latency_batch: int = 64,
    latency_repeats: int = 10,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prune the teacher at `teacher_source` ('tiny' or a pipeline folder) and save the student in `out`.

    Writes out/model.safetensors + out/manifest.json (reload with student_io.load_student) and out/prune_report.json;
    prints a before/after table of params, MACs and latency. Returns the report.
    """
    from ..registry import get_registry
    from .models import load_tiny_pipeline

    out = Path(out)
    if (out / MANIFEST).exists() and not overwrite:
        raise BilevelError(f"{out} already holds a student; choose another output folder or pass overwrite")
    if calibration_size < 1:
        raise BilevelError(f"calibration_size must be at least 1, got {calibration_size}")
    pruner = get_registry().create("pruner", pruner_name, options or {})
    torch.manual_seed(seed)
    pipe = load_tiny_pipeline(teacher_source, device)
    teacher = pipe.unet
    calibration = calibration_batch(pipe, calibration_size, seed)

    t0 = time.perf_counter()
    result: PruneResult = pruner.prune(teacher, calibration)
    prune_seconds = time.perf_counter() - t0
    student = result.student.eval()

    save_student(out, student, make_manifest(student, result.feature_pairs, **result.manifest, teacher=teacher_source))

    before: ModelStats = model_stats(teacher, latency_batch, latency_repeats)
    after: ModelStats = model_stats(student, latency_batch, latency_repeats)
    ratios = {
        "params": after.params / before.params,
        "macs": after.macs / before.macs,
        "latency_ms": after.latency_ms / before.latency_ms,
    }
    rows = [
        {"model": "teacher", **before.to_json()},
        {"model": f"student ({pruner_name})", **after.to_json()},
        {"model": "student / teacher", **ratios},
    ]
    console.print(
        results_table(f"bilevel prune: {pruner_name} (latency at batch {latency_batch}, {device})", rows, COLUMNS)
    )
    report = {
        "teacher": teacher_source,
        "pruner": pruner_name,
        "options": pruner.config.model_dump(mode="json"),
        "student_folder": str(out),
        "device": device,
        "prune_seconds": prune_seconds,
        "teacher_stats": before.to_json(),
        "student_stats": after.to_json(),
        "ratios": ratios,
        "feature_pairs": [p.to_json() for p in result.feature_pairs],
        "notes": {k: _jsonable(v) for k, v in result.notes.items()},
    }
    write_json(out / REPORT, report)
    return report
