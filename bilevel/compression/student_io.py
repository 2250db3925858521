"""Save and reload (pruned) students without pickle: safetensors weights + a JSON manifest.

A channel-pruned UNet no longer matches its diffusers config, so the manifest keeps the base config plus every
tensor's shape and the few module attributes pruning changes; loading builds the base model, resizes the modules
to those shapes, then loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import FeaturePair
from bilevel.runtime.io import atomic_save_tensors, atomic_write_text, load_tensors, read_format_json

MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
FORMAT = "bilevel-student/1"
#: Module attributes that structured pruning rewrites (torch-pruning updates them or we must).
RESIZED_ATTRS = (
    "in_channels", "out_channels", "in_features", "out_features", "num_channels", "num_groups",
    "normalized_shape", "heads", "channels", "inner_dim", "inner_kv_dim",
)  # fmt: skip


def unet_config(unet: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in dict(unet.config).items() if not k.startswith("_")} | {"_class_name": type(unet).__name__}


def describe_structure(model: nn.Module) -> dict[str, Any]:
    """Tensor shapes and resized module attributes: enough to rebuild the pruned structure."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    attrs: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        found = {}
        own = vars(module)  # instance attributes only: config-backed properties are not structure
        for a in RESIZED_ATTRS:
            v = own.get(a)
            if isinstance(v, (int, tuple, list)) and not isinstance(v, bool):
                found[a] = list(v) if isinstance(v, tuple) else v
        if found:
            attrs[name] = found
    return {"shapes": shapes, "module_attrs": attrs}


#: Manifest keys that describe the structure (written by make_manifest/save_student), not what made the student.
STRUCTURE_KEYS = ("format", "config", "shapes", "module_attrs", "feature_pairs")


def provenance_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """What made a saved student (pruner, options, teacher, ...), to record again in the students made from it."""
    return {k: v for k, v in manifest.items() if k not in STRUCTURE_KEYS and k != "arm"}


def make_manifest(student: nn.Module, feature_pairs: list[FeaturePair], **extra: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "config": unet_config(student),
        **describe_structure(student),
        "feature_pairs": [p.to_json() for p in feature_pairs],
        **extra,
    }


def save_student(folder: Path, student: nn.Module, manifest: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {**manifest, **describe_structure(student), "config": unet_config(student)}
    atomic_save_tensors(student.state_dict(), folder / WEIGHTS)
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BilevelError(f"no student manifest at {path}; expected a folder written by `bilevel run`/`bilevel prune`")
    return read_format_json(path, FORMAT, "student manifest")


def load_student(folder: Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a student saved by save_student; outputs are identical to the saved model's."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    state = load_tensors(folder / WEIGHTS)
    config = {k: v for k, v in manifest["config"].items() if not k.startswith("_")}
    model = UNet2DConditionModel.from_config(config)
    resize_to(model, manifest["shapes"], manifest.get("module_attrs", {}))
    expected = set(manifest["shapes"])
    if set(state) != expected:
        raise BilevelError(
            f"weights in {folder / WEIGHTS} do not match its manifest ({len(set(state) ^ expected)} tensors differ)"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BilevelError(
            f"weights in {folder} do not fit the manifest's structure: {str(exc).splitlines()[0]}"
        ) from None
    return model.to(device).eval(), manifest


def resize_to(model: nn.Module, shapes: dict[str, list[int]], module_attrs: dict[str, dict[str, Any]]) -> None:
    """Replace parameters/buffers with empty tensors of the recorded shapes and restore resized attributes."""
    modules = dict(model.named_modules())
    for key, shape in shapes.items():
        mod_name, _, tensor_name = key.rpartition(".")
        module = modules.get(mod_name)
        if module is None:
            raise BilevelError(f"manifest names tensor {key!r} absent from the rebuilt model")
        current = getattr(module, tensor_name, None)
        if current is None or list(current.shape) == list(shape):
            continue
        fresh = torch.empty(shape, dtype=current.dtype)
        if isinstance(current, nn.Parameter):
            setattr(module, tensor_name, nn.Parameter(fresh, requires_grad=current.requires_grad))
        else:
            module.register_buffer(tensor_name, fresh)
    for name, attrs in module_attrs.items():
        module = modules.get(name)
        if module is None:
            continue
        for a, v in attrs.items():
            if hasattr(module, a):
                setattr(module, a, tuple(v) if isinstance(v, list) else v)
