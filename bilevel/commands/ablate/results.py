"""Gathers a grid's finished cells into per-arm records, aggregates them over seeds (mean, std) and tests the
paper's claim: at equal total steps, bilevel suppresses the concept at least as well as two-stage (fine-tune,
then erase) while keeping quality at least as well."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bilevel.commands.ablate.execute import cell_folder
from bilevel.commands.ablate.grid import Cell
from bilevel.commands.run import DONE
from bilevel.core.stats import (
    Verdict,
    at_most,
    combine,
    difference_interval,
    mean_interval,
    paired_difference_interval,
)

METHOD_NAMES = {
    "teacher": "teacher",
    "pruned": "pruned only",
    "ddpm": "DDPM only",
    "kd": "KD only",
    "bilevel": "bilevel",
    "two-stage": "two-stage",
    "two-stage-tuned": "two-stage (tuned)",
}
# (key, header, lower is better?) — the columns every table shows, in order.
METRICS = [
    ("concept_rate", "concept rate", True),
    ("retained_accuracy", "retained acc.", False),
    ("collateral", "collateral", False),
    ("quality_distance", "distance", True),  # the world's quality distance: SWD on the tiny world, FID on SD
    ("params", "params", True),
    ("macs", "MACs", True),
    ("latency_ms", "latency ms", True),
    ("train_seconds", "train s", True),
]
#: the rates (proportions) whose intervals are reported and compared
RATES = ("concept_rate", "retained_accuracy", "collateral")
# Below this KD-only concept rate (or retained accuracy) a setting cannot separate the methods: nothing leaked to
# suppress, or the student never recovered.
LEAK = 0.1
CLAIM = (
    "At equal total steps, bilevel fine-tuning suppresses the concept at least as well as two-stage "
    "(fine-tune with KD, then erase with the unlearner alone) while keeping quality at least as well."
)


@dataclass
class Record:
    """One arm of one finished cell."""

    cell: str
    method: str
    arm: str
    pruner: str
    unlearner: str
    solver: str
    seed: int
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # a run's 95% Wilson intervals


@dataclass
class Aggregate:
    """One method in one (pruner, unlearner, solver) setting, over seeds."""

    method: str
    pruner: str
    unlearner: str
    solver: str
    n: int
    mean: dict[str, float]
    std: dict[str, float]
    cells: list[str]
    #: 95% intervals of the rates: over seeds a t-interval of the per-seed values, for one seed the run's Wilson one
    interval: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: per-seed values in seed order (what paired comparisons pair)
    values: dict[str, list[float]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        parts = [self.method] + [p for p in (self.pruner, self.unlearner, self.solver) if p != "-"]
        return " / ".join(parts)


def collect(out: Path, cells: list[Cell]) -> list[Record]:
    """Records of every finished cell (an unfinished or failed one contributes nothing)."""
    records: list[Record] = []
    for cell in cells:
        folder = cell_folder(out, cell)
        if not (folder / DONE).is_file():
            continue
        data = json.loads((folder / "metrics.json").read_text())
        for row in data["rows"]:
            arm = row["model"]
            teacher = arm == "teacher"
            trained_by = arm in ("bilevel", "two-stage", "two-stage-tuned")
            records.append(
                Record(
                    cell=cell.name,
                    method=METHOD_NAMES.get(arm, arm),
                    arm=arm,
                    pruner="-" if teacher else str(cell.pruner),
                    unlearner=str(cell.unlearner) if trained_by else "-",
                    solver=str(cell.solver) if trained_by else "-",  # two-stage: matched to this solver's steps
                    seed=cell.seed,
                    metrics={k: float(row[k]) for k, _, _ in METRICS if isinstance(row.get(k), (int, float))}
                    | _legacy_distance(row),
                    history=list(data.get("histories", {}).get(arm) or []),
                    intervals={k: tuple(row[f"{k}_ci"]) for k in RATES if isinstance(row.get(f"{k}_ci"), list)},
                )
            )
    return records


def aggregate(records: list[Record]) -> list[Aggregate]:
    """Mean, sample standard deviation and 95% interval over seeds, per method and setting, in first-seen order."""
    groups: dict[tuple[str, str, str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.method, r.pruner, r.unlearner, r.solver), []).append(r)
    out = []
    for (method, pruner, unlearner, solver), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.seed)
        keys = [k for k, _, _ in METRICS if all(k in r.metrics for r in rs)]
        values = {k: [r.metrics[k] for r in rs] for k in keys}
        mean = {k: sum(v) / len(v) for k, v in values.items()}
        std = {k: _sample_std(v) for k, v in values.items()}
        interval: dict[str, tuple[float, float]] = {}
        for k in (k for k in RATES if k in values):
            if len(rs) > 1:
                _, low, high = mean_interval(values[k])
                interval[k] = (max(0.0, low), min(1.0, high))
            elif k in rs[0].intervals:
                interval[k] = rs[0].intervals[k]
        cells = [r.cell for r in rs]
        out.append(Aggregate(method, pruner, unlearner, solver, len(rs), mean, std, cells, interval, values,
                             [r.seed for r in rs]))  # fmt: skip
    return out


def _sample_std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@dataclass
class ClaimCheck:
    """Bilevel vs two-stage in one setting, answered from intervals: does bilevel suppress the concept at least as
    well (its concept rate at most two-stage's) and keep quality at least as well (two-stage's retained accuracy
    at most bilevel's)? Each part holds, fails or is inconclusive (see bilevel.core.stats.at_most)."""

    pruner: str
    unlearner: str
    bilevel_solver: str
    bilevel: Aggregate
    two_stage: Aggregate
    margin: float
    kd: Aggregate | None = None  # the KD-only baseline of this pruner: is there a leak to suppress at all?

    @property
    def informative(self) -> bool:
        """KD alone leaks the concept (rate >= LEAK) and keeps some quality: only then can the methods differ."""
        if self.kd is None:
            return True
        return self.kd.mean["concept_rate"] >= LEAK and self.kd.mean["retained_accuracy"] >= LEAK

    def difference(self, worse: Aggregate, better: Aggregate, key: str) -> tuple[float, float, float]:
        """(worse - better, low, high) for `key`: paired over seeds when both ran the same seeds (>1), else from the
        two runs' Wilson intervals."""
        if worse.n > 1 and worse.seeds == better.seeds:
            return paired_difference_interval(worse.values[key], better.values[key])
        a, b = worse.mean[key], better.mean[key]
        return difference_interval(a, worse.interval.get(key, (a, a)), b, better.interval.get(key, (b, b)))

    @property
    def concept_difference(self) -> tuple[float, float, float]:
        return self.difference(self.bilevel, self.two_stage, "concept_rate")

    @property
    def quality_difference(self) -> tuple[float, float, float]:
        return self.difference(self.two_stage, self.bilevel, "retained_accuracy")

    @property
    def suppresses_as_well(self) -> Verdict:
        return at_most(self.concept_difference, self.margin)

    @property
    def keeps_quality_as_well(self) -> Verdict:
        return at_most(self.quality_difference, self.margin)

    @property
    def verdict(self) -> Verdict:
        return combine([self.suppresses_as_well, self.keeps_quality_as_well])

    @property
    def holds(self) -> bool:
        return self.verdict == "holds"


def check_claim(aggregates: list[Aggregate], margin: float = 0.05) -> list[ClaimCheck]:
    """Bilevel vs each two-stage arm (as run with bilevel's settings, and tuned) for every pruner x unlearner
    (x solver) where both were run: the claim must hold against the stronger one, so both are checked."""
    kd = {a.pruner: a for a in aggregates if a.method == METHOD_NAMES["kd"]}
    checks = []
    for method in (METHOD_NAMES["two-stage"], METHOD_NAMES["two-stage-tuned"]):
        two_stage = {(a.pruner, a.unlearner, a.solver): a for a in aggregates if a.method == method}
        for a in aggregates:
            key = (a.pruner, a.unlearner, a.solver)
            if a.method == "bilevel" and key in two_stage:
                checks.append(ClaimCheck(a.pruner, a.unlearner, a.solver, a, two_stage[key], margin, kd.get(a.pruner)))
    return checks


def _legacy_distance(row: dict[str, Any]) -> dict[str, float]:
    """Rows written before the World protocol named the tiny world's distance `swd`."""
    if "quality_distance" not in row and isinstance(row.get("swd"), (int, float)):
        return {"quality_distance": float(row["swd"])}
    return {}
