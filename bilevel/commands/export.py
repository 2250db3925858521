"""`bilevel export`: a trained or pruned student as a complete diffusers pipeline folder, and `load_pipeline`.

A block-removed (BK-SDM) or unpruned student is an ordinary `UNet2DConditionModel` whose config describes it: the
exported folder is a stock pipeline that `DiffusionPipeline.from_pretrained(DIR)` loads without bilevel (tiny-world
folders carry their 60-line pipeline class as `pipeline.py`: add `custom_pipeline=DIR, trust_remote_code=True`).
A channel-pruned student has per-layer widths no stock config can describe: its `unet/` keeps bilevel's student
format (safetensors + manifest) and the folder loads with `bilevel.load_pipeline(DIR)`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bilevel.compression.student_io import MANIFEST, load_student, make_manifest, read_manifest, save_student
from bilevel.core.errors import BilevelError
from bilevel.runtime.io import atomic_write_text

#: the tiny pipeline's module, self-contained: copied as pipeline.py into exported tiny-world folders
STANDALONE = Path(__file__).resolve().parent.parent / "worlds" / "tiny" / "pipeline.py"
TINY_CLASS = "TinyTextToImagePipeline"
RUN_MARKER = "config.json"


@dataclass
class ExportResult:
    out: Path
    student: Path
    pipeline: str
    stock: bool  # loads with stock diffusers (no bilevel import)
    how_to_load: str


def find_student(source: Path, arm: str | None = None) -> Path:
    """The student folder named by a student folder itself or by a run folder (+ arm; default: the bilevel arm)."""
    source = Path(source).expanduser()
    if (source / MANIFEST).is_file():
        if arm is not None:
            raise BilevelError(f"--arm applies to a run folder; {source} is a student folder")
        return source
    students = source / "students"
    if (source / RUN_MARKER).is_file() and students.is_dir():
        arms = sorted(p.name for p in students.iterdir() if (p / MANIFEST).is_file())
        chosen = arm or ("bilevel" if "bilevel" in arms else None)
        if chosen is None or chosen not in arms:
            what = f"arm {chosen!r}" if chosen else "no bilevel arm"
            raise BilevelError(f"run {source} has {what}; its students: {', '.join(arms) or 'none'} (pick one with --arm)")
        return students / chosen
    raise BilevelError(
        f"{source} is neither a student folder ({MANIFEST}) nor a run folder ({RUN_MARKER} + students/); "
        "accepted: what `bilevel run`, `prune` or `unlearn` wrote"
    )


def describes_itself(unet: nn.Module) -> bool:
    """Whether the UNet's own config rebuilds exactly its tensors (true for BK-SDM and unpruned students)."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    with torch.device("meta"):
        fresh = UNet2DConditionModel.from_config(config)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    return want == have


