"""A self-contained HTML report: tables, plots and every cell's image grids embedded as data URIs, so the one file
can be mailed or attached to a paper review. A small script marks on <body> whether every image decoded, which the
headless-browser check reads back."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from bilevel.commands.ablate.tables import CELL_HEADERS, CLAIM_HEADERS, COLUMN_NOTES

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
blockquote { border-left: 4px solid #1f77b4; margin: 1em 0; padding: 0.3em 1em; background: #f5f9fd; }
img { max-width: 100%; image-rendering: pixelated; }
details { margin: 0.5em 0; } summary { cursor: pointer; font-weight: 600; }
.holds { color: #08711c; font-weight: 600; } .fails { color: #b00020; font-weight: 600; }
.inconclusive { color: #8a5a00; font-weight: 600; }
"""
# Sets data-images-ok / data-image-count on <body> once the page has loaded (read by commands.ablate.browser).
CHECK_SCRIPT = """
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  document.body.dataset.imageCount = String(imgs.length);
  document.body.dataset.imagesOk = String(imgs.every(i => i.complete && i.naturalWidth > 0));
  document.body.dataset.tableCount = String(document.querySelectorAll('table').length);
});
"""


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(text: str) -> str:
    verdicts = {"**holds**": "holds", "**fails**": "fails", "**inconclusive**": "inconclusive"}
    if text in verdicts:
        return f'<span class="{verdicts[text]}">{verdicts[text]}</span>'
    return html.escape(text)


def _robustness(section: dict[str, Any]) -> list[str]:
    return [
        f"<h2>{html.escape(section['title'])}</h2>",
        f"<p>{html.escape(section['note'])}</p>",
        _table(section["headers"], section["rows"]),
        _markdown_list(section["lines"]),
    ]


def _markdown_list(lines: list[str]) -> str:
    items = "".join(f"<li>{html.escape(line.removeprefix('- '))}</li>" for line in lines)
    return f"<ul>{items}</ul>"


def html_report(
    *,
    summary_lines: list[str],
    claim: str,
    claim_summary: str,
    claim_rows: list[list[str]],
    result_title: str,
    result_headers: list[str],
    result_rows: list[list[str]],
    cell_rows: list[list[str]],
    plots: dict[str, Path],
    cell_grids: dict[str, list[Path]],
    robustness: dict[str, Any] | None = None,
) -> str:
    """robustness: title, note, headers, rows and lines of the concept rate under attack (attacked grids only)."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>bilevel ablation report</title>",
        f"<style>{STYLE}</style><script>{CHECK_SCRIPT}</script></head><body>",
        "<h1>Ablation report</h1>",
        _markdown_list(summary_lines),
        "<h2>The claim being tested</h2>",
        f"<blockquote>{html.escape(claim)}</blockquote><p>{html.escape(claim_summary)}</p>",
    ]
    if claim_rows:
        parts.append(_table(CLAIM_HEADERS, claim_rows))
    parts += [f"<h2>{html.escape(result_title)}</h2>", _table(result_headers, result_rows)]
    if robustness:
        parts += _robustness(robustness)
    parts.append("<h2>Plots</h2>")
    for name, path in plots.items():
        parts.append(
            f"<figure><img alt='{html.escape(name)}' src='{data_uri(path)}'><figcaption>{html.escape(name)}</figcaption></figure>"
        )
    parts += ["<h2>Cells</h2>", _table(CELL_HEADERS, cell_rows), "<h2>Image grids</h2>"]
    for cell, grids in cell_grids.items():
        images = "".join(
            f"<p>{html.escape(p.stem)}</p><img alt='{html.escape(cell)}: {html.escape(p.stem)}' src='{data_uri(p)}'>"
            for p in grids
        )
        parts.append(f"<details><summary>{html.escape(cell)}</summary>{images}</details>")
    guide = "".join(f"<li><b>{html.escape(term)}</b>: {html.escape(text)}.</li>" for term, text in COLUMN_NOTES)
    parts += ["<h2>Columns</h2>", f"<ul>{guide}</ul>", "</body></html>"]
    return "\n".join(parts)
