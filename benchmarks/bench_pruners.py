"""Params, MACs, measured latency and sampling throughput of every pruner at its default setting, side by side, as
ratios to the teacher.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pruners.py                 # tiny UNet (shipped teacher)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pruners.py --sd-v1         # + SD-v1 architecture (slow on CPU)

MACs include attention (torch FlopCounterMode). The goal is a latency ratio within 10% of the MAC ratio; `lat/MAC - 1` reports latency_ratio / macs_ratio - 1.
Sampling throughput (images/s) is a full 25-step guided (guidance 2, so two UNet passes per step) DDIM sampling:
through the diffusers pipeline on the tiny world (text encoder and scheduler included), through the UNet and
the scheduler only on SD-v1 (random weights: no VAE or text encoder; the UNet is nearly all of the cost).
The SD-v1 UNet has random weights (architecture only); its Diff-Pruning calibration is random latents and text.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bilevel.compression.model_stats import count_macs_with_attention, count_params, measure_latency_ms
from bilevel.core.interfaces import CalibrationBatch
from bilevel.registry import get_registry

SD_V1 = {
    "sample_size": 64,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
}
#: (label, pruner, options): each pruner at its default, the channel engine's two speed options (hardware-friendly
#: channel counts, whole attention heads), and BK-SDM's other two variants for reference.
SETTINGS: list[tuple[str, str, dict[str, Any]]] = [
    ("magnitude", "magnitude", {}),
    ("magnitude round_to=8", "magnitude", {"round_to": 8}),
    ("magnitude prune_heads", "magnitude", {"prune_heads": True}),
    ("magnitude round_to=8 prune_heads", "magnitude", {"round_to": 8, "prune_heads": True}),
    ("diff-pruning", "diff-pruning", {}),
    ("bk-sdm (small)", "bk-sdm", {}),
    ("bk-sdm base", "bk-sdm", {"variant": "base"}),
    ("bk-sdm tiny", "bk-sdm", {"variant": "tiny"}),
]


def tiny_sampler(pipe, images: int) -> Callable[[nn.Module], None]:
    """Full pipeline sampling of `images` prompts with the given UNet in place of the teacher's."""
    prompts = [f"a {c} circle" for c in ("red", "green", "blue", "yellow")] * (images // 4 + 1)

    def sample(unet: nn.Module) -> None:
        teacher = pipe.unet
        pipe.unet = unet
        try:
            pipe(prompts[:images], num_inference_steps=25, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
        finally:
            pipe.unet = teacher

    return sample


def sd_sampler(calib: CalibrationBatch, images: int) -> Callable[[nn.Module], None]:
    """UNet + DDIM sampling of `images` latents at 64x64 (SD-v1's 512 px), guidance 2."""
    from bilevel.diffusion.sampling import sample_images

    scheduler = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "_class_name": "DDIMScheduler"}  # fmt: skip
    cond = calib.cond[:1].expand(images, -1, -1).contiguous()

    def sample(unet: nn.Module) -> None:
        sample_images(unet, scheduler, cond, calib.cond[:1] * 0, steps=25, guidance=2.0,
                      generator=torch.Generator().manual_seed(0), channels=4, size=64, batch_size=images)  # fmt: skip

    return sample


def throughput(sample: Callable[[nn.Module], None], unet: nn.Module, images: int, repeats: int) -> float:
    """Images per second of `sample` (best of `repeats`, after one warm-up)."""
    with torch.no_grad():
        sample(unet)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            sample(unet)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return images / best


def tiny_world(device: str) -> tuple[nn.Module, CalibrationBatch, str]:
    """The shipped teacher with the run's calibration batch (its clean fine-tuning data)."""
    from bilevel.core.config import build_config
    from bilevel.core.world import calibration_batch
    from bilevel.worlds.resolve import build_world

    world = build_world(build_config({"model": {"device": device}, "data": {"finetune_size": 64, "concept_size": 8}}))
    world.teacher.eval().requires_grad_(False)
    tiny_world.pipe = world.pipe  # the sampler needs the whole pipeline
    return world.teacher, calibration_batch(world), "tiny (shipped teacher)"


def sd_v1_world(device: str) -> tuple[nn.Module, CalibrationBatch, str]:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD_V1).to(device).eval().requires_grad_(False)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    g = torch.Generator(device="cpu").manual_seed(0)
    calib = CalibrationBatch(
        x0=torch.randn(1, 4, 64, 64, generator=g).to(device),
        cond=torch.randn(1, 77, 768, generator=g).to(device),
        alphas_cumprod=sched.alphas_cumprod.float().to(device),
    )
    return unet, calib, "SD-v1 architecture (random weights)"


