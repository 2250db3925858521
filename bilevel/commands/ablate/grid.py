"""The ablation grid: which pruners x unlearners x solvers x seeds, which baselines, and the cells they become.

Each cell is a normal `bilevel run` in its own folder. Baselines are shared where they can be: one teacher cell,
one `pruned` + `kd` cell per pruner and seed (its KD-only student is where every two-stage arm of that pruner and
seed starts its erase stage), and one method cell per pruner x unlearner x solver x seed (`bilevel` and
`two-stage` arms, so both are trained with the same number of lower and upper updates).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from bilevel import CONFIG_VERSION
from bilevel.core.config import RunConfig, Section, build_config, read_config_file, set_dotted, validation_message
from bilevel.core.errors import BilevelError

Baseline = Literal["teacher", "pruned", "ddpm", "kd", "two-stage", "two-stage-tuned"]
#: the two-stage arms (fine-tune, then erase): with the bilevel arm's upper settings, and as a practitioner tunes it
TWO_STAGE = ("two-stage", "two-stage-tuned")
ALL_BASELINES: list[Baseline] = ["teacher", "pruned", "kd", "two-stage", "two-stage-tuned"]

# The tiny world's default grid: every built-in pruner x every built-in unlearner, alternating, three seeds (a
# verdict over seeds needs more than one; --quick keeps one).
DEFAULT_PRUNERS = ["bk-sdm", "magnitude", "diff-pruning"]
DEFAULT_UNLEARNERS = ["esd", "concept-ablation", "salun"]
DEFAULT_SOLVERS = ["alternating"]
DEFAULT_SEEDS = [0, 1, 2]

# Every trained arm is evaluated briefly 3 times while training, for the report's curves (4 samples per colour:
# a full evaluation costs about as much as 100 training steps here, a curve point about 12).
DEFAULT_BASE: dict[str, Any] = {"evaluation.curve_points": 3, "evaluation.curve_samples": 4}

# --quick: the default model and method on a shorter schedule, for a first look in a few minutes.
QUICK = {
    "pruners": ["bk-sdm"],
    "unlearners": ["esd", "concept-ablation"],
    "solvers": ["alternating"],
    "seeds": [0],
    "base": {
        "training.steps": 300,
        "evaluation.samples_per_prompt": 16,
        "evaluation.latency_repeats": 3,
        "data.finetune_size": 2048,
    },
}


class AblationGrid(Section):
    """A grid of runs. `base` holds run-config overrides shared by every cell (dotted keys, as `--set`)."""

    version: int = CONFIG_VERSION
    pruners: list[str] = Field(default_factory=lambda: list(DEFAULT_PRUNERS))
    unlearners: list[str] = Field(default_factory=lambda: list(DEFAULT_UNLEARNERS))
    solvers: list[str] = Field(default_factory=lambda: list(DEFAULT_SOLVERS))
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS), description="training seeds (data draws, noise)")
    baselines: list[Baseline] = Field(default_factory=lambda: list(ALL_BASELINES))
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="plugin name -> its options, for every cell that uses that plugin"
    )
    base: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_BASE),
        description="run-config overrides shared by every cell, e.g. {'training.steps': 600}",
    )
    claim_margin: float = Field(
        0.05, ge=0, le=1,
        description="non-inferiority margin of the claim check: bilevel holds 'at least as well' when, at 95% "
        "confidence, it is at most this much worse than two-stage (0.05 is about 6 samples of 128)",
    )  # fmt: skip
    robustness: bool = Field(
        False,
        description="attack every trained arm of every cell after training (robustness.enabled in each run), so the "
        "report can tell erased from dormant; costs about one CPU-minute per attack per arm on the tiny world",
    )

    @field_validator("pruners", "unlearners", "solvers", "seeds")
    @classmethod
    def _non_empty_unique(cls, v: list) -> list:
        if not v:
            raise ValueError("needs at least one entry")
        if len(set(v)) != len(v):
            raise ValueError(f"has duplicates: {v}")
        return v


@dataclass(frozen=True)
class Cell:
    """One run of the grid. kind: teacher (teacher arm), baseline (pruned/ddpm/kd per pruner), method."""

    name: str
    kind: Literal["teacher", "baseline", "method"]
    arms: tuple[str, ...]
    pruner: str | None = None
    unlearner: str | None = None
    solver: str | None = None
    seed: int = 0
    depends_on: str | None = None  # the baseline cell whose KD student the two-stage arm starts from


def plan_cells(grid: AblationGrid) -> list[Cell]:
    """Every cell in the order they must run (teacher, then per-pruner baselines, then methods)."""
    cells: list[Cell] = []
    if "teacher" in grid.baselines:
        cells.append(Cell("teacher", "teacher", ("teacher",), pruner=grid.pruners[0], seed=grid.seeds[0]))
    needs_kd = "kd" in grid.baselines or any(a in grid.baselines for a in TWO_STAGE)
    base_arms = tuple(a for a in ("pruned", "ddpm", "kd") if a in grid.baselines or (a == "kd" and needs_kd))
    for seed in grid.seeds:
        for pruner in grid.pruners:
            baseline = f"baseline--{pruner}--s{seed}"
            if base_arms:
                cells.append(Cell(baseline, "baseline", base_arms, pruner=pruner, seed=seed))
            for unlearner in grid.unlearners:
                for solver in grid.solvers:
                    arms = ("bilevel", *(a for a in TWO_STAGE if a in grid.baselines))
                    cells.append(
                        Cell(
                            f"{pruner}--{unlearner}--{solver}--s{seed}",
                            "method",
                            arms,
                            pruner=pruner,
                            unlearner=unlearner,
                            solver=solver,
                            seed=seed,
                            depends_on=baseline if len(arms) > 1 else None,
                        )
                    )
    return cells


def cell_config(grid: AblationGrid, cell: Cell, folder: Path, grid_root: Path) -> RunConfig:
    """The run config of one cell: the grid's base overrides, the cell's plugins, seed, arms, folder and (with
    `robustness`) the attacks after training."""
    data: dict[str, Any] = {}
    for key, value in grid.base.items():
        set_dotted(data, key, copy.deepcopy(value))
    for section, name in (("pruner", cell.pruner), ("unlearner", cell.unlearner), ("solver", cell.solver)):
        if name is not None:
            data[section] = {"name": name, "options": copy.deepcopy(grid.options.get(name, {}))}
    data.setdefault("training", {})["seed"] = cell.seed
    if grid.robustness:  # keeps any robustness.attacks / .options the base overrides chose
        set_dotted(data, "robustness.enabled", True)
    data["arms"] = list(cell.arms)
    data["output"] = {"dir": str(folder), "overwrite": False}
    data.setdefault("cache_dir", str(Path(grid_root).parent / "cache"))  # cells share pruned students
    if cell.depends_on is not None:
        data["reuse_kd_from"] = str(grid_root / cell.depends_on)
    return build_config(data)


def load_grid(path: Path | None, quick: bool = False, overrides: dict[str, Any] | None = None) -> AblationGrid:
    """Grid from a file (YAML/TOML/JSON), the --quick preset, and flag overrides, in that order."""
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    base = dict(DEFAULT_BASE)  # later sources win: defaults, --quick, the file, flags
    if quick:
        base.update(QUICK["base"])
        for key, value in QUICK.items():
            if key != "base":
                data.setdefault(key, value)
    base.update(data.get("base") or {})
    for key, value in (overrides or {}).items():
        if key == "base":
            base.update(value)
        elif value is not None:
            data[key] = value
    data["base"] = base
    try:
        grid = AblationGrid.model_validate(data)
    except ValidationError as exc:
        raise BilevelError(validation_message(exc, prefix="ablation grid")) from None
    if grid.version > CONFIG_VERSION:
        raise BilevelError(f"ablation grid version {grid.version} is newer than this bilevel supports")
    return grid


def validate_grid(grid: AblationGrid) -> None:
    """Fail before any cell runs: unknown plugins or options, invalid base overrides, unsupported couplings."""
    from bilevel.registry import get_registry

    reg = get_registry()
    for kind, names in (("pruner", grid.pruners), ("unlearner", grid.unlearners), ("solver", grid.solvers)):
        for name in names:
            reg.create(kind, name, grid.options.get(name, {}))
    unused = set(grid.options) - set(grid.pruners) - set(grid.unlearners) - set(grid.solvers)
    if unused:
        raise BilevelError(f"ablation grid options given for plugins not in the grid: {', '.join(sorted(unused))}")
    for cell in plan_cells(grid):
        cell_config(grid, cell, Path("check"), Path("check"))
