"""A folder of pruned students shared by runs that would prune the same teacher the same way (an ablation grid's
cells: one pruned student per pruner and seed instead of one per cell).

The key is a fingerprint of everything pruning reads: the pruner and its resolved options, the teacher's weights,
the calibration batch, and the versions of the code that prune. A hit is rebuilt from safetensors and a manifest
(no pickle); a miss prunes and stores the result atomically, so two workers racing on one key are both safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bilevel.core.interfaces import CalibrationBatch
from bilevel.diffusion.image_sets import tensor_fingerprint

KEY_LENGTH = 20


def pruning_fingerprint(
    pruner_name: str, options: dict[str, Any], teacher: nn.Module, calibration: CalibrationBatch | None
) -> str:
    """Hex key of one pruning: equal keys prune to the same student."""
    import torch_pruning

    from bilevel import __version__

    h = hashlib.sha256()
    h.update(json.dumps({"pruner": pruner_name, "options": options, "bilevel": __version__,
                         "torch": torch.__version__, "torch_pruning": torch_pruning.__version__},
                        sort_keys=True, default=str).encode())  # fmt: skip
    tensors = dict(teacher.state_dict())
    if calibration is not None:
        tensors |= {f"calibration.{name}": getattr(calibration, name) for name in ("x0", "cond", "alphas_cumprod")}
    for name, tensor in tensors.items():
        h.update(f"{name}:{tensor_fingerprint(tensor)}".encode())
    return h.hexdigest()[:KEY_LENGTH]


def cached_folder(cache_dir: Path, key: str) -> Path | None:
    """The stored pruned student for `key`, if a complete one is there."""
    from bilevel.compression.student_io import MANIFEST, WEIGHTS

    folder = Path(cache_dir) / "pruned" / key
    return folder if (folder / WEIGHTS).is_file() and (folder / MANIFEST).is_file() else None


def store(cache_dir: Path, key: str, student: nn.Module, manifest: dict[str, Any]) -> None:
    """Write into a private folder, then rename it into place (a racing writer's copy is simply dropped)."""
    from bilevel.compression.student_io import save_student

    final = Path(cache_dir) / "pruned" / key
    if final.exists():
        return
    tmp = final.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_student(tmp, student, manifest)
    try:
        os.rename(tmp, final)
    except OSError:  # another worker stored the same key first
        shutil.rmtree(tmp, ignore_errors=True)