def bench(world: str, args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    """Prune every setting, then measure all models in interleaved rounds (a rotated order each round): each
    ratio is the median over rounds of the student's time / the teacher's time in the same round, so a machine
    whose load changes during the run slows teacher and students alike."""
    teacher, calib, label = (sd_v1_world if world == "sd-v1" else tiny_world)(args.device)
    batch = args.sd_batch if world == "sd-v1" else args.batch
    repeats = args.sd_repeats if world == "sd-v1" else args.repeats
    images = args.sd_images if world == "sd-v1" else args.images
    sample = None
    if images > 0:
        sample = sd_sampler(calib, images) if world == "sd-v1" else tiny_sampler(tiny_world.pipe, images)
    models: dict[str, nn.Module] = {"teacher": teacher}
    rows = [{"model": "teacher", "params": count_params(teacher), "macs": count_macs_with_attention(teacher), "prune_s": 0.0}]
    for name, pruner, options in SETTINGS:
        if args.only and name not in args.only:
            continue
        opts = dict(options)
        if pruner == "diff-pruning" and world == "sd-v1":
            opts["timestep_stride"] = args.sd_stride
        t0 = time.perf_counter()
        result = get_registry().create("pruner", pruner, opts).prune(teacher, calib)
        models[name] = result.student.to(args.device).eval().requires_grad_(False)
        rows.append({"model": name, "params": count_params(models[name]), "macs": count_macs_with_attention(models[name]),
                     "prune_s": time.perf_counter() - t0})  # fmt: skip
        del result
        gc.collect()
    names = list(models)
    latency: dict[str, list[float]] = {n: [] for n in names}
    speed: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        got = {n: measure_latency_ms(models[n], batch, repeats) for n in order}
        per_s = {n: throughput(sample, models[n], images, 1) for n in order} if sample is not None else {}
        for n in names:
            latency[n].append(got[n])
            if per_s:
                speed[n].append(per_s[n])
    for row in rows:
        n = row["model"]
        row["latency_ms"] = statistics.median(latency[n])
        row["latency_ms_ratio"] = statistics.median(a / b for a, b in zip(latency[n], latency["teacher"]))
        row["images_per_s"] = statistics.median(speed[n]) if speed[n] else float("nan")
        row["images_per_s_ratio"] = (
            statistics.median(a / b for a, b in zip(speed[n], speed["teacher"])) if speed[n] else float("nan")
        )
        for key in ("params", "macs"):
            row[f"{key}_ratio"] = row[key] / rows[0][key]
        row["latency_vs_macs"] = row["latency_ms_ratio"] / row["macs_ratio"] - 1

    title = (f"{label} on {args.device}, {torch.get_num_threads()} thread(s), latency batch {batch} (median of "
             f"{repeats}), {args.rounds} interleaved rounds")  # fmt: skip
    table = Table(title=title + (f", sampling {images} images x 25 guided steps" if images else ""))
    for col in (
        "model",
        "params",
        "params ratio",
        "GMACs",
        "MACs ratio",
        "latency ms",
        "latency ratio",
        "lat/MAC - 1",
        "images/s",
        "speed-up",
        "prune s",
    ):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(
            r["model"], f"{r['params']:,}", f"{r['params_ratio']:.3f}", f"{r['macs'] / 1e9:.3f}", f"{r['macs_ratio']:.3f}",
            f"{r['latency_ms']:.1f}", f"{r['latency_ms_ratio']:.3f}", f"{r['latency_vs_macs']:+.1%}",
            f"{r['images_per_s']:.2f}", f"{r['images_per_s_ratio']:.2f}x", f"{r['prune_s']:.1f}",
        )  # fmt: skip
    console.print(table)
    del teacher
    gc.collect()
    return [{"world": world, "device": args.device, "batch": batch, **r} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd-v1", action="store_true", help="also benchmark the SD-v1 UNet architecture (slow on CPU)")
    parser.add_argument("--sd-v1-only", action="store_true", help="benchmark the SD-v1 architecture only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64, help="latency batch on the tiny UNet")
    parser.add_argument("--repeats", type=int, default=5, help="latency repeats per model and round (median)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ratios: median over rounds)")
    parser.add_argument("--sd-batch", type=int, default=1, help="latency batch on SD-v1")
    parser.add_argument("--sd-repeats", type=int, default=3)
    parser.add_argument(
        "--sd-stride", type=int, default=100, help="Diff-Pruning timestep stride on SD-v1 (10 on the tiny UNet)"
    )
    parser.add_argument("--images", type=int, default=32, help="images per sampling run on the tiny world (0: skip)")
    parser.add_argument("--sd-images", type=int, default=1, help="images per sampling run on SD-v1 (0: skip)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--only", type=lambda v: [s.strip() for s in v.split(",")], default=None,
        help="comma-separated setting labels to measure beside the teacher (e.g. 'magnitude,bk-sdm (small)'); "
        "SD-v1 students are 1-3 GB each on CPU",
    )  # fmt: skip
    args = parser.parse_args()
    unknown = set(args.only or ()) - {label for label, _, _ in SETTINGS}
    if unknown:
        parser.error(f"unknown setting(s) {sorted(unknown)}; known: {[label for label, _, _ in SETTINGS]}")

    console = Console(width=150)
    worlds = ["sd-v1"] if args.sd_v1_only else ["tiny"] + (["sd-v1"] if args.sd_v1 else [])
    rows = [row for world in worlds for row in bench(world, args, console)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
