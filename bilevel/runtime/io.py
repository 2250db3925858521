"""Safe tensor I/O: safetensors only, written atomically so a crash never leaves a half-written file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bilevel.core.errors import BilevelError


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or corrupt file is a one-line BilevelError."""
    path = Path(path)
    if not path.is_file():
        raise BilevelError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BilevelError(f"corrupt weights file {path}: {exc}; expected a safetensors file") from exc


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_format_json(path: Path, expected_format: str, what: str, fix: str = "") -> dict[str, Any]:
    """A JSON file whose 'format' field must equal expected_format; corrupt or foreign files are one-line errors."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BilevelError(f"corrupt {what} {path}: {exc}{fix}") from None
    if data.get("format") != expected_format:
        raise BilevelError(f"unsupported {what} format {data.get('format')!r} in {path}; expected {expected_format!r}")
    return data
