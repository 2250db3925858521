"""What one try of the channel pruners' MAC-target search costs, on the teacher itself and on a weightless
(meta-device) copy, side by side in one run, for the tiny teacher and the SD-v1 UNet architecture.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mac_search.py [--rounds 2] [--no-sd-v1]

The search prunes up to 33 times (bisection per outer-stage ratio), so the per-try time decides whether a real
Stable Diffusion UNet is searched in minutes or hours. Each try is the search's own work: copy, prune at one ratio,
count MACs. The stand-in chosen by size (`channel_pruning.search_stand_in`) is marked.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def one_try_seconds(teacher, weightless: bool) -> tuple[float, float]:
    """(seconds, MAC share) of one search try at ratio 0.3."""
    from bilevel.compression.channel_pruning import prune_unet_channels, search_stand_in
    from bilevel.compression.model_stats import count_macs

    start = time.perf_counter()
    model, importance = search_stand_in(teacher, weightless=weightless)
    student, _ = prune_unet_channels(model, importance, 0.3)
    share = count_macs(student) / count_macs(model)
    return time.perf_counter() - start, share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="tries per model and stand-in (interleaved; median)")
    parser.add_argument("--no-sd-v1", action="store_true", help="the tiny teacher only (the SD-v1 tries take minutes)")
    args = parser.parse_args()
    import torch
    from diffusers import UNet2DConditionModel
    from rich.console import Console
    from rich.table import Table

    from bilevel.compression.channel_pruning import WEIGHTLESS_SEARCH_PARAMS
    from bilevel.worlds.models import load_tiny_pipeline

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_pruners import SD_V1

    models = {"tiny (shipped teacher)": load_tiny_pipeline("tiny", "cpu").unet.eval().requires_grad_(False)}
    if not args.no_sd_v1:
        torch.manual_seed(0)
        models["SD-v1 architecture"] = UNet2DConditionModel(**SD_V1).eval().requires_grad_(False)
    table = Table(title="one MAC-target search try (ratio 0.3): seconds, median of interleaved rounds")
    for col in ("model", "params", "teacher s", "weightless s", "speed-up", "same share", "search uses"):
        table.add_column(col)
    for label, teacher in models.items():
        times: dict[bool, list[float]] = {False: [], True: []}
        shares: dict[bool, float] = {}
        for _ in range(args.rounds):
            for weightless in (False, True):
                seconds, shares[weightless] = one_try_seconds(teacher, weightless)
                times[weightless].append(seconds)
        params = sum(p.numel() for p in teacher.parameters())
        real, meta = statistics.median(times[False]), statistics.median(times[True])
        table.add_row(
            label, f"{params / 1e6:.1f}M", f"{real:.1f}", f"{meta:.1f}", f"{real / meta:.2f}x",
            str(shares[False] == shares[True]), "weightless" if params > WEIGHTLESS_SEARCH_PARAMS else "teacher",
        )  # fmt: skip
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
