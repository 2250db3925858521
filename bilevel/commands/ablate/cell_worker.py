"""One ablation cell in its own process: `python -m bilevel.commands.ablate.cell_worker GRID_OUT CELL`.

The grid runner starts these side by side (see execute.run_grid); each continues its cell exactly as the
sequential runner would (a fresh run, or `--resume` of an interrupted one), from the grid saved in GRID_OUT.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bilevel.core.errors import BilevelError
from bilevel.runtime.workers import worker_main

USAGE = "python -m bilevel.commands.ablate.cell_worker GRID_OUT CELL"


def run_cell(out: Path, name: str) -> None:
    from bilevel.commands.ablate.execute import CELLS, GRID_FILE, cell_folder
    from bilevel.commands.ablate.grid import cell_config, load_grid, plan_cells
    from bilevel.commands.run import RUN_MARKER, run

    grid = load_grid(out / GRID_FILE)
    cell = next((c for c in plan_cells(grid) if c.name == name), None)
    if cell is None:
        raise BilevelError(f"the grid in {out} has no cell {name!r}")
    folder = cell_folder(out, cell)
    run(cell_config(grid, cell, folder, out / CELLS), resume=(folder / RUN_MARKER).is_file())


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return worker_main(sys.argv[1:] if argv is None else argv, USAGE, run_cell)


if __name__ == "__main__":  # pragma: no cover - run as a worker process
    sys.exit(main())
