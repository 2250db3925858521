"""Thread settings on a shared machine: the same tiny-world KD steps under 1 thread, 2 threads (OpenMP's default
active wait) and 2 threads with OMP_WAIT_POLICY=PASSIVE, each in its own process, interleaved over rounds, while
a competing process keeps one core busy (`--load`, on by default: the situation of a loaded 2-core machine).

On an idle machine 2 threads help a little; when another process holds a core, OpenMP's spinning threads fight it
and the same steps have run up to 15x slower. The ratios below (median over rounds, each setting vs 1 thread in the
same round) are what the CLI's thread defaults rest on.

    .venv/bin/python benchmarks/bench_threads.py [--rounds 3] [--steps 20] [--no-load]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "2 threads (active wait)": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "2 threads (passive wait)": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
}
WORKER = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
from bilevel.core.config import RunConfig
from bilevel.optim.baselines import LowerOnly
from bilevel.optim.problem import build_problem
from bilevel.worlds.resolve import build_world
from bilevel.registry import get_registry

config = RunConfig.model_validate({{"data": {{"finetune_size": 512}}}})
world = build_world(config)
pruned = get_registry().create("pruner", "bk-sdm").prune(world.teacher, None)
student = pruned.student.train().requires_grad_(True)
problem = build_problem(student, world, config, config.training.weights, pruned.feature_pairs, None)
solver = LowerOnly()
for i in range(3):
    solver.step(problem, i)
t0 = time.perf_counter()
for i in range({steps}):
    solver.step(problem, i)
print(json.dumps({{"seconds_per_step": (time.perf_counter() - t0) / {steps}, "threads": torch.get_num_threads()}}))
"""


def burn(stop: multiprocessing.synchronize.Event) -> None:
    """Keep one core busy (a competing job)."""
    x = 0
    while not stop.is_set():
        x = (x * 31 + 7) % 1_000_003


def measure(name: str, steps: int) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **SETTINGS[name]}
    done = subprocess.run(
        [sys.executable, "-c", WORKER.format(root=str(ROOT), steps=steps)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"{name}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-load", action="store_true", help="measure on an otherwise idle machine")
    args = parser.parse_args()
    stop = multiprocessing.Event()
    loader = None if args.no_load else multiprocessing.Process(target=burn, args=(stop,), daemon=True)
    if loader is not None:
        loader.start()
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    ratios: dict[str, list[float]] = {name: [] for name in SETTINGS}
    try:
        for r in range(args.rounds):
            order = list(SETTINGS)[r % len(SETTINGS) :] + list(SETTINGS)[: r % len(SETTINGS)]
            round_times = {name: measure(name, args.steps) for name in order}
            for name, t in round_times.items():
                times[name].append(t)
                ratios[name].append(t / round_times["1 thread"])
    finally:
        stop.set()
    busy = os.getloadavg()[0]
    load = (
        "with one core kept busy by a competing process" if loader is not None else "with no competing process added"
    ) + f" (1-min load average at the end: {busy:.1f} on {os.cpu_count()} cores)"
    print(f"tiny-world KD step (BK-SDM student, batch 32), {args.rounds} rounds x {args.steps} steps, {load}:")
    print(f"{'setting':<28} {'s/step (median)':>16} {'vs 1 thread':>12}")
    for name in SETTINGS:
        print(f"{name:<28} {statistics.median(times[name]):>16.3f} {statistics.median(ratios[name]):>11.2f}x")
    time.sleep(0.1)


if __name__ == "__main__":
    main()
