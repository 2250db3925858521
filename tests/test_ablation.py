"""`bilevel ablate`: a small grid runs every cell once, aggregates over seeds, tests the claim, writes a report
(Markdown, CSV, JSON, plots, a self-contained HTML page that renders in headless Chromium) and resumes."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import pytest

from bilevel.cli import main
from bilevel.commands.ablate import execute
from bilevel.commands.ablate.browser import check_html, find_browser
from bilevel.commands.ablate.grid import AblationGrid, load_grid, plan_cells
from bilevel.commands.ablate.results import Aggregate, Record, aggregate, check_claim

SMALL = [
    "--set", "training.steps=6", "--set", "training.batch_size=8", "--set", "training.upper_batch_size=4",
    "--set", "evaluation.samples_per_prompt=2", "--set", "evaluation.steps=4", "--set", "evaluation.curve_points=2",
    "--set", "evaluation.curve_samples=1", "--set", "evaluation.latency_repeats=1", "--set", "data.finetune_size=128",
    "--set", "data.concept_size=32",
]  # fmt: skip


def _ablate(out, *extra):
    return main(["ablate", "--out", str(out), "--pruners", "bk-sdm", "--unlearners", "esd", "--seeds", "0,1",
                 "--config", str(out.parent / "grid.yaml"), *SMALL, *extra])  # fmt: skip


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    (root / "grid.yaml").write_text("options:\n  esd:\n    pool_size: 8\n    sample_steps: 4\n")
    out = root / "grid"
    assert _ablate(out) == 0
    return out


def test_every_cell_is_a_finished_run_in_its_own_folder(grid_run):
    names = sorted(p.name for p in (grid_run / "cells").iterdir())
    assert names == sorted(
        ["teacher", "baseline--bk-sdm--s0", "baseline--bk-sdm--s1", "bk-sdm--esd--alternating--s0",
         "bk-sdm--esd--alternating--s1"]
    )  # fmt: skip
    for name in names:
        assert (grid_run / "cells" / name / "DONE").is_file()
    method = json.loads((grid_run / "cells" / "bk-sdm--esd--alternating--s1" / "config.json").read_text())
    assert method["arms"] == ["bilevel", "two-stage", "two-stage-tuned"]
    assert method["training"]["seed"] == 1
    assert method["reuse_kd_from"].endswith("baseline--bk-sdm--s1")  # two-stage starts from the shared KD student
    assert method["unlearner"]["options"]["pool_size"] == 8  # per-plugin options from the grid file


def test_report_aggregates_over_seeds_and_states_the_claim(grid_run):
    report = json.loads((grid_run / "report.json").read_text())
    records = report["records"]
    bilevel = [r for r in records if r["arm"] == "bilevel"]
    assert sorted(r["seed"] for r in bilevel) == [0, 1]
    agg = next(a for a in report["aggregates"] if a["method"] == "bilevel")
    values = [r["metrics"]["retained_accuracy"] for r in bilevel]
    assert agg["n"] == 2
    assert agg["mean"]["retained_accuracy"] == pytest.approx(sum(values) / 2)
    assert agg["std"]["retained_accuracy"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    checks = report["claim"]["checks"]  # bilevel against each two-stage arm, answered from intervals
    assert [c["against"] for c in checks] == ["two-stage", "two-stage (tuned)"]
    assert all(c["verdict"] in ("holds", "fails", "inconclusive") for c in checks)
    _, low, high = checks[0]["concept_difference"]  # over the two seeds: a paired t-interval around the mean gap
    assert low <= checks[0]["concept_difference"][0] <= high
    assert agg["interval"]["concept_rate"][0] <= agg["mean"]["concept_rate"] <= agg["interval"]["concept_rate"][1]
    md = (grid_run / "report.md").read_text()
    assert "at least as well" in md and "mean ± std" in md and "95% interval" in md
    assert "| bilevel | bk-sdm | esd | alternating | 2 |" in md
    rows = list(csv.DictReader((grid_run / "report.csv").open()))
    assert {r["method"] for r in rows} == {"teacher", "pruned only", "KD only", "bilevel", "two-stage",
                                           "two-stage (tuned)"}  # fmt: skip
    two_stage = next(r for r in rows if r["method"] == "two-stage")
    assert float(two_stage["train_seconds_mean"]) > 0  # includes its KD stage
    for seed in (0, 1):  # CPU time too: each two-stage arm's is its KD student's plus its own erasing
        cpu = {r["arm"]: r["metrics"].get("train_cpu_seconds") for r in records if r["seed"] == seed}
        assert cpu["two-stage"] > cpu["kd"] > 0 and cpu["two-stage-tuned"] > cpu["kd"]
    assert "CPU s" in md


def test_curves_come_from_evaluations_during_training(grid_run):
    history = json.loads((grid_run / "cells" / "bk-sdm--esd--alternating--s0" / "metrics.json").read_text())[
        "histories"
    ]
    points = [h["step"] for h in history["bilevel"] if "eval_concept_rate" in h]
    assert points == [3, 6]
    for name in ("curves.png", "scatter.png"):
        assert (grid_run / "plots" / name).stat().st_size > 5000


def test_a_finished_grid_runs_nothing_again(grid_run, monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(execute, "run", boom)
    assert _ablate(grid_run) == 0


def test_an_interrupted_grid_continues_where_it_stopped(grid_run, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    shutil.copytree(grid_run, out)
    (tmp_path / "grid.yaml").write_text((grid_run.parent / "grid.yaml").read_text())
    victim = out / "cells" / "bk-sdm--esd--alternating--s1"
    (victim / "DONE").unlink()
    shutil.rmtree(victim / "rows")
    shutil.rmtree(victim / "checkpoints")
    ran = []
    real_run = execute.run
    monkeypatch.setattr(
        execute, "run", lambda config, resume=False: ran.append((config.output.dir, resume)) or real_run(config, resume)
    )
    assert _ablate(out) == 0
    assert [(p.name, resume) for p, resume in ran] == [(victim.name, True)]
    assert (victim / "DONE").is_file()


@pytest.mark.slow  # about 40 s: two cells rerun in worker processes: the separate CI step
def test_cells_run_side_by_side_in_worker_processes(grid_run, tmp_path):
    """--jobs 2: the unfinished cells run in two worker processes at once; each finishes as a resumed cell would."""
    out = tmp_path / "grid"
    shutil.copytree(grid_run, out)
    (tmp_path / "grid.yaml").write_text((grid_run.parent / "grid.yaml").read_text())
    for name in ("bk-sdm--esd--alternating--s0", "bk-sdm--esd--alternating--s1"):
        (out / "cells" / name / "DONE").unlink()
        shutil.rmtree(out / "cells" / name / "rows")
        shutil.rmtree(out / "cells" / name / "checkpoints")
    assert _ablate(out, "--jobs", "2") == 0
    status = json.loads((out / "cells.json").read_text())
    for name in ("bk-sdm--esd--alternating--s0", "bk-sdm--esd--alternating--s1"):
        assert (out / "cells" / name / "DONE").is_file() and status[name]["state"] == "done"
        assert "bilevel fine-tuning" in (out / "logs" / f"{name}.log").read_text()
    assert not (out / "logs" / "teacher.log").exists()  # finished cells are not run again


def test_a_different_grid_in_the_folder_is_refused(grid_run, capsys):
    assert main(["ablate", "--out", str(grid_run), "--pruners", "magnitude", *SMALL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "different ablation grid" in err and "pruners" in err
    assert len(err.splitlines()) == 1


def test_bad_grids_fail_before_any_cell_runs(tmp_path, capsys):
    assert main(["ablate", "--out", str(tmp_path / "a"), "--pruners", "bk-sdm,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["ablate", "--out", str(tmp_path / "b"), "--seeds", "0,x"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["ablate", "--out", str(tmp_path / "c"), "--baselines", "teacher,oracle"]) == 2
    assert "baselines" in capsys.readouterr().err
    assert main(["ablate", "--out", str(tmp_path / "d"), "--set", "training.steps=-1"]) == 2
    assert "training.steps" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_grid_planning_shares_baselines_and_quick_preset():
    cells = plan_cells(AblationGrid())
    assert len(cells) == 1 + 3 * (3 + 9)  # teacher, per seed one baseline per pruner and every pruner x unlearner
    assert sorted({c.seed for c in cells}) == [0, 1, 2]
    quick = load_grid(None, quick=True)
    assert quick.pruners == ["bk-sdm"] and quick.base["training.steps"] == 300 and quick.seeds == [0]
    assert load_grid(None, quick=True, overrides={"seeds": [3, 4]}).seeds == [3, 4]  # flags win over --quick
    assert quick.base["evaluation.curve_points"] == 3 and quick.base["evaluation.curve_samples"] == 4
    no_two_stage = plan_cells(AblationGrid(baselines=["teacher", "pruned"], seeds=[0]))
    assert all(c.depends_on is None for c in no_two_stage)
    assert [c.arms for c in no_two_stage if c.kind == "baseline"] == [("pruned",)] * 3


def _agg(method: str, concept: float, retained: float, concept_n: int = 128, retained_n: int = 224) -> Aggregate:
    """One seed, with the Wilson intervals its run would have reported."""
    from bilevel.core.stats import wilson_interval

    mean = {"concept_rate": concept, "retained_accuracy": retained}
    interval = {
        "concept_rate": wilson_interval(round(concept * concept_n), concept_n),
        "retained_accuracy": wilson_interval(round(retained * retained_n), retained_n),
    }
    return Aggregate(method, "p", "u", "s", 1, mean, {k: 0.0 for k in mean}, [], interval, {}, [0])


@pytest.mark.parametrize(
    ("bilevel", "two_stage", "verdict"),
    [((0.0, 0.9), (0.0, 0.2), "holds"),  # both erase (0/128 each: a tie within the margin), bilevel keeps quality
     ((0.3, 0.9), (0.0, 0.9), "fails"),  # bilevel confidently leaks more
     ((0.0, 0.5), (0.0, 0.9), "fails"),  # bilevel confidently loses quality
     ((1 / 128, 0.95), (0.0, 0.80), "holds"),  # one concept sample apart: within the margin at 95%
     ((0.0, 0.90), (0.0, 0.90), "inconclusive"),  # equal retained accuracy: 224 samples cannot show a 0.05 margin
     ((0.0, 0.88), (0.0, 0.92), "inconclusive")],  # 4 points of retained accuracy: 224 samples cannot tell
)  # fmt: skip
def test_claim_check_from_intervals(bilevel, two_stage, verdict):
    (check,) = check_claim([_agg("bilevel", *bilevel), _agg("two-stage", *two_stage)], margin=0.05)
    assert check.verdict == verdict and check.holds is (verdict == "holds")


def test_claim_check_pairs_seeds():
    """Over seeds the difference is a paired t-interval: a consistent small gap is detected, a noisy one is not."""
    def agg(method, concepts):
        mean = {"concept_rate": sum(concepts) / 3, "retained_accuracy": 0.9}
        values = {"concept_rate": concepts, "retained_accuracy": [0.9, 0.9, 0.9]}
        return Aggregate(method, "p", "u", "s", 3, mean, {}, [], {}, values, [0, 1, 2])

    (worse,) = check_claim([agg("bilevel", [0.20, 0.21, 0.22]), agg("two-stage", [0.0, 0.01, 0.0])])
    assert worse.suppresses_as_well == "fails" and worse.verdict == "fails"
    (noisy,) = check_claim([agg("bilevel", [0.0, 0.3, 0.0]), agg("two-stage", [0.1, 0.0, 0.0])])
    assert noisy.suppresses_as_well == "inconclusive"


def test_over_seeds_agreeing_seeds_keep_their_sampling_uncertainty():
    """Three seeds that all measure 0/128 (or 0.90 of 224) have no spread, so a t-interval alone would be a point
    ([0.00, 0.00]) and a paired difference exactly 0; the samples' own uncertainty keeps both honest."""
    from bilevel.core.stats import wilson_interval

    def agg(method, concept, retained):
        values = {"concept_rate": [concept / 128] * 3, "retained_accuracy": [retained / 224] * 3}
        mean = {k: v[0] for k, v in values.items()}
        one = {"concept_rate": wilson_interval(concept, 128), "retained_accuracy": wilson_interval(retained, 224)}
        records = [Record(f"c{s}", method, method, "p", "u", "s", s, dict(mean), intervals=one) for s in (0, 1, 2)]
        return aggregate(records)[0]

    bilevel, two_stage = agg("bilevel", 0, 202), agg("two-stage", 0, 202)
    low, high = bilevel.interval["concept_rate"]
    assert low == 0.0 and 0.01 < high < wilson_interval(0, 128)[1]  # about the pooled 0/384's, not a point
    (check,) = check_claim([bilevel, two_stage], margin=0.05)
    _, d_low, d_high = check.concept_difference
    assert d_low < 0 < d_high <= 0.05 and check.suppresses_as_well == "holds"  # a tie within the margin
    _, q_low, q_high = check.quality_difference
    assert q_low < -0.02 and q_high > 0.02  # equal retained accuracy: 3 x 224 samples cannot show it exactly


