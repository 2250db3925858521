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
        "--arms", "kd,bilevel", "--steps", "200", "--out", str(out),
        "--set", "evaluation.samples_per_prompt=16", "--set", "evaluation.latency_repeats=2",
        "--set", "unlearner.options.pool_size=64", "--set", "data.finetune_size=1024",
        "--set", "evaluation.concept_samples=16",  # a mechanics test: the default 4x concept samples cost time
    ]  # fmt: skip
    assert main(args) == 0
    return out


def test_bilevel_suppresses_the_concept_more_than_kd_only(short_run):
    rows = {r["model"]: r for r in json.loads((short_run / "metrics.json").read_text())["rows"]}
    assert rows["bilevel"]["concept_rate"] < rows["kd"]["concept_rate"]
    assert rows["bilevel"]["concept_distance/purple"] > rows["kd"]["concept_distance/purple"]


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
