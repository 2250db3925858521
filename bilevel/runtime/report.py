"""Results as people read them: rich tables on the terminal, JSON on disk, PNG image grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from bilevel.core.stats import format_rate
from bilevel.runtime.io import atomic_write_text

console = Console(width=None if Console().is_terminal else 140)  # logs: no truncated columns


def echo_plain(line: str) -> None:
    """A worker's log line as it is: no markup, highlighting or wrapping (its own tables keep their shape)."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, int):
        return _si(v)
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _si(n: int) -> str:
    """Compact counts (params, MACs): 854.8K, 3.69M, 1.2G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def results_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> Table:
    """columns: (key in row, header)."""
    table = Table(title=title)
    for _, header in columns:
        table.add_column(header, justify="right" if header != "model" else "left")
    for row in rows:
        table.add_row(*[_cell(row, k) for k, _ in columns])
    return table


def _cell(row: dict[str, Any], key: str) -> str:
    """A value, or a rate with its 95% interval ('0.00 [0.00, 0.03]') when the row carries `<key>_ci`."""
    interval = row.get(f"{key}_ci")
    if interval is not None and isinstance(row.get(key), float):
        return format_rate(row[key], interval)
    return _fmt(row.get(key))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=2, default=str))


def image_grid(
    rows: dict[str, torch.Tensor], path: Path, columns: int = 8, scale: int | None = None, label_width: int = 80
) -> None:
    """A PNG grid: one row per prompt group (label on the left), images in [-1, 1], upscaled without blurring
    (scale None: small images are enlarged to about 32 px, large ones kept as they are)."""
    if not rows:
        return
    first = next(iter(rows.values()))
    scale = scale if scale is not None else max(1, 32 // first.shape[-1])
    h, w = first.shape[-2] * scale, first.shape[-1] * scale
    pad = 2
    canvas = Image.new("RGB", (label_width + columns * (w + pad), len(rows) * (h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(rows.items()):
        y = r * (h + pad)
        draw.text((4, y + h // 2 - 5), label, fill=(0, 0, 0))
        for c, img in enumerate(imgs[:columns]):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
            tile = Image.fromarray(arr).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_width + c * (w + pad), y))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
