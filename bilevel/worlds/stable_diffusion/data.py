"""Image+caption data for Stable Diffusion runs: an image folder (same-stem .txt captions or a metadata.jsonl as in
Hugging Face 'imagefolder') or a `datasets` dataset written by `save_to_disk`. Images come out square, resized and
centre-cropped to the resolution, in [-1, 1]; they are read lazily so a large set is never held as pixels at once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bilevel.core.errors import BilevelError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class ImageRecord:
    """One image, not yet decoded: a file path or an in-memory PIL image / bytes, and its caption (or None)."""

    source: Any
    caption: str | None
    name: str


def to_tensor(image: Any, resolution: int, name: str) -> torch.Tensor:
    """(3, R, R) in [-1, 1]: shorter side resized to R (bicubic), then centre-cropped."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(image, (str, Path)):
            img = Image.open(image)
        elif isinstance(image, dict):  # datasets' undecoded Image feature
            img = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
        elif isinstance(image, (bytes, bytearray)):
            img = Image.open(io.BytesIO(image))
        else:
            img = image
        img = img.convert("RGB")
    except (OSError, UnidentifiedImageError, KeyError, TypeError, AttributeError) as exc:
        raise BilevelError(
            f"cannot read image {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1


def is_saved_dataset(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def list_records(
    folder: Path,
    *,
    what: str,
    limit: int,
    captions_required: bool,
    image_column: str = "image",
    caption_column: str = "text",
) -> list[ImageRecord]:
    """Up to `limit` records from an image folder or a saved dataset; one-line errors for unusable input."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BilevelError(
            f"{what} folder not found: {folder}; expected images with .txt captions, a {METADATA}, or a saved dataset"
        )
    if is_saved_dataset(folder):
        records = _dataset_records(folder, limit, image_column, caption_column, captions_required)
    elif (folder / METADATA).is_file():
        records = _metadata_records(folder, what, limit, caption_column)
    else:
        records = _folder_records(folder, what, limit)
    if not records:
        raise BilevelError(f"no images in {what} folder {folder}; accepted image types: {', '.join(IMAGE_SUFFIXES)}")
    if captions_required:
        missing = next((r for r in records if not r.caption), None)
        if missing is not None:
            raise BilevelError(
                f"{what} image {missing.name} has no caption; give each image a same-stem .txt file or a {METADATA} "
                f"line with {caption_column!r}"
            )
    return records


def _folder_records(folder: Path, what: str, limit: int) -> list[ImageRecord]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    out = []
    for p in files:
        side = p.with_suffix(".txt")
        caption = side.read_text(encoding="utf-8").strip() if side.is_file() else None
        out.append(ImageRecord(p, caption or None, p.name))
    return out


def _metadata_records(folder: Path, what: str, limit: int, caption_column: str) -> list[ImageRecord]:
    out = []
    for n, line in enumerate((folder / METADATA).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BilevelError(
                f"{folder / METADATA} line {n} is not a JSON object with 'file_name'; expected e.g. "
                f'{{"file_name": "0001.png", "{caption_column}": "a photo of a dog"}}'
            ) from None
        path = folder / name
        if not path.is_file():
            raise BilevelError(f"{what}: {folder / METADATA} line {n} names {name!r}, which is not in {folder}")
        caption = row.get(caption_column)
        out.append(ImageRecord(path, str(caption).strip() if caption else None, name))
        if len(out) >= limit:
            break
    return out


def _dataset_records(
    folder: Path, limit: int, image_column: str, caption_column: str, captions_required: bool
) -> list[ImageRecord]:
    try:
        import datasets
    except ImportError:
        raise BilevelError(
            f"{folder} is a saved `datasets` dataset but the datasets package is not installed; "
            "pip install datasets (or give an image folder)"
        ) from None
    try:
        data = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001 - a damaged dataset folder: one line
        raise BilevelError(f"cannot read saved dataset {folder}: {str(exc).splitlines()[0]}") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise BilevelError(f"saved dataset {folder} has splits {', '.join(data)}; expected a 'train' split")
        data = data["train"]
    for column in (image_column, caption_column) if captions_required else (image_column,):
        if column not in data.column_names:
            raise BilevelError(
                f"saved dataset {folder} has no column {column!r} (columns: {', '.join(data.column_names)}); "
                "set data.image_column / data.caption_column"
            )
    rows = data.select(range(min(limit, len(data))))
    captions = rows[caption_column] if caption_column in data.column_names else [None] * len(rows)
    return [
        ImageRecord(img, str(c).strip() if c else None, f"{folder.name}[{i}]")
        for i, (img, c) in enumerate(zip(rows[image_column], captions))
    ]


def iter_batches(records: list[ImageRecord], resolution: int, batch_size: int = 16) -> Iterator[torch.Tensor]:
    """Pixel batches (B, 3, R, R) in [-1, 1], decoded on demand."""
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        yield torch.stack([to_tensor(r.source, resolution, r.name) for r in chunk])
