"""Runs an ablation grid cell by cell, resumably: a finished cell is never run again, an interrupted one continues
from its checkpoints, a failed one is recorded (the others still run) and retried on the next invocation."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel.commands.ablate.grid import AblationGrid, Cell, cell_config, plan_cells, validate_grid
from bilevel.commands.run import DONE, RUN_MARKER, run
from bilevel.core.errors import BilevelError
from bilevel.runtime.io import atomic_write_text
from bilevel.runtime.report import console, echo_plain
from bilevel.runtime.workers import (
    WORKERS_ENV,
    Job,
    last_line,
    process_count,
    run_jobs,
    threads_per_worker,
    usable_cores,
    workers_from_env,
)

GRID_FILE = "grid.json"  # the grid this folder was started with
STATUS_FILE = "cells.json"  # per cell: state (done/failed/skipped), wall seconds of finished attempts, error
CELLS = "cells"


@dataclass
class GridOutcome:
    out: Path
    cells: list[Cell]
    status: dict[str, dict[str, Any]]

    @property
    def failed(self) -> list[str]:
        return [n for n, s in self.status.items() if s.get("state") != "done"]


def cell_folder(out: Path, cell: Cell) -> Path:
    return out / CELLS / cell.name


def prepare_grid_dir(grid: AblationGrid, out: Path, overwrite: bool) -> None:
    """Continue the same grid; refuse a folder that holds a different grid or anything else, unless --overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BilevelError(f"ablation output {out} exists and is not a folder")
    wanted = grid.model_dump(mode="json")
    saved_path = out / GRID_FILE
    if saved_path.is_file() and not overwrite:
        try:
            saved = json.loads(saved_path.read_text())
        except json.JSONDecodeError:
            raise BilevelError(f"{saved_path} is corrupt; pass --overwrite to start this grid again") from None
        # attacking is added after training (cells without robustness.json are attacked after the grid), so a
        # grid may gain or drop --robustness and continue
        saved_cmp, wanted_cmp = {**saved, "robustness": None}, {**wanted, "robustness": None}
        if saved_cmp != wanted_cmp:
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise BilevelError(
                f"{out} holds a different ablation grid (differs in: {', '.join(changed)}); "
                "rerun with the same grid to continue it, pass --overwrite to replace it, or choose another --out"
            )
        if saved != wanted:
            atomic_write_text(saved_path, json.dumps(wanted, indent=2))
        return
    if overwrite:
        shutil.rmtree(out / CELLS, ignore_errors=True)
        (out / STATUS_FILE).unlink(missing_ok=True)
    elif out.is_dir() and any(out.iterdir()):
        raise BilevelError(f"{out} is not empty and holds no ablation grid; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved_path, json.dumps(wanted, indent=2))


def read_status(out: Path) -> dict[str, dict[str, Any]]:
    path = Path(out) / STATUS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # atomic writes make this unreachable; losing it only costs the wall-time record


def run_grid(grid: AblationGrid, out: Path, overwrite: bool = False, jobs: int | str = "auto") -> GridOutcome:
    """Every cell of the grid (skipping finished ones), then nothing else: the report is written separately.
    jobs: cells run at once in worker processes ("auto": one per core on a CPU; 1: in turn, in this process)."""
    validate_grid(grid)
    out = Path(out)
    prepare_grid_dir(grid, out, overwrite)
    cells = plan_cells(grid)
    status = read_status(out)
    pending = [c for c in cells if not (cell_folder(out, c) / DONE).is_file()]
    slots = cell_slots(jobs, cell_config(grid, cells[0], out, out).model.device, len(pending))
    if slots > 1:
        _run_side_by_side(grid, out, cells, pending, status, slots)
        return GridOutcome(out, cells, status)
    for i, cell in enumerate(cells, 1):
        folder = cell_folder(out, cell)
        entry = status.setdefault(cell.name, {"state": "pending", "wall_seconds": 0.0})
        if (folder / DONE).is_file():
            entry["state"] = "done"
            console.print(f"[dim]cell {i}/{len(cells)} {cell.name}: finished earlier, kept[/]")
            continue
        if cell.depends_on and status.get(cell.depends_on, {}).get("state") != "done":
            entry.update(state="skipped", error=f"its baseline cell {cell.depends_on} did not finish")
            _write_status(out, status)
            continue
        resume = (folder / RUN_MARKER).is_file()
        console.rule(f"cell {i}/{len(cells)}: {cell.name}" + (" (resuming)" if resume else ""))
        config = cell_config(grid, cell, folder, out / CELLS)
        start = time.perf_counter()
        try:
            run(config, resume=resume)
        except BilevelError as exc:  # one bad cell must not cost the rest of the grid
            entry.update(state="failed", error=str(exc))
            console.print(f"[red]cell {cell.name} failed:[/] {exc}")
        else:
            entry.update(state="done", error=None)
        entry["wall_seconds"] = float(entry.get("wall_seconds", 0.0)) + time.perf_counter() - start
        _write_status(out, status)
    _write_status(out, status)
    return GridOutcome(out, cells, status)


def cell_slots(jobs: int | str, device: str, pending: int) -> int:
    """How many cells run at once: a number (capped by the cells left), or "auto": one per core on a CPU
    (the tiny world's cells are too small for two threads to pay), 1 on a GPU."""
    if jobs == "auto":
        jobs = workers_from_env() or (usable_cores() if device.startswith("cpu") else 1)
    return max(1, min(process_count(jobs, "--jobs"), pending))


def _run_side_by_side(
    grid: AblationGrid, out: Path, cells: list[Cell], pending: list[Cell], status: dict[str, dict[str, Any]], slots: int
) -> None:
    """The pending cells in `slots` worker processes (bilevel.commands.ablate.cell_worker), seed by seed with the
    baselines first, so the method cells that need their KD students can start; a failed cell is recorded and the
    rest go on."""
    names = {c.name for c in pending}
    for cell in cells:
        if cell.name not in names:
            status.setdefault(cell.name, {"wall_seconds": 0.0})["state"] = "done"
    # seed by seed (a first seed's full results come first), baselines before the method cells that need them
    order = sorted(pending, key=lambda c: (c.kind != "teacher", c.seed, ("teacher", "baseline", "method").index(c.kind)))
    jobs = [
        Job(c.name, "bilevel.commands.ablate.cell_worker", (str(out), c.name), out / "logs" / f"{c.name}.log",
            after=c.depends_on if c.depends_on in names else None)
        for c in order
    ]  # fmt: skip
    threads = threads_per_worker(slots)
    console.print(f"{len(pending)} cell(s), {slots} at a time, one process each with {threads} thread(s); logs in {out / 'logs'}")

    def record(job: Job, returncode: int | None, seconds: float) -> None:
        entry = status.setdefault(job.name, {"state": "pending", "wall_seconds": 0.0})
        if returncode is None:
            entry.update(state="skipped", error=f"its baseline cell {job.after} did not finish")
        elif returncode == 0:
            entry.update(state="done", error=None)
        else:
            entry.update(state="failed", error=last_line(job.log_path).removeprefix("error: "))
            console.print(f"[red]cell {job.name} failed:[/] {entry['error']} (log: {job.log_path})")
        entry["wall_seconds"] = float(entry.get("wall_seconds", 0.0)) + seconds
        done = sum(s.get("state") == "done" for s in status.values())
        console.print(f"cell {job.name}: {entry['state']} ({done}/{len(cells)} done)")
        _write_status(out, status)

    run_jobs(jobs, slots, echo_plain, record, env={WORKERS_ENV: "1"})
    _write_status(out, status)


def _write_status(out: Path, status: dict[str, dict[str, Any]]) -> None:
    atomic_write_text(Path(out) / STATUS_FILE, json.dumps(status, indent=2))
