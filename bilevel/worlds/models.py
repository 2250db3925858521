"""Where teachers come from: the shipped tiny teacher or a local diffusers pipeline folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel.core.errors import BilevelError

#: Manifest keys that describe a student's structure (everything else is provenance worth carrying over).
STRUCTURE_KEYS = {"format", "config", "shapes", "module_attrs", "feature_pairs"}
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_TEACHER = ASSETS / "tiny-teacher"
#: shipped teachers by name (the digits world's is a tiny-pipeline folder too)
SHIPPED_TEACHERS = {"tiny": TINY_TEACHER, "digits": ASSETS / "digits-teacher"}


def resolve_source(source: str) -> Path:
    if source in SHIPPED_TEACHERS:
        folder = SHIPPED_TEACHERS[source]
        if not (folder / "model_index.json").is_file():
            raise BilevelError(
                f"the shipped {source} teacher is missing at {folder}; reinstall bilevel"
                + (" or run `bilevel teacher train`" if source == "tiny" else "")
            )
        return folder
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BilevelError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return path
    raise BilevelError(f"model {source!r} not found; accepted: 'tiny' or a local diffusers pipeline folder")


def load_tiny_pipeline(source: str = "tiny", device: str = "cpu"):
    """Load a TinyTextToImagePipeline (weights through safetensors; no remote code)."""
    import json

    from bilevel.worlds.tiny.pipeline import TinyTextToImagePipeline

    path = resolve_source(source)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except json.JSONDecodeError as exc:
        raise BilevelError(f"corrupt {path / 'model_index.json'}: {exc}") from None
    if index.get("_class_name") != TinyTextToImagePipeline.__name__:
        raise BilevelError(
            f"{path} holds a {index.get('_class_name')!r}; this build supports {TinyTextToImagePipeline.__name__} folders"
        )
    quiet_hub_libraries()
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)  # diffusers logs a missing weights file at ERROR before raising: one line only
    try:
        parts = exported_student_unet(path, device)  # a channel-pruned student exported into the pipeline
        pipe = TinyTextToImagePipeline.from_pretrained(
            str(path), use_safetensors=True, local_files_only=True, **parts
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise BilevelError(f"cannot load pipeline from {path}: {str(exc).splitlines()[0]}") from None
    finally:
        logging.disable(previous)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.eval().requires_grad_(False)
    return pipe.to(device)


def exported_student_unet(pipeline_folder: Path, device: str = "cpu") -> dict[str, Any]:
    """{'unet': student} when the pipeline's unet/ holds a bilevel student (safetensors + manifest, written by
    `bilevel export` for a channel-pruned student, which no stock config describes); else {}."""
    from bilevel.compression.student_io import MANIFEST, load_student

    folder = Path(pipeline_folder) / "unet"
    if not (folder / MANIFEST).is_file():
        return {}
    unet, _ = load_student(folder, device)
    return {"unet": unet.requires_grad_(False)}


@dataclass(frozen=True)
class ModelRef:
    """What a command's MODEL argument names: the pipeline a world is built from, and optionally a student folder
    whose UNet stands in for the pipeline's."""

    pipeline: str
    student: Path | None = None


def absolute_source(source: str) -> str:
    """A local folder as an absolute path (so a manifest still finds it from elsewhere); names and hub ids as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if source != "tiny" and path.exists() else source


def resolve_model_ref(model: str, pipeline: str | None = None) -> ModelRef:
    """'tiny', a pipeline folder or hub id -> that pipeline; a student folder (manifest.json) -> the student with
    the pipeline it was pruned from (recorded in its manifest; `pipeline` overrides; 'tiny' for old students)."""
    from bilevel.compression.student_io import MANIFEST, read_manifest

    path = Path(model).expanduser()
    if model != "tiny" and path.is_dir() and (path / MANIFEST).is_file():
        manifest = read_manifest(path)  # one-line error for a foreign or corrupt manifest
        return ModelRef(pipeline or str(manifest.get("teacher") or "tiny"), path)
    if model != "tiny" and path.is_dir() and not (path / "model_index.json").is_file():
        raise BilevelError(f"{path} is neither a pipeline folder (model_index.json) nor a student folder ({MANIFEST})")
    if pipeline is not None:
        raise BilevelError(f"--pipeline applies to a student folder; {model!r} is a model of its own")
    return ModelRef(model)


def load_unet(ref: ModelRef, world_teacher: Any, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """(the UNet a command works on, manifest extras to carry over): the student's, or the world's teacher."""
    from bilevel.compression.student_io import load_student

    if ref.student is None:
        return world_teacher, {}
    unet, manifest = load_student(ref.student, device)
    return unet, {k: v for k, v in manifest.items() if k not in STRUCTURE_KEYS}


def quiet_hub_libraries() -> None:
    """diffusers/transformers progress bars and notices would drown bilevel's own progress and one-line errors."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
