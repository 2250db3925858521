"""Cost per outer step of each bilevel solver relative to plain KD fine-tuning, measured in one run.

The problem is the default `bilevel run`'s bilevel arm on the tiny world (CPU): the BK-SDM-pruned student, the
KD lower level (task + output + feature KD, batch training.batch_size) and the default ESD upper level (batch
training.upper_batch_size, x_t from the frozen-model pool), built by the runner's own `build_problem`.

Every configuration lives in its own worker process (so its peak memory is its own) and keeps its problem for
the whole run; the driver interleaves them: each round runs every configuration for W outer steps (W = the lcm
of their `upper_every`, so each window holds whole upper cycles), in a rotated order, and the time ratio of a
configuration is the median over rounds of (its mean step time / plain KD's in the same round). A noisy shared
CPU thus slows all arms alike; the process CPU-time ratio is printed beside it as a check that is insensitive to
other processes. Peak memory = peak RSS over all steps minus RSS after the problem was built (Adam state is
allocated during the steps and so counted; allocations >= 64 KiB are mmapped so freed tensors leave the RSS).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_solvers.py [--rounds 5] [--only LABEL ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLAIN = "plain KD (1 lower step)"
# label: (solver, options[, ESD options]); the solver's own default coupling
CONFIGS: dict[str, tuple[Any, ...]] = {
    PLAIN: ("plain", {}),
    "alternating (default)": ("alternating", {}),
    "alternating upper_every=2": ("alternating", {"upper_every": 2}),
    "alternating upper_every=1": ("alternating", {"upper_every": 1}),
    "alternating upper_every=2, ESD targets recomputed": ("alternating", {"upper_every": 2}, {"cache_targets": False}),
    "implicit (default, cg 5)": ("implicit-gradient", {}),
    "implicit cg 5 every step (k=1), hvp batch 8": ("implicit-gradient", {"upper_every": 1}),
    "implicit cg 5 hessian_block=upper": ("implicit-gradient", {"hessian_block": "upper"}),
    "implicit cg 5 plain IFT (k=1, full batch)": ("implicit-gradient", {"upper_every": 1, "hvp_batch_size": None}),
    "implicit cg 5 fd forward, k=1, full batch": (
        "implicit-gradient",
        {"upper_every": 1, "hvp_batch_size": None, "hvp": "finite-difference", "fd_scheme": "forward"},
    ),
    "unrolled K=1": ("unrolled", {"inner_steps": 1}),
    "unrolled K=2": ("unrolled", {"inner_steps": 2}),
    "unrolled K=4": ("unrolled", {"inner_steps": 4}),
    "bome (default)": ("bome", {}),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def make_solver(label: str):
    """The solver of a configuration (None for plain KD) with its validated options."""
    from bilevel.registry import get_registry

    name, options = CONFIGS[label][:2]
    return None if name == "plain" else get_registry().create("solver", name, options)


def build(label: str):
    """(problem, step function) of a configuration, on the default run's tiny-world bilevel arm."""
    from bilevel.core.config import RunConfig
    from bilevel.core.interfaces import CalibrationBatch
    from bilevel.optim.problem import build_problem
    from bilevel.optim.steps import lower_step
    from bilevel.registry import get_registry
    from bilevel.worlds.models import load_tiny_pipeline
    from bilevel.worlds.tiny.world import TinyWorld

    config = RunConfig()
    reg = get_registry()
    pruner = reg.create("pruner", config.pruner.name, config.pruner.options)
    esd_options = CONFIGS[label][2] if len(CONFIGS[label]) > 2 else {}
    unlearner = reg.create("unlearner", config.unlearner.name, {**config.unlearner.options, **esd_options})
    torch.manual_seed(config.training.seed)
    pipe = load_tiny_pipeline(config.model.source, config.model.device)
    world = TinyWorld.build(
        pipe,
        config.concepts,
        config.data.finetune_size,
        config.data.concept_size,
        config.data.seed,
        config.model.device,
    )
    n = min(64, len(world.finetune))
    calib = CalibrationBatch(world.finetune.images[:n], world.bank(world.finetune.prompts[:n]), world.alphas_cumprod)
    pruned = pruner.prune(world.teacher, calib)
    student = copy.deepcopy(pruned.student).train().requires_grad_(True)
    solver = make_solver(label)
    coupling = solver.coupling if solver is not None else "shared"
    problem = build_problem(
        student, world, config, config.training.weights, pruned.feature_pairs, unlearner, coupling, None
    )
    if solver is None:
        return problem, lambda s: {"lower_loss": lower_step(problem)}
    solver.setup(problem)
    return problem, lambda s: solver.step(problem, s)


