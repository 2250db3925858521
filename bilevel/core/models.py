"""Where teachers come from: the shipped tiny teacher or a local diffusers pipeline folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import BilevelError

#: Manifest keys that describe a student's structure (everything else is provenance worth carrying over).
STRUCTURE_KEYS = {"format", "config", "shapes", "module_attrs", "feature_pairs"}
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_TEACHER = ASSETS / "tiny-teacher"


def resolve_source(source: str) -> Path:
    if source == "tiny":
        if not (TINY_TEACHER / "model_index.json").is_file():
            raise BilevelError(
                f"the shipped tiny teacher is missing at {TINY_TEACHER}; reinstall bilevel or run `bilevel teacher train`"
            )
        return TINY_TEACHER
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BilevelError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return path
    raise BilevelError(f"model {source!r} not found; accepted: 'tiny' or a local diffusers pipeline folder")


def load_tiny_pipeline(source: str = "tiny", device: str = "cpu"):
    """Load a TinyTextToImagePipeline (weights through safetensors; no remote code)."""
    import json

    from .tinyworld.pipeline import TinyTextToImagePipeline

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
        pipe = TinyTextToImagePipeline.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BilevelError(f"cannot load pipeline from {path}: {str(exc).splitlines()[0]}") from None
    finally:
        logging.disable(previous)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval().requires_grad_(False)
    pipe.text_encoder.eval().requires_grad_(False)
    return pipe.to(device)


def quiet_hub_libraries() -> None:
    """diffusers/transformers progress bars and notices would drown bilevel's own progress and one-line errors."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_model(model: str, pipeline: str = "tiny", device: str = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """(pipeline for text encoder/scheduler, UNet, manifest extras to carry over) for the tiny world.

    `model`: 'tiny', a pipeline folder (model_index.json) or a student folder (manifest.json); a student is paired
    with `pipeline`'s text encoder and scheduler.
    """
    from .student_io import MANIFEST, load_student, read_manifest

    path = Path(model).expanduser()
    if model != "tiny" and path.is_dir() and (path / MANIFEST).is_file():
        read_manifest(path)  # one-line error for a foreign or corrupt manifest
        unet, manifest = load_student(path, device)
        pipe = load_tiny_pipeline(pipeline, device)
        extras = {k: v for k, v in manifest.items() if k not in STRUCTURE_KEYS}
        return pipe, unet, extras
    if model != "tiny" and not path.exists():
        raise BilevelError(f"model {model!r} not found; accepted: 'tiny', a pipeline folder or a student folder")
    if model != "tiny" and path.is_dir() and not (path / "model_index.json").is_file():
        raise BilevelError(f"{path} is neither a pipeline folder (model_index.json) nor a student folder ({MANIFEST})")
    pipe = load_tiny_pipeline(model, device)
    return pipe, pipe.unet, {}
