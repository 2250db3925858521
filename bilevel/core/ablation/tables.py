"""The report's tables as text: Markdown (people), CSV (spreadsheets), JSON (scripts)."""

from __future__ import annotations

import csv
import io
from typing import Any

from ..report import _si
from .grid import AblationGrid
from .results import CLAIM, LEAK, METRICS, Aggregate, ClaimCheck

HEADERS = ["method", "pruner", "unlearner", "solver", "seeds"] + [h for _, h, _ in METRICS]


def format_value(key: str, value: float) -> str:
    if key in ("params", "macs"):
        return _si(round(value))
    if key == "latency_ms":
        return f"{value:.1f}"
    if key == "train_seconds":
        return f"{value:.0f}"
    return f"{value:.3f}"


def mean_std(a: Aggregate, key: str) -> str:
    if key not in a.mean:
        return "-"
    text = format_value(key, a.mean[key])
    return f"{text} ± {format_value(key, a.std[key])}" if a.n > 1 else text


def result_rows(aggregates: list[Aggregate]) -> list[list[str]]:
    return [
        [a.method, a.pruner, a.unlearner, a.solver, str(a.n)] + [mean_std(a, k) for k, _, _ in METRICS]
        for a in aggregates
    ]


def claim_rows(checks: list[ClaimCheck]) -> list[list[str]]:
    rows = []
    for c in checks:
        rows.append(
            [
                c.pruner,
                c.unlearner,
                c.bilevel_solver,
                f"{mean_std(c.bilevel, 'concept_rate')} vs {mean_std(c.two_stage, 'concept_rate')}",
                f"{mean_std(c.bilevel, 'retained_accuracy')} vs {mean_std(c.two_stage, 'retained_accuracy')}",
                "yes" if c.suppresses_as_well else "no",
                "yes" if c.keeps_quality_as_well else "no",
                _kd_cell(c),
                "**holds**" if c.holds else "**does not hold**",
            ]
        )
    return rows


CLAIM_HEADERS = [
    "pruner", "unlearner", "solver", "concept rate: bilevel vs two-stage", "retained: bilevel vs two-stage",
    "suppresses as well", "keeps quality as well", "KD-only concept / retained", "claim",
]  # fmt: skip


def _kd_cell(c: ClaimCheck) -> str:
    if c.kd is None:
        return "-"
    text = f"{mean_std(c.kd, 'concept_rate')} / {mean_std(c.kd, 'retained_accuracy')}"
    return text if c.informative else f"{text} (uninformative)"


CELL_HEADERS = ["cell", "arms", "state", "wall time", "note"]


def claim_summary(checks: list[ClaimCheck], tolerance: float) -> str:
    if not checks:
        return "Not tested: the grid has no two-stage baseline (add `two-stage` to its baselines)."
    held = sum(c.holds for c in checks)
    text = (
        f"The claim holds in {held} of {len(checks)} settings (tolerance {tolerance:g}: bilevel may be that much "
        f"worse than two-stage on either measure and still count as 'at least as well')."
    )
    informative = [c for c in checks if c.informative]
    if len(informative) < len(checks):
        text += (
            f" Only {len(informative)} of them can tell the methods apart: in the others KD alone shows the concept "
            f"in fewer than {LEAK:.0%} of samples or keeps under {LEAK:.0%} retained accuracy (nothing leaked to "
            f"suppress, or the pruned student never recovered); there the claim holds in "
            f"{sum(c.holds for c in informative)} of {len(informative)}."
        )
    return text


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cell_rows(cells, status: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for cell in cells:
        s = status.get(cell.name, {})
        wall = float(s.get("wall_seconds", 0.0))
        rows.append([cell.name, ",".join(cell.arms), s.get("state", "pending"), _duration(wall), s.get("error") or ""])
    return rows


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def grid_summary(grid: AblationGrid, run_settings: dict[str, Any]) -> list[str]:
    return [
        (
            f"- pruners: {', '.join(grid.pruners)}; unlearners: {', '.join(grid.unlearners)}; "
            f"solvers: {', '.join(grid.solvers)}; seeds: {', '.join(map(str, grid.seeds))}"
        ),
        f"- baselines: {', '.join(grid.baselines)}",
        *(f"- {k}: {v}" for k, v in run_settings.items()),
    ]


def markdown_report(
    grid: AblationGrid,
    run_settings: dict[str, Any],
    aggregates: list[Aggregate],
    checks: list[ClaimCheck],
    cells,
    status: dict[str, dict[str, Any]],
    plots: dict[str, str],
) -> str:
    parts = [
        "# Ablation report",
        "",
        *grid_summary(grid, run_settings),
        "",
        "## The claim being tested",
        "",
        f"> {CLAIM}",
        "",
        claim_summary(checks, grid.claim_tolerance),
        "",
    ]
    if checks:
        parts += [markdown_table(CLAIM_HEADERS, claim_rows(checks)), ""]
    seeds = "mean ± std over seeds" if len(grid.seeds) > 1 else "one seed"
    parts += [f"## Results ({seeds})", "", markdown_table(HEADERS, result_rows(aggregates)), ""]
    parts += ["## Plots", ""] + [f"![{name}]({rel})" for name, rel in plots.items()] + [""]
    parts += ["## Cells", "", markdown_table(CELL_HEADERS, cell_rows(cells, status)), ""]
    parts += [READING_GUIDE]
    return "\n".join(parts)


COLUMN_NOTES = [
    ("concept rate", ("share of samples for the concept's prompts that the detector labels as the concept "
                      "(lower: the concept is suppressed)")),
    ("retained acc.", "share of samples for every other concept's prompts labelled correctly (higher: quality kept)"),
    ("collateral", "the same for the two concepts nearest to the erased one (damage to neighbours shows here first)"),
    ("SWD", "sliced Wasserstein distance between samples and clean data (lower: closer to the data distribution)"),
    ("params / MACs / latency ms", "size and cost of the model (latency: batch 64, on the machine that ran the grid)"),
    ("train s", "training time of that arm; two-stage includes its KD stage, so it compares with bilevel at equal cost"),
]  # fmt: skip
READING_GUIDE = "## Columns\n" + "\n".join(f"- **{term}**: {text}." for term, text in COLUMN_NOTES) + "\n"


def csv_report(aggregates: list[Aggregate]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    keys = [k for k, _, _ in METRICS]
    writer.writerow(
        ["method", "pruner", "unlearner", "solver", "n"] + [f"{k}_{s}" for k in keys for s in ("mean", "std")]
    )
    for a in aggregates:
        values = []
        for k in keys:
            values += [a.mean.get(k, ""), a.std.get(k, "")]
        writer.writerow([a.method, a.pruner, a.unlearner, a.solver, a.n] + values)
    return buf.getvalue()
