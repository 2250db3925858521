"""benchmarks/bench_tax.py compares like with like: its bare PyTorch loop computes exactly what bilevel's kd arm
(build_problem + LowerOnly + run_solver) computes, step for step (a correctness test, not a timing test)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_tax.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_tax", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "pruner, options",
    [
        ("bk-sdm", {}),  # the benchmark's (the default run's): block removal, feature pairs of equal shapes
        ("magnitude", {"ratio": 0.25}),  # channel pruning: the teacher's kept channels are compared (no MAC search)
    ],
)
def test_bare_loop_matches_the_kd_arm(pruner, options):
    from bilevel.optim.training import run_solver

    bench = _bench()
    setup = bench.build(batch_size=4, finetune_size=64, pruner=pruner, pruner_options=options)
    if pruner == "magnitude":
        assert setup.notes["channel_pruned_pairs"] > 0
    assert bench.max_weight_diff(setup.fw_student, setup.bare_student) == 0.0  # identical starts
    steps = 3
    history = run_solver(setup.problem, setup.solver, steps, description="kd (test)", log_every=1)
    fw_losses = [h["lower_loss"] for h in history]  # log_every=1: one window per step, its own loss
    bare_losses = [float(setup.bare.step()) for _ in range(steps)]
    assert len(fw_losses) == steps
    # the same batches, forward passes, loss terms, gradients, AdamW and warm-up schedule: in practice bit-identical
    # on one machine; the tolerances leave room for reduction-order differences (autograd.grad vs backward)
    assert bare_losses == pytest.approx(fw_losses, rel=1e-5, abs=1e-7)
    assert len(set(fw_losses)) == steps  # three different batches (the draws advanced)
    for (name, p), q in zip(setup.fw_student.named_parameters(), setup.bare_student.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    assert setup.problem.lower_optimizer.param_groups[0]["lr"] == setup.bare.opt.param_groups[0]["lr"]
    assert bench.max_weight_diff(setup.bare_student, setup.start) > 0  # the students did train
