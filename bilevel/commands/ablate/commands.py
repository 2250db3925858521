"""`bilevel ablate`: flags -> grid -> cells -> report (and, if asked, the headless-browser check of the page)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bilevel.commands.ablate.execute import GRID_FILE, GridOutcome, cell_folder, read_status, run_grid
from bilevel.commands.ablate.grid import AblationGrid, load_grid, plan_cells
from bilevel.core.config import parse_assignment
from bilevel.core.errors import BilevelError
from bilevel.runtime.report import console


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _seeds(text: str | None) -> list[int] | None:
    names = _names(text)
    if names is None:
        return None
    try:
        return [int(s) for s in names]
    except ValueError:
        raise BilevelError(f"--seeds takes comma-separated integers, got {text!r}") from None


def _base_overrides(assignments: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE flags -> the grid's `base` overrides (parsed exactly as `bilevel run --set`)."""
    return dict(parse_assignment(a) for a in assignments)


def grid_from_args(args: argparse.Namespace) -> AblationGrid:
    overrides = {
        "pruners": _names(args.pruners),
        "unlearners": _names(args.unlearners),
        "solvers": _names(args.solvers),
        "seeds": _seeds(args.seeds),
        "baselines": _names(args.baselines),
        "base": _base_overrides(args.overrides),
        "robustness": True if args.robustness else None,  # no flag: the grid file (or the default) decides
    }
    return load_grid(args.config, quick=args.quick, overrides=overrides)


def ablate(args: argparse.Namespace) -> int:
    from bilevel.commands.ablate.report import write_report

    out = Path(args.out) if args.out else Path("runs") / ("ablation-quick" if args.quick else "ablation")
    if args.report_only:
        grid = _saved_grid(out)
        outcome = GridOutcome(out, plan_cells(grid), read_status(out))
    else:
        grid = grid_from_args(args)
        outcome = run_grid(grid, out, overwrite=args.overwrite, jobs=getattr(args, "jobs", "auto"))
        attack_unattacked_cells(grid, outcome)
    report = write_report(grid, outcome)
    console.print(f"report: {report} (also report.html, report.csv, report.json, plots/)")
    if args.check_html:
        from bilevel.commands.ablate.browser import check_html

        check = check_html(out / "report.html", screenshot=out / "report.png")
        console.print(
            f"headless Chromium: {check.image_count} images, all decoded: {check.images_ok}; "
            f"{check.table_count} tables; screenshot {check.screenshot}"
        )
        if not check.ok:
            raise BilevelError(f"report.html did not render correctly in headless Chromium ({out / 'report.html'})")
    if outcome.failed:
        console.print(
            f"[red]{len(outcome.failed)} cell(s) did not finish: {', '.join(outcome.failed)}[/]; "
            "rerun the same command to retry them (finished cells are kept)"
        )
        return 1
    return 0


def attack_unattacked_cells(grid: AblationGrid, outcome: GridOutcome) -> None:
    """With `robustness`, attack every finished cell that has no robustness.json yet. A run writes DONE before its
    attacks, so a grid interrupted during them (or whose attacks failed) would otherwise never be attacked: the
    grid skips finished cells. Attacks already done are read back (robustness/<arm>/attacks.json), not redone."""
    if not grid.robustness:
        return
    from bilevel.commands.robustness import ROBUSTNESS_FILE, attack_arms
    from bilevel.commands.run import DONE, load_saved_config

    for cell in outcome.cells:
        folder = cell_folder(outcome.out, cell)
        entry = outcome.status.get(cell.name, {})
        if entry.get("state") != "done" or not (folder / DONE).is_file() or (folder / ROBUSTNESS_FILE).is_file():
            continue  # failed this time (retried on the next invocation), unfinished, or attacked already
        console.rule(f"robustness of finished cell {cell.name}")
        config = load_saved_config(folder)
        config = config.model_copy(update={"robustness": config.robustness.model_copy(update={"enabled": True})})
        arms = [row["model"] for row in json.loads((folder / "metrics.json").read_text())["rows"]]
        try:
            attack_arms(folder, config, arms)
        except BilevelError as exc:  # the report shows it; the next invocation retries
            entry.update(state="failed", error=f"robustness: {exc}")
            console.print(f"[red]robustness of cell {cell.name} failed:[/] {exc}")


def _saved_grid(out: Path) -> AblationGrid:
    path = out / GRID_FILE
    if not path.is_file():
        raise BilevelError(f"--report-only: {out} holds no ablation grid ({GRID_FILE})")
    return load_grid(path)
