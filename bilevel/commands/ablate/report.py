"""Writes a grid's report from whatever cells have finished: report.md, report.csv, report.json, plots/*.png and
a self-contained report.html, with the robustness section where cells were attacked. Rewritable at any time
(`bilevel ablate --report-only`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bilevel.commands.ablate.execute import GridOutcome, cell_folder
from bilevel.commands.ablate.grid import AblationGrid
from bilevel.commands.ablate.html_page import html_report
from bilevel.commands.ablate.plots import plot_curves, plot_relearning, plot_scatter
from bilevel.commands.ablate.results import CLAIM, aggregate, check_claim, collect
from bilevel.commands.ablate.tables import (
    CELL_HEADERS,
    ROBUSTNESS_NOTE,
    ROBUSTNESS_TITLE,
    attack_names,
    cell_rows,
    claim_rows,
    claim_summary,
    csv_report,
    grid_summary,
    markdown_report,
    result_headers,
    result_rows,
    robustness_headers,
    robustness_lines,
    robustness_rows,
)
from bilevel.commands.run import DONE
from bilevel.runtime.io import atomic_write_text
from bilevel.runtime.report import console


def run_settings(outcome: GridOutcome) -> dict[str, Any]:
    """What every cell shared (from the first finished cell's saved config)."""
    for cell in outcome.cells:
        path = cell_folder(outcome.out, cell) / "config.json"
        if (cell_folder(outcome.out, cell) / DONE).is_file() and path.is_file():
            cfg = json.loads(path.read_text())
            ev, tr = cfg["evaluation"], cfg["training"]
            return {
                "model": cfg["model"]["source"],
                "concepts": ", ".join(cfg["concepts"]),
                "training steps per arm": tr["steps"],
                "lower / upper lr": f"{tr['lower_lr']:g} / {tr['upper_lr']:g}",
                "evaluation": (
                    f"{ev.get('concept_samples') or 4 * ev['samples_per_prompt']} samples per concept, "
                    f"{ev['samples_per_prompt']} per other prompt group, {ev['steps']} DDIM steps, guidance "
                    + (f"{ev['guidance']:g}" if ev.get("guidance") is not None else "the world's default")
                ),
            }
    return {}


def write_report(grid: AblationGrid, outcome: GridOutcome) -> Path:
    out = outcome.out
    records = collect(out, outcome.cells)
    aggregates = aggregate(records)
    checks = check_claim(aggregates, grid.claim_margin)
    settings = run_settings(outcome)
    plots = {
        name: path
        for name, path in (
            ("concept rate and retained accuracy over training", plot_curves(records, out / "plots" / "curves.png")),
            ("concept rate vs quality per cell", plot_scatter(aggregates, out / "plots" / "scatter.png")),
            ("concept rate while relearning (attack)", plot_relearning(records, out / "plots" / "relearning.png")),
        )
        if path is not None
    }
    rel_plots = {name: str(path.relative_to(out)) for name, path in plots.items()}
    md = markdown_report(grid, settings, aggregates, checks, outcome.cells, outcome.status, rel_plots)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.csv", csv_report(aggregates))
    summary = claim_summary(checks, grid.claim_margin)
    data = {
        "grid": grid.model_dump(mode="json"),
        "settings": settings,
        "claim": {
            "statement": CLAIM,
            "summary": summary,
            "margin": grid.claim_margin,
            "checks": [
                {
                    "pruner": c.pruner,
                    "unlearner": c.unlearner,
                    "solver": c.bilevel_solver,
                    "against": c.two_stage.method,
                    "bilevel": c.bilevel.mean,
                    "two_stage": c.two_stage.mean,
                    "suppresses_as_well": c.suppresses_as_well,
                    "keeps_quality_as_well": c.keeps_quality_as_well,
                    "concept_difference": list(c.concept_difference),
                    "quality_difference": list(c.quality_difference),
                    "verdict": c.verdict,
                    "holds": c.holds,
                    "robustness": c.robustness,  # attack -> verdict: the second question, apart from `verdict`
                    "robustness_difference": {k: list(d) for k, d in c.robustness_differences.items()},
                }
                for c in checks
            ],
        },
        "aggregates": [asdict(a) for a in aggregates],
        "records": [asdict(r) for r in records],
        "cells": outcome.status,
    }
    atomic_write_text(out / "report.json", json.dumps(data, indent=2))
    seeds = "mean ± std over seeds" if len(grid.seeds) > 1 else "one seed"
    grids = {
        cell.name: sorted((cell_folder(out, cell) / "grids").glob("*.png"))
        for cell in outcome.cells
        if (cell_folder(out, cell) / "grids").is_dir()
    }
    page = html_report(
        summary_lines=grid_summary(grid, settings),
        claim=CLAIM,
        claim_summary=summary,
        claim_rows=claim_rows(checks),
        result_title=f"Results ({seeds})",
        result_headers=result_headers(aggregates),
        result_rows=result_rows(aggregates),
        cell_rows=cell_rows(outcome.cells, outcome.status),
        plots=plots,
        cell_grids=grids,
        robustness=_robustness_html(grid, aggregates, checks),
    )
    atomic_write_text(out / "report.html", page)
    _print(aggregates, checks, summary, outcome)
    return out / "report.md"


def _robustness_html(grid: AblationGrid, aggregates, checks) -> dict[str, Any] | None:
    """The robustness section's parts for html_report; None when no cell was attacked."""
    names = attack_names(aggregates)
    if not names:
        return None
    return {
        "title": ROBUSTNESS_TITLE,
        "note": ROBUSTNESS_NOTE.replace("*", "").replace("`", ""),
        "headers": robustness_headers(names),
        "rows": robustness_rows(aggregates, names),
        "lines": robustness_lines(checks, with_solver=len(grid.solvers) > 1),
    }


def _print(aggregates, checks, summary: str, outcome: GridOutcome) -> None:
    console.print(_rich_table("ablation results", result_headers(aggregates), result_rows(aggregates)))
    names = attack_names(aggregates)
    if names:
        console.print(_rich_table(ROBUSTNESS_TITLE, robustness_headers(names), robustness_rows(aggregates, names)))
    console.print(summary)
    console.print(_rich_table("cells", CELL_HEADERS, cell_rows(outcome.cells, outcome.status)))


def _rich_table(title: str, headers: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title)
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*row)
    return table