def test_html_report_renders_in_headless_chromium(grid_run):
    if find_browser() is None:
        if os.environ.get("BILEVEL_REQUIRE_BROWSER") == "1":
            pytest.fail("BILEVEL_REQUIRE_BROWSER=1 but no Chromium found")
        pytest.skip("no Chromium on this machine (CI installs it and sets BILEVEL_REQUIRE_BROWSER=1)")
    html = (grid_run / "report.html").read_text()
    assert "src='plots/" not in html and "data:image/png;base64," in html  # self-contained
    check = check_html(grid_run / "report.html", screenshot=grid_run / "report.png")
    grids = sum(1 for _ in (grid_run / "cells").glob("*/grids/*.png"))
    assert check.images_ok and check.image_count == grids + 2  # every cell's grids and both plots decoded
    assert check.table_count == 3
    assert check.screenshot is not None and check.screenshot.stat().st_size > 10000


def test_settings_where_kd_shows_no_leak_are_flagged_uninformative():
    from bilevel.commands.ablate.tables import claim_summary

    broken_kd = _agg("KD only", 0.0, 0.13)  # a student that never recovered: nothing leaked to suppress
    leaky_kd = _agg("KD only", 0.78, 0.88)
    (flat,) = check_claim([_agg("bilevel", 0.0, 0.2), _agg("two-stage", 0.0, 0.1), broken_kd])
    (real,) = check_claim([_agg("bilevel", 0.0, 0.9), _agg("two-stage", 0.0, 0.2), leaky_kd])
    assert flat.holds and not flat.informative
    assert real.holds and real.informative
    summary = claim_summary([flat, real], 0.05)
    assert "holds in 2, fails in 0, inconclusive in 0 of 2" in summary
    assert "Only 1 of them can tell the methods apart" in summary
