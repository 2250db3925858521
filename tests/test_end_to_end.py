"""A short `bilevel run` on the tiny world: the bilevel student shows the concept less than the KD-only one,
and every artefact (config, metrics, grids, reloadable students) is written."""

from __future__ import annotations

import json

import pytest
import torch

from bilevel.cli import main
from bilevel.compression.model_stats import example_inputs
from bilevel.compression.student_io import load_student


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    args = [
        "run", "--pruner", "bk-sdm", "--unlearner", "esd", "--solver", "alternating",
        "--arms", "kd,bilevel", "--steps", "150", "--out", str(out),
        "--set", "evaluation.samples_per_prompt=8", "--set", "evaluation.latency_repeats=2",
        "--set", "unlearner.options.pool_size=64", "--set", "data.finetune_size=1024",
        "--set", "evaluation.concept_samples=32", "--set", "evaluation.secondary=false",
        "--set", "solver.options.upper_every=1",  # a short run: an upper step every lower step
    ]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.mark.slow  # about 2.5 minutes on 2 cores with the 3.3M-parameter teacher: the separate CI step
def test_bilevel_suppresses_the_concept_more_than_kd_only(short_run):
    rows = {r["model"]: r for r in json.loads((short_run / "metrics.json").read_text())["rows"]}
    assert rows["bilevel"]["concept_rate"] < rows["kd"]["concept_rate"]
    assert rows["bilevel"]["concept_distance/purple"] > rows["kd"]["concept_distance/purple"]


@pytest.mark.slow
def test_run_writes_config_grids_and_reloadable_students(short_run):
    config = json.loads((short_run / "config.json").read_text())
    assert config["pruner"]["options"]["variant"] == "small"  # resolved plugin defaults are saved
    assert (short_run / "grids" / "bilevel.png").stat().st_size > 0
    history = json.loads((short_run / "metrics.json").read_text())["histories"]["bilevel"]
    assert history[-1]["lower_loss"] < history[0]["lower_loss"]  # the lower level learns
    assert "upper_loss" in history[-1]
    student, manifest = load_student(short_run / "students" / "bilevel")
    again, _ = load_student(short_run / "students" / "bilevel")
    inputs = example_inputs(student, 2)
    with torch.no_grad():
        assert torch.equal(student(**inputs).sample, again(**inputs).sample)
    assert manifest["arm"] == "bilevel"


def test_tuned_two_stage_arm_uses_the_recommended_erase_settings(tmp_path):
    """two-stage-tuned: the KD student, then the unlearner with `bilevel unlearn`'s recommended options and lr, for
    as many updates as bilevel's upper level made (a budget no larger than bilevel's)."""
    out = tmp_path / "run"
    args = [
        "run", "--arms", "kd,bilevel,two-stage,two-stage-tuned", "--steps", "8", "--out", str(out),
        "--set", "training.batch_size=4", "--set", "training.upper_batch_size=2", "--set", "evaluation.samples_per_prompt=2",
        "--set", "evaluation.steps=2", "--set", "evaluation.latency_repeats=1", "--set", "unlearner.options.pool_size=2",
        "--set", "unlearner.options.sample_steps=2", "--set", "data.finetune_size=64",
    ]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["model"] for r in metrics["rows"]] == ["kd", "bilevel", "two-stage", "two-stage-tuned"]
    histories = metrics["histories"]
    assert histories["bilevel"][-1]["upper_updates"] == 2  # every 4 of 8 steps
    for arm in ("two-stage", "two-stage-tuned"):  # as many erase updates as bilevel's upper level made
        assert histories[arm][-1]["step"] == 2
    rows = {r["model"]: r for r in metrics["rows"]}
    assert json.loads((out / "config.json").read_text())["training"]["upper_lr"] == 5e-4  # the run's own setting
    assert rows["two-stage-tuned"]["erase_lr"] == 3e-4 and rows["two-stage-tuned"]["erase_steps"] == 2
    assert rows["two-stage-tuned"]["erase_options"]["retain_weight"] == 5.0  # ESD's recommended retain term
    assert "erase_lr" not in rows["two-stage"]
