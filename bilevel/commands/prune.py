"""`bilevel prune`: prune a teacher with a registered pruner and write the student folder plus a size/speed report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from bilevel.compression.model_stats import ModelStats, model_stats
from bilevel.compression.student_io import MANIFEST, make_manifest, save_student
from bilevel.core.config import RunConfig
from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import PruneResult
from bilevel.runtime.report import console, results_table, write_json

REPORT = "prune_report.json"
COLUMNS = [
    ("model", "model"),
    ("params", "params"),
    ("macs", "MACs"),  # attention included
    ("macs_layers", "MACs (layers only)"),  # torch-pruning's count, as pruning papers report it
    ("latency_ms", "latency (ms)"),
]


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
    world_config: RunConfig | None = None,
) -> dict[str, Any]:
    """Prune the teacher at `teacher_source` (anything `bilevel run` accepts: 'tiny', a pipeline folder, a hub id)
    and save the student in `out`.

    world_config: the world's settings (world name, data for calibration, concepts); its model.source and device are
    replaced by `teacher_source` and `device`. Calibration images (for data-driven importances) are the world's
    clean fine-tuning data, as in `bilevel run`. Writes out/model.safetensors + out/manifest.json (reload with
    student_io.load_student, export with `bilevel export`) and out/prune_report.json; prints a before/after table
    of params, MACs and latency. Returns the report.
    """
    from bilevel.core.world import calibration_batch
    from bilevel.registry import get_registry
    from bilevel.worlds.models import absolute_source
    from bilevel.worlds.resolve import build_world

    out = Path(out)
    if (out / MANIFEST).exists() and not overwrite:
        raise BilevelError(f"{out} already holds a student; choose another output folder or pass overwrite")
    if calibration_size < 1:
        raise BilevelError(f"calibration_size must be at least 1, got {calibration_size}")
    pruner = get_registry().create("pruner", pruner_name, options or {})
    config = world_config or RunConfig()
    model = config.model.model_copy(update={"source": teacher_source, "device": device})
    config = config.model_copy(update={"model": model})
    torch.manual_seed(seed)
    world = build_world(config, "prune")
    teacher = world.teacher
    calibration = calibration_batch(world, calibration_size)

    t0 = time.perf_counter()
    result: PruneResult = pruner.prune(teacher, calibration)
    prune_seconds = time.perf_counter() - t0
    student = result.student.eval()

    provenance = {"pruner": pruner.name, "options": pruner.config.model_dump(mode="json"), **result.manifest,
                  "teacher": absolute_source(teacher_source), "world": world.name}  # fmt: skip
    save_student(out, student, make_manifest(student, result.feature_pairs, **provenance))

    before: ModelStats = model_stats(teacher, latency_batch, latency_repeats)
    after: ModelStats = model_stats(student, latency_batch, latency_repeats)
    ratios = {
        "params": after.params / before.params,
        "macs": after.macs / before.macs,
        "macs_layers": after.macs_layers / before.macs_layers,
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
        "world": world.name,
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
