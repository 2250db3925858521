"""`bilevel ablate --robustness`: erased or dormant? Fake finished grids on disk (no training, no attacks run): the
cells' robustness.json flows into records, aggregates, the second claim question, the report and its plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from bilevel.cli import build_parser
from bilevel.commands.ablate import commands
from bilevel.commands.ablate.execute import GridOutcome, cell_folder
from bilevel.commands.ablate.grid import AblationGrid, Cell, cell_config, plan_cells
from bilevel.commands.ablate.report import write_report
from bilevel.commands.ablate.results import Record, add_attacks, aggregate, check_claim, collect
from bilevel.commands.run import DONE
from bilevel.core.stats import wilson_interval

N = 128  # concept samples behind every rate
ATTACKS = ["paraphrase", "relearn-benign"]
#: per arm: (concept successes of N) without attack, under paraphrase, at the end of relearn-benign
GOOD = {"teacher": (120, 121, 122), "kd": (100, 101, 110), "bilevel": (0, 0, 2), "two-stage": (0, 60, 90),
        "two-stage-tuned": (0, 50, 80)}  # fmt: skip


def _rate(k: int) -> dict[str, Any]:
    return {"concept_rate": k / N, "interval": list(wilson_interval(k, N)), "samples": N}


def _report(arm: str, counts: tuple[int, int, int], concepts: list[str]) -> dict[str, Any]:
    """One arm's attack report, as bilevel.commands.attack.attack_model returns it."""
    plain, paraphrase, relearned = counts
    steps = [0, 50, 100]
    results = []
    for concept in concepts:
        results.append({"attack": "paraphrase", "concept": concept, **_rate(paraphrase), "used": {"best": "lilac"},
                         "curve": [], "reached_at": None, "note": None})  # fmt: skip
        curve = [{"step": s, **{k: v for k, v in _rate(c).items() if k != "samples"}}
                 for s, c in zip(steps, (plain, (plain + relearned) // 2, relearned))]  # fmt: skip
        results.append({"attack": "relearn-benign", "concept": concept, **_rate(relearned), "used": {"best_at": 100},
                        "curve": curve, "reached_at": None, "note": None})  # fmt: skip
    return {"model": arm, "no_attack": [{"concept": c, **_rate(plain)} for c in concepts], "results": results,
            "skipped": [{"attack": "inversion", "concept": c, "reason": "not selected"} for c in concepts]}  # fmt: skip


def _row(arm: str, concept: int, retained: int = 200, of: int = 224) -> dict[str, Any]:
    """A metrics.json row as Run.evaluate writes it (rates with their `_ci` Wilson intervals)."""
    return {
        "model": arm, "params": 1.0e6, "macs": 2.0e8, "latency_ms": 3.0, "train_seconds": 10.0,
        "concept_rate": concept / N, "concept_rate_ci": list(wilson_interval(concept, N)),
        "retained_accuracy": retained / of, "retained_accuracy_ci": list(wilson_interval(retained, of)),
        "collateral": 0.9, "collateral_ci": [0.85, 0.94], "quality_distance": 0.1, "per_group": {},
    }  # fmt: skip


def _fake_cell(grid: AblationGrid, cell: Cell, out: Path, counts: dict[str, tuple[int, int, int]],
               attacked: bool = True, concepts: tuple[str, ...] = ("purple",)) -> None:  # fmt: skip
    """A finished cell as `bilevel run --robustness` leaves it: config.json, metrics.json, DONE, robustness.json."""
    folder = cell_folder(out, cell)
    folder.mkdir(parents=True)
    config = cell_config(grid, cell, folder, out / "cells").model_dump(mode="json")
    config["concepts"] = list(concepts)
    (folder / "config.json").write_text(json.dumps(config))
    rows = [_row(arm, counts.get(arm, (5, 0, 0))[0]) for arm in cell.arms]
    histories = {arm: [{"step": 3, "eval_concept_rate": 0.2, "eval_retained_accuracy": 0.8}] for arm in cell.arms
                 if arm != "teacher"}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps({"rows": rows, "histories": histories}))
    (folder / DONE).write_text(json.dumps({"finished": "now"}))
    if attacked:
        reports = {arm: _report(arm, counts[arm], list(concepts)) for arm in cell.arms if arm in counts}
        (folder / "robustness.json").write_text(json.dumps({"attacks": ATTACKS, "rows": [], "reports": reports}))


def _fake_grid(out: Path, seeds: list[int], counts=GOOD, attacked: bool = True) -> tuple[AblationGrid, GridOutcome]:
    grid = AblationGrid(pruners=["bk-sdm"], unlearners=["esd"], seeds=seeds, robustness=attacked)
    cells = plan_cells(grid)
    for cell in cells:
        _fake_cell(grid, cell, out, counts, attacked)
    status = {c.name: {"state": "done", "wall_seconds": 1.0} for c in cells}
    return grid, GridOutcome(out, cells, status)


def test_records_and_aggregates_carry_the_rate_under_each_attack(tmp_path):
    _, outcome = _fake_grid(tmp_path, [0])
    records = collect(tmp_path, outcome.cells)
    bilevel = next(r for r in records if r.arm == "bilevel")
    two_stage = next(r for r in records if r.arm == "two-stage")
    assert two_stage.metrics["attack:paraphrase"] == pytest.approx(60 / N)
    assert two_stage.intervals["attack:paraphrase"] == pytest.approx(wilson_interval(60, N))
    assert bilevel.metrics["attack:none"] == 0.0 and bilevel.intervals["attack:none"][1] > 0  # Wilson: not a point
    assert [p["step"] for p in bilevel.curves["relearn-benign"]] == [0, 50, 100]
    assert "attack:inversion" not in bilevel.metrics  # skipped: no rate
    assert not next(r for r in records if r.arm == "pruned").curves  # never attacked
    by_method = {a.method: a for a in aggregate(records)}
    agg = by_method["two-stage"]
    assert agg.mean["attack:relearn-benign"] == pytest.approx(90 / N)
    assert agg.interval["attack:relearn-benign"] == pytest.approx(wilson_interval(90, N))  # one seed: the run's
    assert agg.values["attack:paraphrase"] == [pytest.approx(60 / N)]
    assert "attack:paraphrase" not in by_method["pruned only"].mean


def test_over_seeds_attack_rates_get_a_t_interval(tmp_path):
    """Identical seeds have no spread, but their samples still have uncertainty: the interval is the t-interval
    widened to the pooled samples' (each side of a seed's Wilson interval / sqrt(seeds)), never a point."""
    grid, outcome = _fake_grid(tmp_path, [0, 1])
    by_method = {a.method: a for a in aggregate(collect(tmp_path, outcome.cells))}
    agg = by_method["bilevel"]
    assert agg.n == 2 and agg.values["attack:relearn-benign"] == [pytest.approx(2 / N)] * 2
    low, high = agg.interval["attack:relearn-benign"]
    one_low, one_high = wilson_interval(2, N)
    assert low == pytest.approx(2 / N - (2 / N - one_low) / 2**0.5)
    assert high == pytest.approx(2 / N + (one_high - 2 / N) / 2**0.5)
    assert one_low < low < 2 / N < high < one_high  # narrower than one seed's, wider than a point
    checks = check_claim(list(by_method.values()), grid.claim_margin)
    assert checks[0].robustness == {"paraphrase": "holds", "relearn-benign": "holds"}  # paired over the seeds


@pytest.mark.parametrize(("bilevel", "two_stage", "verdict"), [(0, 60, "holds"), (60, 0, "fails")])
def test_robustness_is_the_second_question_answered_with_intervals(tmp_path, bilevel, two_stage, verdict):
    counts = dict(GOOD, bilevel=(0, bilevel, bilevel), **{"two-stage": (0, two_stage, two_stage)})
    grid, outcome = _fake_grid(tmp_path, [0], counts)
    checks = check_claim(aggregate(collect(tmp_path, outcome.cells)), grid.claim_margin)
    check = next(c for c in checks if c.two_stage.method == "two-stage")
    assert check.attacks == ["paraphrase", "relearn-benign"]  # "none" is not an attack
    assert check.robustness == {"paraphrase": verdict, "relearn-benign": verdict}
    _, low, high = check.robustness_differences["paraphrase"]
    assert (high < 0) if verdict == "holds" else (low > 0)
    _, plain_outcome = _fake_grid(tmp_path / "plain", [0], counts, attacked=False)
    unattacked = check_claim(aggregate(collect(tmp_path / "plain", plain_outcome.cells)), grid.claim_margin)
    plain = next(c for c in unattacked if c.two_stage.method == "two-stage")
    assert plain.robustness == {} and check.verdict == plain.verdict  # the first question is untouched


def test_report_shows_robustness_table_verdicts_and_relearning_plot(tmp_path):
    grid, outcome = _fake_grid(tmp_path, [0])
    write_report(grid, outcome)
    md = (tmp_path / "report.md").read_text()
    assert "## Robustness (concept rate under attack, 95% interval)" in md
    assert "| method | pruner | unlearner | solver | seeds | no attack | paraphrase | relearn-benign |" in md
    assert "| bilevel | bk-sdm | esd | alternating | 1 | 0.00 [0.00, 0.03] | 0.00 [0.00, 0.03] | 0.02 [" in md
    assert "- bilevel vs two-stage (bk-sdm/esd): paraphrase: holds (" in md
    assert "- bilevel vs two-stage (tuned) (bk-sdm/esd): paraphrase: holds" in md
    assert "![concept rate while relearning (attack)](plots/relearning.png)" in md
    assert (tmp_path / "plots" / "relearning.png").stat().st_size > 5000
    report = json.loads((tmp_path / "report.json").read_text())
    check = report["claim"]["checks"][0]
    assert check["robustness"] == {"paraphrase": "holds", "relearn-benign": "holds"}
    assert check["robustness_difference"]["paraphrase"][0] == pytest.approx(-60 / N)
    assert check["verdict"] in ("holds", "fails", "inconclusive")
    bilevel = next(a for a in report["aggregates"] if a["method"] == "bilevel")
    assert bilevel["interval"]["attack:paraphrase"] == pytest.approx(list(wilson_interval(0, N)))
    record = next(r for r in report["records"] if r["arm"] == "two-stage")
    assert record["curves"]["relearn-benign"][-1]["concept_rate"] == pytest.approx(90 / N)
    row = next(r for r in csv.DictReader((tmp_path / "report.csv").open()) if r["method"] == "two-stage")
    assert float(row["attack:paraphrase_mean"]) == pytest.approx(60 / N)
    html = (tmp_path / "report.html").read_text()
    assert "<h2>Robustness (concept rate under attack, 95% interval)</h2>" in html
    assert html.count("<table>") == 4 and html.count("data:image/png;base64,") == 3


def test_an_unattacked_grid_reports_as_before(tmp_path):
    grid, outcome = _fake_grid(tmp_path, [0], attacked=False)
    write_report(grid, outcome)
    assert "Robustness" not in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "plots" / "relearning.png").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(c["robustness"] == {} for c in report["claim"]["checks"])
    assert "attack:" not in (tmp_path / "report.csv").read_text()


def test_arms_attacked_by_hand_join_the_report(tmp_path):
    """`bilevel attack CELL/students/ARM --out CELL/robustness/ARM` on a grid run without --robustness: the report
    reads each arm's attacks.json, so a chosen subset of a finished grid gets its robustness verdicts."""
    grid, outcome = _fake_grid(tmp_path, [0, 1], attacked=False)
    for cell in outcome.cells:
        for arm in ("bilevel", "two-stage"):
            if arm in cell.arms:
                folder = cell_folder(tmp_path, cell) / "robustness" / arm
                folder.mkdir(parents=True)
                (folder / "attacks.json").write_text(json.dumps(_report(arm, GOOD[arm], ["purple"])))
    records = collect(tmp_path, outcome.cells)
    bilevel = next(r for r in records if r.arm == "bilevel")
    assert bilevel.metrics["attack:paraphrase"] == 0.0 and "attack:paraphrase" not in next(
        r for r in records if r.arm == "two-stage-tuned"
    ).metrics  # not attacked: no rate
    checks = check_claim(aggregate(records), grid.claim_margin)
    against = {c.two_stage.method: c for c in checks}
    assert against["two-stage"].robustness == {"paraphrase": "holds", "relearn-benign": "holds"}
    assert against["two-stage (tuned)"].robustness == {}


def test_several_concepts_are_pooled():
    record = Record("c", "bilevel", "bilevel", "p", "u", "s", 0, {})
    report = _report("bilevel", (0, 10, 30), ["purple", "orange"])
    report["results"][2]["concept_rate"] = 20 / N  # orange under paraphrase: 20 of 128
    add_attacks(record, report)
    assert record.metrics["attack:paraphrase"] == pytest.approx(30 / (2 * N))
    assert record.intervals["attack:paraphrase"] == pytest.approx(wilson_interval(30, 2 * N))
    assert record.metrics["attack:none"] == 0.0
    curve = record.curves["relearn-benign"]  # the mean of the two concepts' curves, no band
    assert [p["step"] for p in curve] == [0, 50, 100] and curve[-1]["interval"] is None


def test_robustness_flag_reaches_every_cell_config(tmp_path):
    args = build_parser().parse_args(["ablate", "--robustness", "--pruners", "bk-sdm", "--unlearners", "esd",
                                      "--set", "robustness.attacks=[paraphrase]"])  # fmt: skip
    grid = commands.grid_from_args(args)
    assert grid.robustness
    for cell in plan_cells(grid):
        config = cell_config(grid, cell, tmp_path / cell.name, tmp_path)
        assert config.robustness.enabled and config.robustness.attacks == ["paraphrase"]
    plain = commands.grid_from_args(build_parser().parse_args(["ablate", "--pruners", "bk-sdm"]))
    assert not plain.robustness
    assert not any(cell_config(plain, c, tmp_path, tmp_path).robustness.enabled for c in plan_cells(plain))


def test_finished_cells_without_their_attacks_are_attacked_after_the_grid(tmp_path, monkeypatch):
    """A run writes DONE before attacking: a grid interrupted during the attacks must still get them."""
    grid, outcome = _fake_grid(tmp_path, [0])
    missing = next(c for c in outcome.cells if c.kind == "method")
    (cell_folder(tmp_path, missing) / "robustness.json").unlink()
    failed_cell = next(c for c in outcome.cells if c.kind == "baseline")
    (cell_folder(tmp_path, failed_cell) / "robustness.json").unlink()
    outcome.status[failed_cell.name]["state"] = "failed"  # failed this time: retried on the next invocation
    attacked = []

    def fake_attack_arms(out, config, arms):
        attacked.append((out.name, config.robustness.enabled, arms))
        return {}

    monkeypatch.setattr("bilevel.commands.robustness.attack_arms", fake_attack_arms)
    commands.attack_unattacked_cells(grid, outcome)
    assert attacked == [(missing.name, True, ["bilevel", "two-stage", "two-stage-tuned"])]
