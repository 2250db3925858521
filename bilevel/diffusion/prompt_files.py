"""Prompt files users bring to attacks: a CSV with a prompt column (an I2P or Ring-A-Bell export) or plain text."""

from __future__ import annotations

import csv
from pathlib import Path

from bilevel.core.errors import BilevelError

#: CSV header names read as the prompt column, in this order (case-insensitive)
PROMPT_COLUMNS = ("prompt", "prompts", "text", "caption", "adv_prompt")


def read_prompt_file(path: Path | str, limit: int | None = None) -> list[str]:
    """Prompts from a .csv (the first column named as in PROMPT_COLUMNS) or any other text file (one per line;
    blank lines skipped), the first `limit` of them; a missing, empty or column-less file is a one-line error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BilevelError(f"prompt file not found: {path}; expected a .csv with a prompt column or a .txt file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".csv":
        rows = csv.DictReader(text.splitlines())
        header = {h.strip().lower(): h for h in rows.fieldnames or []}
        column = next((header[c] for c in PROMPT_COLUMNS if c in header), None)
        if column is None:
            raise BilevelError(
                f"{path} has no prompt column; columns: {', '.join(rows.fieldnames or []) or 'none'} "
                f"(accepted: {', '.join(PROMPT_COLUMNS)})"
            )
        prompts = [(row.get(column) or "").strip() for row in rows]
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p][:limit]
    if not prompts:
        raise BilevelError(f"{path} holds no prompts")
    return prompts
