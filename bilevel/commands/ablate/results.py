"""Gathers a grid's finished cells into per-arm records, aggregates them over seeds (mean, std) and tests the
paper's claim: at equal total steps, bilevel suppresses the concept at least as well as two-stage (fine-tune,
then erase) while keeping quality at least as well; and, where the cells were attacked, the second question: is the
concept erased, or only dormant (back under another name, a learned embedding, or relearning)?"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bilevel.commands.ablate.execute import cell_folder
from bilevel.commands.ablate.grid import Cell
from bilevel.commands.robustness import ROBUSTNESS_FILE
from bilevel.commands.run import DONE
from bilevel.core.stats import (
    Verdict,
    at_most,
    combine,
    difference_interval,
    hull,
    paired_difference_interval,
    rate_over_seeds,
    seeds_sampling_interval,
    wilson_interval,
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
    ("train_cpu_seconds", "CPU s", True),
]
#: the rates (proportions) whose intervals are reported and compared
RATES = ("concept_rate", "retained_accuracy", "collateral")
#: metric key prefix of the concept rate under an attack (`bilevel run --robustness`); "attack:none" is the attacks'
#: own measurement of the untouched model, with their sampler, so it compares with the attacked rates directly
ATTACK = "attack:"
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
    #: attack name -> concept rate along the attack's steps ([{step, concept_rate, interval}]: relearning curves)
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


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
    #: 95% intervals of the rates: over seeds a t-interval of the per-seed values widened to at least `sampling`,
    #: for one seed the run's Wilson one
    interval: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: per-seed values in seed order (what paired comparisons pair)
    values: dict[str, list[float]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    #: over seeds: the samples' own uncertainty of the mean rate (bilevel.core.stats.seeds_sampling_interval)
    sampling: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        parts = [self.method] + [p for p in (self.pruner, self.unlearner, self.solver) if p != "-"]
        return " / ".join(parts)


def attack_key(name: str) -> str:
    return f"{ATTACK}{name}"


def is_rate(key: str) -> bool:
    """A proportion with a 95% interval: the run's rates and every concept rate under attack."""
    return key in RATES or key.startswith(ATTACK)


