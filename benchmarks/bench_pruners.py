"""Params, MACs, measured latency and sampling throughput of every pruner at its default setting, side by side, as
ratios to the teacher.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pruners.py                 # tiny UNet (shipped teacher)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pruners.py --sd-v1         # + SD-v1 architecture (slow on CPU)

The goal is a latency ratio within 10% of the MAC ratio; `lat/MAC - 1` reports latency_ratio / macs_ratio - 1.
Sampling throughput (images/s) is a full 25-step guided (guidance 2, so two UNet passes per step) DDIM sampling:
through the diffusers pipeline on the tiny world (text encoder and scheduler included), through the UNet and
the scheduler only on SD-v1 (random weights: no VAE or text encoder; the UNet is nearly all of the cost).
The SD-v1 UNet has random weights (architecture only); its Diff-Pruning calibration is random latents and text.
"""

from __future__ import annotations

import argparse
import gc
import json
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

from bilevel.compression.model_stats import count_macs, count_params, measure_latency_ms
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


def stats(unet: nn.Module, batch: int, repeats: int, sample: Callable[[nn.Module], None] | None, images: int) -> dict[str, float]:
    unet.eval()
    return {
        "params": count_params(unet),
        "macs": count_macs(unet),
        "latency_ms": measure_latency_ms(unet, batch, repeats),
        "images_per_s": throughput(sample, unet, images, max(1, repeats // 3)) if sample is not None else float("nan"),
    }


def bench(world: str, args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    teacher, calib, label = (sd_v1_world if world == "sd-v1" else tiny_world)(args.device)
    batch = args.sd_batch if world == "sd-v1" else args.batch
    repeats = args.sd_repeats if world == "sd-v1" else args.repeats
    images = args.sd_images if world == "sd-v1" else args.images
    sample = None
    if images > 0:
        sample = sd_sampler(calib, images) if world == "sd-v1" else tiny_sampler(tiny_world.pipe, images)
    base = stats(teacher, batch, repeats, sample, images)
    rows = [{"model": "teacher", **base, "prune_s": 0.0}]
    for name, pruner, options in SETTINGS:
        opts = dict(options)
        if pruner == "diff-pruning" and world == "sd-v1":
            opts["timestep_stride"] = args.sd_stride
        t0 = time.perf_counter()
        result = get_registry().create("pruner", pruner, opts).prune(teacher, calib)
        prune_s = time.perf_counter() - t0
        student = result.student.to(args.device).requires_grad_(False)
        rows.append({"model": name, **stats(student, batch, repeats, sample, images), "prune_s": prune_s})
        del student, result
        gc.collect()
    for row in rows:
        for key in ("params", "macs", "latency_ms", "images_per_s"):
            row[f"{key}_ratio"] = row[key] / base[key]
        row["latency_vs_macs"] = row["latency_ms_ratio"] / row["macs_ratio"] - 1

    title = f"{label} on {args.device}, {torch.get_num_threads()} thread(s), latency batch {batch}"
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
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sd-batch", type=int, default=1, help="latency batch on SD-v1")
    parser.add_argument("--sd-repeats", type=int, default=3)
    parser.add_argument(
        "--sd-stride", type=int, default=100, help="Diff-Pruning timestep stride on SD-v1 (10 on the tiny UNet)"
    )
    parser.add_argument("--images", type=int, default=32, help="images per sampling run on the tiny world (0: skip)")
    parser.add_argument("--sd-images", type=int, default=1, help="images per sampling run on SD-v1 (0: skip)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    console = Console(width=150)
    worlds = ["sd-v1"] if args.sd_v1_only else ["tiny"] + (["sd-v1"] if args.sd_v1 else [])
    rows = [row for world in worlds for row in bench(world, args, console)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
