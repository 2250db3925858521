"""Cost per outer step as the model widens and as more concepts are erased at once, for plain KD, alternating and
implicit-gradient bilevel: the growth curves of docs/performance.md, from one command.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_growth.py [--widths 1 2 4] [--concepts 1 2 4 8]
        [--steps 8] [--json runs/growth.json] [--plot docs/img/growth.png]

Widths scale every channel count of the tiny UNet (32, 64, 64, 64) by the factor (random weights for factors
above 1, the shipped teacher at 1), at 8x8 pixels, one concept. Concepts: the shipped teacher erasing the first
N concepts at once (colours, then the stripes style as the 8th, so one colour is left to fine-tune on). Each configuration is the default `bilevel run` bilevel arm (BK-SDM Small student, KD lower
level at batch 32, ESD upper level at batch 16) built by the runner's own build_problem, in its own worker
process (its peak memory is its own). Time is process CPU time per outer step (insensitive to other processes on
a shared machine), averaged over whole upper cycles after one warm-up cycle; memory is the peak RSS growth over
the steps plus the model's parameters and gradients (allocations >= 64 KiB are mmapped, so RSS follows tensors).
The ESD pool is 32 trajectories and the data sets 512 clean / 64 concept images here (their sizes do not change
the step, only the set-up).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = {"KD": None, "alternating": "alternating", "implicit": "implicit-gradient"}
#: the concepts erased at once, in order: with 8 the fine-tuning data keeps one colour (blue, unstriped shapes)
CONCEPTS = ["purple", "pink", "orange", "yellow", "red", "green", "cyan", "striped"]


def measure(width: int, concepts: int, method: str, steps: int) -> dict[str, Any]:
    """Build one configuration and time its steps (runs inside the worker process)."""
    import copy

    import torch
    from diffusers import UNet2DConditionModel

    from bilevel.core.config import build_config
    from bilevel.core.world import calibration_batch
    from bilevel.optim.problem import build_problem
    from bilevel.optim.steps import lower_step
    from bilevel.registry import get_registry
    from bilevel.worlds.models import load_tiny_pipeline
    from bilevel.worlds.tiny.architecture import CHANNELS, tiny_unet_config
    from bilevel.worlds.tiny.world import TinyWorld

    torch.set_num_threads(1)
    config = build_config({
        "concepts": CONCEPTS[:concepts], "unlearner": {"options": {"pool_size": 32}},
        "data": {"finetune_size": 512, "concept_size": 64},  # the step draws batches; the set size costs set-up only
    })  # fmt: skip
    torch.manual_seed(0)
    pipe = load_tiny_pipeline("tiny", "cpu")
    if width != 1:
        pipe.unet = UNet2DConditionModel(**tiny_unet_config(tuple(c * width for c in CHANNELS))).eval()
    pipe.unet.requires_grad_(False)
    d = config.data
    world = TinyWorld.build(pipe, config.concepts, d.finetune_size, d.concept_size, d.seed, "cpu")
    reg = get_registry()
    pruned = reg.create("pruner", "bk-sdm", {}).prune(world.teacher, calibration_batch(world))
    student = copy.deepcopy(pruned.student).train().requires_grad_(True)
    solver = reg.create("solver", METHODS[method], {}) if METHODS[method] else None
    unlearner = reg.create("unlearner", "esd", config.unlearner.options)
    problem = build_problem(student, world, config, config.training.weights, pruned.feature_pairs, unlearner,
                            solver.coupling if solver else "shared", None)  # fmt: skip
    if solver is not None:
        solver.setup(problem)
    step_fn = (lambda s: solver.step(problem, s)) if solver else (lambda s: lower_step(problem))
    cycle = int(getattr(getattr(solver, "config", None), "upper_every", 1) or 1)
    window = cycle * math.ceil(steps / cycle)
    for s in range(cycle):  # warm-up: the optimisers allocate their state
        step_fn(s)
    base = _rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    for s in range(cycle, cycle + window):
        step_fn(s)
    cpu, wall = (time.process_time() - c0) / window, (time.perf_counter() - t0) / window
    params = sum(p.numel() for p in student.parameters())
    return {
        "width": width, "concepts": concepts, "method": method, "steps": window,
        "cpu_s_per_step": cpu, "wall_s_per_step": wall, "student_params": params,
        "teacher_params": sum(p.numel() for p in world.teacher.parameters()),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base + 2 * params * 4 / 2**20,
    }  # fmt: skip


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_worker(width: int, concepts: int, method: str, steps: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, __file__, "--worker", f"{width},{concepts},{method},{steps}"]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    if done.returncode != 0:
        return {"width": width, "concepts": concepts, "method": method, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method in METHODS:
        w = sorted((r for r in rows if r.get("method") == method and r["concepts"] == 1 and "error" not in r),
                   key=lambda r: r["width"])  # fmt: skip
        c = sorted((r for r in rows if r.get("method") == method and r["width"] == 1 and "error" not in r),
                   key=lambda r: r["concepts"])  # fmt: skip
        axes[0].plot([r["teacher_params"] / 1e6 for r in w], [r["cpu_s_per_step"] for r in w], "o-", label=method)
        axes[1].plot([r["teacher_params"] / 1e6 for r in w], [r["peak_mb"] for r in w], "o-", label=method)
        axes[2].plot([r["concepts"] for r in c], [r["cpu_s_per_step"] for r in c], "o-", label=method)
    for ax, (x, y) in zip(axes, [("teacher parameters (M)", "CPU s / outer step"),
                                 ("teacher parameters (M)", "peak memory (MB)"),
                                 ("concepts erased at once", "CPU s / outer step")]):  # fmt: skip
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
    axes[0].legend()
    fig.suptitle("cost per outer step, tiny-world default bilevel arm, 1 CPU thread")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--concepts", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=8, help="timed outer steps (rounded up to whole upper cycles)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--from-json", type=Path, nargs="*", default=[],
                        help="rows measured before (their configurations are not measured again)")  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        width, concepts, method, steps = args.worker.split(",")
        print(json.dumps(measure(int(width), int(concepts), method, int(steps))))
        return
    plan = [(w, 1) for w in args.widths] + [(1, n) for n in args.concepts if n != 1 or 1 not in args.widths]
    rows = [r for path in args.from_json for r in json.loads(path.read_text()) if "error" not in r]
    have = {(r["width"], r["concepts"], r["method"]) for r in rows}
    for width, concepts in plan:
        for method in METHODS:
            if (width, concepts, method) in have:
                continue
            row = run_worker(width, concepts, method, args.steps)
            rows.append(row)
            shown = row.get("error") or (
                f"{row['cpu_s_per_step']:.3f} CPU s/step, peak {row['peak_mb']:.0f} MB, "
                f"teacher {row['teacher_params'] / 1e6:.2f}M params"
            )
            print(f"width x{width}, {concepts} concept(s), {method}: {shown}", file=sys.stderr, flush=True)
    print("| width | teacher params | concepts | method | CPU s / step | x KD | peak MB |")
    print("|---|---|---|---|---|---|---|")
    rows.sort(key=lambda r: (r["width"], r["concepts"], list(METHODS).index(r["method"])))
    for r in rows:
        if "error" in r:
            print(f"| x{r['width']} | - | {r['concepts']} | {r['method']} | failed: {r['error']} | | |")
            continue
        kd = next(k for k in rows if k["width"] == r["width"] and k["concepts"] == r["concepts"] and k["method"] == "KD")
        print(f"| x{r['width']} | {r['teacher_params'] / 1e6:.2f}M | {r['concepts']} | {r['method']} | "
              f"{r['cpu_s_per_step']:.3f} | {r['cpu_s_per_step'] / kd['cpu_s_per_step']:.2f} | {r['peak_mb']:.0f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
