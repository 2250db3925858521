"""AdamW's step on a CPU: the reference per-tensor loop, torch's multi-tensor (foreach) and fused kernels, side by
side in one process, on the tiny teacher and its BK-SDM Small student, and as a share of one KD step.

Every training loop here builds its optimiser through `bilevel.optim.adamw.adamw` (fused on a CPU); this script
is the measurement behind that choice. For each model and variant: process CPU ms per `step()` (median over
rounds, the variants interleaved within each round, random gradients set once), the ratio to the reference, and
one full KD step of the student (the `kd` arm's lower step, as `bilevel run` builds it) with the reference and
with the fused optimiser, so the saving is stated as a share of the work it sits in.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_optimizer.py [--rounds 5] [--steps 50] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = {"reference": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def optimiser_ms(model: torch.nn.Module, rounds: int, steps: int) -> dict[str, float]:
    """Median CPU ms per AdamW step for each variant, interleaved round by round on copies of `model`."""
    opts = {}
    for name, kw in VARIANTS.items():
        params = list(copy.deepcopy(model).parameters())
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opts[name] = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, **kw)
        for _ in range(3):  # state allocated before timing
            opts[name].step()
    times: dict[str, list[float]] = {n: [] for n in VARIANTS}
    for r in range(rounds):
        order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
        for name in order:
            t0 = time.process_time()
            for _ in range(steps):
                opts[name].step()
            times[name].append((time.process_time() - t0) / steps * 1000)
    return {n: statistics.median(v) for n, v in times.items()}


def kd_step_ms(config: Any, world: Any, pruned: Any, rounds: int, steps: int) -> dict[str, float]:
    """Median CPU ms per KD lower step of the BK-SDM student, with the reference and with the fused AdamW."""
    from bilevel.optim.problem import build_problem
    from bilevel.optim.steps import lower_step

    problems = {}
    for name in ("reference", "fused"):
        student = copy.deepcopy(pruned.student).train().requires_grad_(True)
        problem = build_problem(student, world, config, config.training.weights, pruned.feature_pairs, None,
                                "shared", None)  # fmt: skip
        params = list(problem.lower_params.values())
        problem.lower_optimizer = torch.optim.AdamW(params, lr=config.training.lower_lr, weight_decay=0.0,
                                                    **VARIANTS[name])  # fmt: skip
        problem.lower_scheduler = None  # the warm-up schedule drove the replaced optimiser; constant lr here
        for _ in range(3):
            lower_step(problem)
        problems[name] = problem
    times: dict[str, list[float]] = {n: [] for n in problems}
    for r in range(rounds):
        for name in (list(problems) if r % 2 == 0 else list(reversed(problems))):
            t0 = time.process_time()
            for _ in range(steps):
                lower_step(problems[name])
            times[name].append((time.process_time() - t0) / steps * 1000)
    return {n: statistics.median(v) for n, v in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="optimiser steps per variant per round")
    ap.add_argument("--kd-steps", type=int, default=10, help="KD steps per variant per round")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from bilevel.core.config import build_config
    from bilevel.core.world import calibration_batch
    from bilevel.registry import get_registry
    from bilevel.worlds.resolve import build_world

    config = build_config({"data": {"finetune_size": 512}})
    world = build_world(config)
    pruned = get_registry().create("pruner", "bk-sdm", {}).prune(world.teacher, calibration_batch(world))
    student = pruned.student
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__, "models": {}}
    print(f"AdamW step, CPU ms (median of {args.rounds} interleaved rounds x {args.steps} steps, 1 thread)")
    print(f"{'model':<22}{'tensors':>8}{'params':>10}" + "".join(f"{n:>12}" for n in VARIANTS) + f"{'fused/ref':>11}")
    for label, model in (("tiny teacher", world.teacher), ("bk-sdm small student", student)):
        ms = optimiser_ms(model, args.rounds, args.steps)
        tensors = sum(1 for _ in model.parameters())
        params = sum(p.numel() for p in model.parameters())
        result["models"][label] = {"tensors": tensors, "params": params, "ms": ms}
        print(f"{label:<22}{tensors:>8}{params / 1e6:>9.2f}M" + "".join(f"{ms[n]:>12.2f}" for n in VARIANTS)
              + f"{ms['fused'] / ms['reference']:>11.3f}")  # fmt: skip
    kd = kd_step_ms(config, world, pruned, args.rounds, args.kd_steps)
    result["kd_step_ms"] = kd
    print(f"KD lower step of the student, CPU ms: reference AdamW {kd['reference']:.1f}, fused {kd['fused']:.1f}: "
          f"fused/reference {kd['fused'] / kd['reference']:.3f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
