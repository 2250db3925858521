"""Exact resume: a run killed with SIGKILL in the middle of the bilevel arm and continued with --resume ends with
a student bit-identical to an uninterrupted run of the same config and seed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ARGS = [
    "--arms", "bilevel", "--steps", "40",
    "--set", "training.checkpoint_every=10", "--set", "training.log_every=15",
    "--set", "training.batch_size=8", "--set", "training.upper_batch_size=8",
    "--set", "evaluation.samples_per_prompt=2", "--set", "evaluation.steps=3", "--set", "evaluation.latency_repeats=1",
    "--set", "unlearner.options.pool_size=16", "--set", "data.finetune_size=256", "--set", "data.concept_size=32",
]  # fmt: skip
KILL_AT = 20


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as sink:  # a file, not a pipe: an unread pipe could stall the child
        return subprocess.Popen(
            [sys.executable, "-m", "bilevel", "run", *args], env=_env(), stdout=sink, stderr=subprocess.STDOUT
        )


def _checkpoint_step(out: Path) -> int:
    path = out / "checkpoints" / "bilevel" / "state.json"
    return json.loads(path.read_text())["step"] if path.is_file() else 0


def _kill_after_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _checkpoint_step(out) < KILL_AT:
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"run ended (rc={proc.returncode}) or stalled before its step-{KILL_AT} checkpoint")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _history(out: Path) -> list[dict]:
    history = json.loads((out / "metrics.json").read_text())["histories"]["bilevel"]
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    reference = _start([*ARGS, "--out", str(whole)], tmp_path / "whole.log")  # both at once: 2 cores
    victim = _start([*ARGS, "--out", str(broken)], tmp_path / "broken.log")
    _kill_after_checkpoint(victim, broken)
    assert victim.returncode == -signal.SIGKILL
    killed_at = _checkpoint_step(broken)
    assert KILL_AT <= killed_at < 40, "the kill must land inside the bilevel arm"
    assert not (broken / "rows" / "bilevel.json").exists() and not (broken / "DONE").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "bilevel", "run", "--resume", "--out", str(broken)],
        env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"bilevel: resuming from step {killed_at}/40" in resumed.stdout + resumed.stderr
    assert reference.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()

    a = load_file(str(whole / "students" / "bilevel" / "model.safetensors"))
    b = load_file(str(broken / "students" / "bilevel" / "model.safetensors"))
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ after resume, e.g. {differing[:3]}"
    assert _history(whole) == _history(broken)  # a log window split by the kill is restored too
    assert (broken / "DONE").exists()


def test_resume_needs_a_run_and_takes_no_other_flags(tmp_path: Path, capsys) -> None:
    from bilevel.cli import main

    assert main(["run", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["run", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert main(["run", "--resume", "--out", str(tmp_path / "run"), "--steps", "5", "--set", "training.seed=1"]) == 2
    err = capsys.readouterr().err
    assert "drop --steps, --set" in err and err.count("\n") == 1
    assert (tmp_path / "run" / "config.json").read_text() == "{}"


def test_resume_keeps_finished_arms_and_redoes_only_the_unfinished(tmp_path: Path, capsys) -> None:
    """kd finished, two-stage lost (killed during its evaluation, say): resume trains two-stage again from the
    saved kd student, reaching the same weights, and reuses kd's row without retraining it."""
    from bilevel.cli import main

    out = tmp_path / "o"
    args = ["run", "--arms", "kd,two-stage", "--steps", "4", "--out", str(out), *ARGS[4:]]
    assert main(args) == 0
    first = load_file(str(out / "students" / "two-stage" / "model.safetensors"))
    kd_row = json.loads((out / "rows" / "kd.json").read_text())
    for lost in ("DONE", "metrics.json", "rows/two-stage.json", "students/two-stage", "checkpoints/two-stage"):
        path = out / lost
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kd: finished before the interruption; kept" in printed and "kd: resuming" not in printed
    again = load_file(str(out / "students" / "two-stage" / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["kd", "two-stage"] and rows[0] == kd_row["row"]
    assert main(["run", "--resume", "--out", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out


def test_cpu_time_is_counted_and_carried_over_a_resume() -> None:
    """Each arm records this process's CPU seconds (not inflated by other jobs on a shared machine), continued from
    a checkpointed state like the wall time; rows written before it existed read 0."""
    from bilevel.optim.training import TrainCost, TrainState, run_solver

    class Busy:  # a solver whose step does real CPU work
        def step(self, problem, step):
            a = torch.randn(256, 256)
            for _ in range(20):
                a = torch.tanh(a @ a)
            return {"lower_loss": float(a.mean())}

    state = TrainState.from_json(TrainState(step=0, cpu_seconds=5.0, seconds=1.0).to_json())
    run_solver(None, Busy(), 3, description="busy", state=state)
    assert state.step == 3 and state.cpu_seconds > 5.0 and state.seconds > 1.0
    assert TrainState.from_json(state.to_json()).cpu_seconds == state.cpu_seconds
    assert TrainCost.from_row({"train_seconds": 2.0}) == TrainCost(2.0, 0.0)
    total = TrainCost(2.0, 1.5) + TrainCost.of(state)
    assert total.row() == {"train_seconds": 2.0 + state.seconds, "train_cpu_seconds": 1.5 + state.cpu_seconds}
