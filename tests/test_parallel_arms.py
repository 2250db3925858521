"""Arms side by side: a run whose independent arms train in worker processes at once gives the very students and
rows of the same run with its arms in turn (same thread count), and says clearly when a worker fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from bilevel.commands import arm_workers
from bilevel.commands.arm_workers import worker_count
from bilevel.core.errors import BilevelError
from bilevel.runtime.workers import WORKERS_ENV, usable_cores

ARGS = [
    "--arms", "teacher,kd,bilevel", "--steps", "8",
    "--set", "training.batch_size=8", "--set", "training.upper_batch_size=8", "--set", "training.log_every=4",
    "--set", "evaluation.samples_per_prompt=2", "--set", "evaluation.concept_samples=4", "--set", "evaluation.steps=3",
    "--set", "evaluation.latency_repeats=1",
    "--set", "unlearner.options.pool_size=16", "--set", "data.finetune_size=256", "--set", "data.concept_size=32",
]  # fmt: skip
THREADS = max(1, usable_cores() // 2)  # what each of two workers gets; the reference run uses the same


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1", "BILEVEL_WORKERS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bilevel", "run", *ARGS, "--out", str(out), *extra],
        check=False, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow  # about 40 s: two runs in subprocesses: the separate CI step
def test_side_by_side_arms_equal_arms_in_turn(tmp_path: Path) -> None:
    in_turn, side = tmp_path / "in-turn", tmp_path / "side-by-side"
    ran = _run(in_turn)
    assert ran.returncode == 0, ran.stderr[-2000:]
    ran = _run(side, "--set", "training.parallel_arms=2")
    assert ran.returncode == 0, ran.stderr[-2000:]
    log = ran.stdout + ran.stderr
    assert "2 at a time" in log and "[bilevel] bilevel fine-tuning: step 8/8" in log
    for arm in ("kd", "bilevel"):
        a = load_file(in_turn / "students" / arm / "model.safetensors")
        b = load_file(side / "students" / arm / "model.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), f"{arm} student differs"
        assert (side / "logs" / f"{arm}.log").is_file()
    rows = {p: json.loads((p / "metrics.json").read_text())["rows"] for p in (in_turn, side)}
    assert [r["model"] for r in rows[side]] == ["teacher", "kd", "bilevel"]  # the config's order, not finish order
    for a, b in zip(rows[in_turn], rows[side], strict=True):
        assert a["concept_rate"] == b["concept_rate"] and a["retained_accuracy"] == b["retained_accuracy"]
    assert (side / "DONE").is_file()


def test_auto_runs_side_by_side_only_where_it_pays(monkeypatch) -> None:
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    monkeypatch.setattr(arm_workers, "usable_cores", lambda: 2)
    arms = ["teacher", "pruned", "kd", "bilevel"]
    assert worker_count("auto", "cpu", arms, data_parallel=False) == 2
    assert worker_count("auto", "cuda", arms, data_parallel=False) == 1  # one GPU: arms in turn
    assert worker_count("auto", "cpu", arms, data_parallel=True) == 1
    assert worker_count("auto", "cpu", ["teacher", "pruned", "bilevel"], data_parallel=False) == 1  # one trained arm
    assert worker_count(3, "cpu", ["kd", "bilevel", "two-stage"], data_parallel=False) == 2  # two-stage waits for kd
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert worker_count("auto", "cpu", arms, data_parallel=False) == 1
    monkeypatch.setenv(WORKERS_ENV, "many")
    with pytest.raises(BilevelError, match="BILEVEL_WORKERS takes a number of processes or 'auto', got 'many'"):
        worker_count("auto", "cpu", arms, data_parallel=False)


def test_a_failed_worker_is_one_line_and_leaves_the_run_resumable(tmp_path: Path) -> None:
    """A worker on a folder holding no run fails; the parent names the arm, the reason and the log."""
    with pytest.raises(BilevelError, match=r"arm kd failed: error: nothing to resume in .*full log: "):
        arm_workers.run_side_by_side(tmp_path, ["kd"], 1, lambda line: None)
    assert (tmp_path / "logs" / "kd.log").is_file()