def export_model(source: Path, out: Path, *, arm: str | None = None, pipeline: str | None = None,
                 overwrite: bool = False) -> ExportResult:  # fmt: skip
    """Write the student at `source` (a student or run folder) as a pipeline folder in `out`, with the parts of
    the pipeline it was pruned from (recorded in its manifest; `pipeline` overrides)."""
    from bilevel.worlds.models import SHIPPED_TEACHERS, ModelRef, absolute_source, resolve_model_ref
    from bilevel.worlds.stable_diffusion.loading import is_tiny_pipeline

    student_dir = find_student(Path(source), arm)
    ref: ModelRef = resolve_model_ref(str(student_dir), pipeline)
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BilevelError(f"{out} is not empty; choose another --out or pass --overwrite")
    if out.resolve() == student_dir.resolve() or (out / MANIFEST).exists():
        raise BilevelError(f"{out} holds a student; export into a new folder")
    unet, manifest = load_student(student_dir)
    stock = describes_itself(unet)
    if out.exists():
        shutil.rmtree(out)
    if ref.pipeline in SHIPPED_TEACHERS or is_tiny_pipeline(ref.pipeline):
        _export_tiny(ref.pipeline, unet, out, stock)
        load = (
            f"DiffusionPipeline.from_pretrained({str(out)!r}, custom_pipeline={str(out)!r}, trust_remote_code=True)"
            if stock
            else f"bilevel.load_pipeline({str(out)!r})"
        )
    else:
        _export_sd(ref.pipeline, unet, out, stock)
        load = f"DiffusionPipeline.from_pretrained({str(out)!r})" if stock else f"bilevel.load_pipeline({str(out)!r})"
    if not stock:  # the student format instead of the stock UNet folder
        shutil.rmtree(out / "unet")
        save_student(out / "unet", unet, make_manifest(unet, [], exported_from=str(student_dir.resolve())))
    provenance = {
        "student": str(student_dir.resolve()),
        "pipeline": absolute_source(ref.pipeline),
        "stock": stock,
        "load_with": load,
        "student_manifest": {k: v for k, v in manifest.items() if k not in ("shapes", "module_attrs", "config")},
    }
    atomic_write_text(out / "bilevel_export.json", json.dumps(provenance, indent=1, default=str))
    return ExportResult(out, student_dir, ref.pipeline, stock, load)


def _export_tiny(pipeline: str, unet: nn.Module, out: Path, stock: bool) -> None:
    from bilevel.worlds.models import load_tiny_pipeline, resolve_source
    from bilevel.worlds.tiny.pipeline import TinyTextToImagePipeline

    teacher = load_tiny_pipeline(pipeline)
    parts = {"text_encoder": teacher.text_encoder, "tokenizer": teacher.tokenizer, "scheduler": teacher.scheduler}
    pipe = TinyTextToImagePipeline(unet=unet if stock else teacher.unet, **parts)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.copyfile(STANDALONE, out / "pipeline.py")
    for marker in resolve_source(pipeline).glob("*_world.json"):  # e.g. digits_world.json: the folder's world
        shutil.copyfile(marker, out / marker.name)


def _export_sd(pipeline: str, unet: nn.Module, out: Path, stock: bool) -> None:
    import diffusers
    from diffusers import StableDiffusionPipeline

    from bilevel.worlds.stable_diffusion.loading import load_sd_parts

    parts = load_sd_parts(pipeline)
    scheduler_cls = getattr(diffusers, str(parts.scheduler_config.get("_class_name")), diffusers.DDIMScheduler)
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=unet if stock else parts.unet, scheduler=scheduler_cls.from_config(parts.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(out, safe_serialization=True)


def load_pipeline(folder: str | Path, device: str = "cpu") -> Any:
    """Load a pipeline folder written by `bilevel export` (any student, channel-pruned included) or any tiny/SD
    pipeline folder; weights through safetensors, no code from the folder is run."""
    from bilevel.worlds.models import exported_student_unet, load_tiny_pipeline, quiet_hub_libraries
    from bilevel.worlds.stable_diffusion.loading import check_sd_index, read_model_index

    folder = Path(folder).expanduser()
    index = read_model_index(str(folder))
    if index.get("_class_name") == TINY_CLASS:
        return load_tiny_pipeline(str(folder), device)
    check_sd_index(index, str(folder), trust_remote_code=False)
    import diffusers

    cls = getattr(diffusers, str(index.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise BilevelError(f"{folder}: pipeline class {index.get('_class_name')!r} is not a diffusers pipeline")
    quiet_hub_libraries()
    try:
        pipe = cls.from_pretrained(str(folder), use_safetensors=True, local_files_only=True,
                                   **exported_student_unet(folder, device))  # fmt: skip
    except (OSError, ValueError, RuntimeError) as exc:
        raise BilevelError(f"cannot load pipeline from {folder}: {str(exc).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


__all__ = ["ExportResult", "export_model", "find_student", "load_pipeline", "read_manifest"]