def worker(label: str) -> None:
    """Build once, then answer 'run N' lines with the N step times; 'stop' ends. Protocol on the real stdout."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # anything the library prints must not corrupt the protocol
    torch.set_num_threads(1)
    _, step_fn = build(label)
    base, step = rss_mb(), 0
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "stop":
            break
        times, cpu, upper = [], [], 0
        for _ in range(int(cmd[1])):
            t0, c0 = time.perf_counter(), time.process_time()
            metrics = step_fn(step)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            upper += "upper_loss" in metrics
            step += 1
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        out.write(json.dumps({"times": times, "cpu": cpu, "upper": upper, "peak_mb": peak}) + "\n")


class Worker:
    def __init__(self, label: str) -> None:
        self.label = label
        # large blocks are mmapped and unmapped when freed, so RSS follows the live tensors (no heap high-water)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", label], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env,
        )  # fmt: skip
        self.error: str | None = None

    def ask(self, request: str | None) -> dict[str, Any] | None:
        if self.error:
            return None
        try:
            if request is not None:
                self.proc.stdin.write(request + "\n")
                self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker exited with code {self.proc.wait()}")
            return json.loads(line)
        except (RuntimeError, OSError, json.JSONDecodeError) as exc:
            self.error = str(exc)
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("stop\n")
                self.proc.stdin.close()
            except OSError:
                pass
            self.proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (medians over them)")
    parser.add_argument("--min-steps", type=int, default=8, help="outer steps per configuration and round (at least)")
    parser.add_argument("--only", nargs="*", help="labels to run besides plain KD (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    torch.set_num_threads(1)
    labels = [PLAIN] + [lb for lb in (args.only or CONFIGS) if lb != PLAIN]
    cycle = math.lcm(*(int(getattr(getattr(make_solver(lb), "config", None), "upper_every", 1)) for lb in labels))
    window = cycle * math.ceil(args.min_steps / cycle)
    print(f"starting {len(labels)} workers; window {window} outer steps", file=sys.stderr, flush=True)
    workers = [Worker(lb) for lb in labels]
    with ThreadPoolExecutor(len(workers)) as pool:  # setups run concurrently (the ESD pool is sampled in each)
        ready = list(pool.map(lambda w: w.ask(None), workers))
    for w, r in zip(workers, ready):
        if r is None:
            print(f"  {w.label}: setup failed ({w.error})", file=sys.stderr)
    for w in workers:  # warm-up: one window each (first optimiser steps allocate their state)
        w.ask(f"run {window}")
    ms: dict[str, list[float]] = {w.label: [] for w in workers}
    ratio: dict[str, list[float]] = {w.label: [] for w in workers}
    cpu_ratio: dict[str, list[float]] = {w.label: [] for w in workers}
    last: dict[str, dict[str, Any]] = {}
    for r in range(args.rounds):
        order = workers[r % len(workers) :] + workers[: r % len(workers)]
        got = {w.label: w.ask(f"run {window}") for w in order}
        base = got[PLAIN]
        for label, res in got.items():
            if res is None or base is None:
                continue
            mean = statistics.fmean(res["times"])
            ms[label].append(1000 * mean)
            ratio[label].append(mean / statistics.fmean(base["times"]))
            cpu_ratio[label].append(statistics.fmean(res["cpu"]) / statistics.fmean(base["cpu"]))
            last[label] = res
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for w in workers:
        w.close()

    plain_peak = last[PLAIN]["peak_mb"] if PLAIN in last else float("nan")
    print(
        f"\ndefault `bilevel run` bilevel arm, tiny world (8x8, 1 CPU thread, float32): lower batch "
        f"{_default('batch_size')}, upper batch {_default('upper_batch_size')}; {args.rounds} interleaved rounds of "
        f"{window} outer steps after one warm-up window; time = median over rounds of the per-round ratio"
    )
    head = (
        f"{'configuration':44s} {'ms/step':>8s} {'wall x KD':>9s} {'(min-max)':>11s} {'cpu x KD':>8s} "
        f"{'peak MB':>8s} {'x KD':>6s} {'upper/step':>10s}"
    )
    print(head)
    print("-" * len(head))
    for w in workers:
        lb = w.label
        if lb not in last:
            print(f"{lb:44s} FAILED: {w.error}")
            continue
        rs = ratio[lb]
        peak = last[lb]["peak_mb"]
        print(
            f"{lb:44s} {statistics.median(ms[lb]):8.1f} {statistics.median(rs):9.2f} "
            f"{f'({min(rs):.2f}-{max(rs):.2f})':>11s} {statistics.median(cpu_ratio[lb]):8.2f} "
            f"{peak:8.1f} {peak / plain_peak:6.2f} "
            f"{last[lb]['upper'] / window:10.2f}"
        )
    unrolled = [(k, lb) for k in (1, 2, 4) if (lb := f"unrolled K={k}") in last]
    if len(unrolled) >= 2:
        ks = [k for k, _ in unrolled]
        t = [statistics.median(ratio[lb]) for _, lb in unrolled]
        m = [last[lb]["peak_mb"] for _, lb in unrolled]
        print(
            f"unrolled, least-squares slope over K={','.join(map(str, ks))}: {_slope(ks, t):.2f} x KD step time and "
            f"{_slope(ks, m):.1f} MB peak memory per additional inner step K"
        )


def _default(field: str) -> int:
    from bilevel.core.config import TrainingConfig

    return int(getattr(TrainingConfig(), field))


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


if __name__ == "__main__":
    main()
