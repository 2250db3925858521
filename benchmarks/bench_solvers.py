"""Cost per outer step of each bilevel solver relative to plain KD fine-tuning, on the tiny 8x8 UNet (CPU).

Each configuration runs in its own subprocess so peak memory (ru_maxrss, which never decreases) is its own.
Peak memory = peak RSS during the steps minus RSS after setup (model, teacher, optimisers; Adam state is
allocated during the steps and so counted). Time = mean wall time per outer step after WARMUP untimed steps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_solvers.py [--steps 8] [--batch 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 2  # untimed steps: the first lower and the first upper optimiser step allocate state
sys.path.insert(0, str(ROOT))

CONFIGS: dict[str, tuple[str, dict[str, Any], str]] = {
    # label: (solver, options, coupling of the problem)
    "plain KD (1 lower step)": ("plain", {}, "shared"),
    "alternating (k=2)": ("alternating", {}, "shared"),
    "alternating (k=1)": ("alternating", {"upper_every": 1}, "shared"),
    "unrolled K=1": ("unrolled", {"inner_steps": 1}, "proximal"),
    "unrolled K=2": ("unrolled", {"inner_steps": 2}, "proximal"),
    "unrolled K=4": ("unrolled", {"inner_steps": 4}, "proximal"),
    "unrolled K=4 trunc 1": ("unrolled", {"inner_steps": 4, "truncate": 1}, "proximal"),
    "implicit cg5 autograd": ("implicit-gradient", {"iters": 5, "hvp": "autograd"}, "proximal"),
    "implicit cg5 autograd (flash attn)": (
        "implicit-gradient",
        {"iters": 5, "hvp": "autograd", "math_attention": False},
        "proximal",
    ),
    "implicit cg5 fd central": ("implicit-gradient", {"iters": 5, "hvp": "finite-difference"}, "proximal"),
    "implicit cg5 fd forward": (
        "implicit-gradient",
        {"iters": 5, "hvp": "finite-difference", "fd_scheme": "forward"},
        "proximal",
    ),
    "implicit cg5 fd fwd, every 4": (
        "implicit-gradient",
        {"iters": 5, "hvp": "finite-difference", "fd_scheme": "forward", "upper_every": 4},
        "proximal",
    ),
    "bome (shared)": ("bome", {}, "shared"),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def build_problem(coupling: str, batch: int):
    """Student = copy of a random tiny UNet, KD lower level against the frozen original, ESD-like upper level."""
    from bilevel.core.config import LossWeights
    from bilevel.core.interfaces import BilevelProblem, Objective
    from bilevel.core.lower_level import DrawCounter, make_lower_objective
    from bilevel.core.tinyworld.architecture import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    teacher = pipe.unet.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    prompts = ["a red square", "a blue circle", "a green triangle", "a yellow square"]
    with torch.no_grad():
        cond_all = pipe.encode_prompts(prompts * 16)
        uncond = pipe.encode_prompts([""])[0]
        concept = pipe.encode_prompts(["a purple circle"])[0]
    images = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    acp = pipe.scheduler.alphas_cumprod
    lower = make_lower_objective(
        student, teacher, images, cond_all, uncond, acp, LossWeights(task=1.0, output=2.0, feature=0.0), [], batch,
        DrawCounter(0, salt=1),
    )  # fmt: skip
    counter = DrawCounter(0, salt=2)

    def draw_upper():
        gen = counter.next()
        xt = torch.randn(batch, 3, 8, 8, generator=gen)
        t = torch.randint(len(acp), (batch,), generator=gen)
        c = concept.expand(batch, -1, -1)
        with torch.no_grad():  # ESD target: negatively guided frozen teacher, paid once per batch
            e_c = teacher(xt, t, encoder_hidden_states=c).sample
            e_u = teacher(xt, t, encoder_hidden_states=uncond.expand(batch, -1, -1)).sample
        return xt, t, c, e_u - (e_c - e_u)

    def upper_loss(b):
        xt, t, c, target = b
        return torch.nn.functional.mse_loss(student(xt, t, encoder_hidden_states=c).sample, target)

    params = dict(student.named_parameters())
    lower_opt = torch.optim.AdamW(params.values(), lr=3e-4, weight_decay=0.0)
    upper_opt = torch.optim.AdamW(params.values(), lr=1.5e-3, weight_decay=0.0)
    return BilevelProblem(
        model=student, lower=lower, upper=Objective(draw=draw_upper, loss=upper_loss), lower_params=params,
        upper_params=params, lower_optimizer=lower_opt, upper_optimizer=upper_opt, coupling=coupling,
    )  # fmt: skip


def run_one(label: str, steps: int, batch: int) -> dict[str, Any]:
    from bilevel.core.errors import BilevelError
    from bilevel.core.steps import lower_step
    from bilevel.registry import get_registry

    torch.set_num_threads(1)
    torch.manual_seed(0)
    name, options, coupling = CONFIGS[label]
    problem = build_problem(coupling, batch)
    if name == "plain":
        step_fn = lambda s: {"lower_loss": lower_step(problem)}
    else:
        solver = get_registry().create(
            "solver", name, {**options, **({"coupling": coupling} if name != "alternating" else {})}
        )
        solver.setup(problem)
        step_fn = lambda s: solver.step(problem, s)
    base = rss_mb()
    times = []
    try:
        for s in range(steps + WARMUP):
            t0 = time.perf_counter()
            metrics = step_fn(s)
            times.append(time.perf_counter() - t0)
    except (RuntimeError, BilevelError) as exc:  # reported, not hidden: e.g. flash attention without double backward
        return {"label": label, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    measured = times[WARMUP:]  # the first steps pay one-off allocations (optimiser state); the mean covers both
    return {
        "label": label,
        "ms": 1000 * sum(measured) / len(measured),
        "peak_mb": peak,
        "metrics": metrics,
    }  # step kinds of k=2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--steps",
        type=int,
        default=8,
        help="timed outer steps per configuration (mean reported; even, so k=2 schedules are balanced)",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="labels to run (default: all)")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.batch)))
        return
    results = []
    for label in args.only or CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, "--one", label, "--steps", str(args.steps), "--batch", str(args.batch)],
            capture_output=True, text=True, cwd=ROOT, check=False,
        )  # fmt: skip
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        results.append(
            json.loads(line[7:]) if line else {"label": label, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
        )
        print(f"  done: {label}", file=sys.stderr, flush=True)
    plain = next(r for r in results if r["label"].startswith("plain"))
    print(
        f"\ntiny UNet (8x8, 1 CPU thread, float32), batch {args.batch}, mean of {args.steps} outer steps after {WARMUP} warm-up"
    )
    print(f"{'configuration':38s} {'ms/step':>9s} {'x plain':>8s} {'peak MB':>8s} {'x plain':>8s}")
    for r in results:
        if "error" in r:
            print(f"{r['label']:38s} FAILED: {r['error']}")
            continue
        print(
            f"{r['label']:38s} {r['ms']:9.1f} {r['ms'] / plain['ms']:8.2f} {r['peak_mb']:8.1f} "
            f"{r['peak_mb'] / max(plain['peak_mb'], 1e-9):8.2f}"
        )


if __name__ == "__main__":
    main()