def collect(out: Path, cells: list[Cell]) -> list[Record]:
    """Records of every finished cell (an unfinished or failed one contributes nothing), with the concept rate
    under each attack where the cell was attacked (its robustness.json)."""
    records: list[Record] = []
    for cell in cells:
        folder = cell_folder(out, cell)
        if not (folder / DONE).is_file():
            continue
        data = json.loads((folder / "metrics.json").read_text())
        attacked = _robustness_reports(folder)
        for row in data["rows"]:
            arm = row["model"]
            teacher = arm == "teacher"
            trained_by = arm in ("bilevel", "two-stage", "two-stage-tuned")
            record = Record(
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
            if arm in attacked:
                add_attacks(record, attacked[arm])
            records.append(record)
    return records


def _robustness_reports(folder: Path) -> dict[str, dict[str, Any]]:
    """arm -> its attack report: the cell's robustness.json, plus any arm attacked on its own into
    robustness/<arm>/attacks.json (`bilevel attack CELL/students/ARM --out CELL/robustness/ARM`: a chosen subset of
    a finished grid attacked by hand, or `--robustness` attacks interrupted before robustness.json was written)."""
    path = folder / ROBUSTNESS_FILE
    reports = dict(json.loads(path.read_text()).get("reports") or {}) if path.is_file() else {}
    for found in sorted((folder / "robustness").glob("*/attacks.json")):
        if found.parent.name not in reports:
            reports[found.parent.name] = json.loads(found.read_text())
    return reports


def add_attacks(record: Record, report: dict[str, Any]) -> None:
    """`attack:<name>` metrics, intervals and curves of one arm from its attack report (`attack:none` from its
    no-attack measurement). Several concepts are pooled: successes and samples summed, so one rate, one interval."""
    by_attack: dict[str, list[dict[str, Any]]] = {"none": list(report.get("no_attack") or [])}
    for result in report.get("results") or []:
        by_attack.setdefault(result["attack"], []).append(result)
    for name, entries in by_attack.items():
        if not entries:
            continue
        key = attack_key(name)
        record.metrics[key], record.intervals[key] = _pooled_rate(entries)
        curve = _mean_curve(entries)
        if curve:
            record.curves[name] = curve


def _pooled_rate(entries: list[dict[str, Any]]) -> tuple[float, tuple[float, float]]:
    """One concept: its rate and Wilson interval as measured; several: pooled over concepts."""
    if len(entries) == 1:
        low, high = entries[0]["interval"]
        return float(entries[0]["concept_rate"]), (float(low), float(high))
    trials = sum(int(e["samples"]) for e in entries)
    if trials <= 0:
        rates = [float(e["concept_rate"]) for e in entries]
        return sum(rates) / len(rates), (0.0, 1.0)
    successes = sum(round(float(e["concept_rate"]) * int(e["samples"])) for e in entries)
    return successes / trials, wilson_interval(successes, trials)


def _mean_curve(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One concept: its curve as measured; several: the mean rate at the steps every concept measured (the points
    carry no sample counts, so no pooled interval: the plot draws such a curve without a band)."""
    curves = [e.get("curve") or [] for e in entries]
    if len(curves) == 1:
        return [dict(p) for p in curves[0]]
    if not all(curves):
        return []
    rates = [{p["step"]: float(p["concept_rate"]) for p in c} for c in curves]
    steps = [p["step"] for p in curves[0] if all(p["step"] in r for r in rates)]
    return [{"step": s, "concept_rate": sum(r[s] for r in rates) / len(rates), "interval": None} for s in steps]


def aggregate(records: list[Record]) -> list[Aggregate]:
    """Mean, sample standard deviation and 95% interval over seeds, per method and setting, in first-seen order."""
    groups: dict[tuple[str, str, str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.method, r.pruner, r.unlearner, r.solver), []).append(r)
    out = []
    for (method, pruner, unlearner, solver), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.seed)
        attacks = [k for k in dict.fromkeys(k for r in rs for k in r.metrics) if k.startswith(ATTACK)]
        keys = [k for k in [k for k, _, _ in METRICS] + attacks if all(k in r.metrics for r in rs)]
        values = {k: [r.metrics[k] for r in rs] for k in keys}
        mean = {k: sum(v) / len(v) for k, v in values.items()}
        std = {k: _sample_std(v) for k, v in values.items()}
        interval: dict[str, tuple[float, float]] = {}
        sampling: dict[str, tuple[float, float]] = {}
        for k in (k for k in keys if is_rate(k)):
            if len(rs) > 1:
                per_seed = [r.intervals[k] for r in rs] if all(k in r.intervals for r in rs) else None
                if per_seed is not None:
                    sampling[k] = seeds_sampling_interval(values[k], per_seed)
                interval[k] = rate_over_seeds(values[k], per_seed)[1:]
            elif k in rs[0].intervals:
                interval[k] = rs[0].intervals[k]
        cells = [r.cell for r in rs]
        out.append(Aggregate(method, pruner, unlearner, solver, len(rs), mean, std, cells, interval, values,
                             [r.seed for r in rs], sampling))  # fmt: skip
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
        """(worse - better, low, high) for `key`: paired over seeds when both ran the same seeds (>1), widened to at
        least the Newcombe interval of the two means' sampling uncertainty; else from the two runs' Wilson
        intervals."""
        if worse.n > 1 and worse.seeds == better.seeds:
            paired = paired_difference_interval(worse.values[key], better.values[key])
            if key not in worse.sampling or key not in better.sampling:
                return paired
            a, b = worse.mean[key], better.mean[key]
            _, low, high = difference_interval(a, worse.sampling[key], b, better.sampling[key])
            return hull(paired, (low, high))
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

    @property
    def attacks(self) -> list[str]:
        """Attacks measured on both arms, in bilevel's order (the no-attack measurement aside)."""
        return [
            k.removeprefix(ATTACK)
            for k in self.bilevel.mean
            if k.startswith(ATTACK) and k != attack_key("none") and k in self.two_stage.mean
        ]

    @property
    def robustness_differences(self) -> dict[str, tuple[float, float, float]]:
        """attack -> (bilevel - two-stage, low, high) of the concept rate under that attack."""
        return {name: self.difference(self.bilevel, self.two_stage, attack_key(name)) for name in self.attacks}

    @property
    def robustness(self) -> dict[str, Verdict]:
        """The second question, erased or dormant: under each attack, is bilevel's concept rate at most two-stage's
        (plus the margin)? Kept apart from `verdict`, which answers the first question (no attack) alone."""
        return {name: at_most(d, self.margin) for name, d in self.robustness_differences.items()}


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
