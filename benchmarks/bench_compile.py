"""Does torch.compile pay on the tiny world? Eager vs compiled forward of the shipped teacher, side by side in one
run, with the compile time that has to be earned back.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_compile.py [--batch 32] [--repeats 10]

This is the measurement behind the missing `--compile` option (docs/performance.md): on CPU the first compiled
call costs minutes, against a default run whose trained arms take 2-3 minutes each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    from bilevel.worlds.models import load_tiny_pipeline

    pipe = load_tiny_pipeline("tiny", "cpu")
    unet = pipe.unet.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (args.batch,), generator=gen)
    cond = pipe.encode_prompts(["a red circle"] * args.batch)

    def best_ms(model) -> float:
        model(x, t, encoder_hidden_states=cond)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(x, t, encoder_hidden_states=cond)
            times.append(time.perf_counter() - t0)
        return 1000 * min(times)

    compiled = torch.compile(unet)
    t0 = time.perf_counter()
    compiled(x, t, encoder_hidden_states=cond)
    compile_s = time.perf_counter() - t0
    eager, fast = best_ms(unet), best_ms(compiled)
    print(f"tiny teacher forward, batch {args.batch}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(f"eager {eager:.1f} ms, compiled {fast:.1f} ms: speed-up {eager / fast:.2f}x; first compiled call {compile_s:.0f} s")
    print(f"break-even after {compile_s / max(1e-9, (eager - fast) / 1000):.0f} forward passes")


if __name__ == "__main__":
    main()
