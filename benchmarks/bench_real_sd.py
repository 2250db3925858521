"""Time and size `bilevel run` on a Stable-Diffusion-v1-shaped pipeline with random weights (nothing downloaded).

The UNet, VAE and text encoder have SD v1's shapes (859.5M-parameter UNet, cross_attention_dim 768, 77 tokens);
the tokenizer is a small BPE vocabulary, so only the text encoder's embedding table is smaller than SD's. Each
setting runs `bilevel run --arms kd,bilevel` for a few steps at the given resolution and reports wall time,
seconds per training step and peak GPU memory. Random weights say nothing about image quality: this measures cost.

    python benchmarks/bench_real_sd.py --device cuda --out /tmp/bench-sd --settings no bf16+gc fp16+gc
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def build_sd_v1_shaped(folder: Path, prediction_type: str = "epsilon") -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from sd_fixtures import write_clip_bpe
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    bpe = write_clip_bpe(folder.parent / f".{folder.name}-bpe")
    tokenizer = CLIPTokenizer(str(bpe / "vocab.json"), str(bpe / "merges.txt"), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )  # fmt: skip
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )  # fmt: skip
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(str(folder))  # fmt: skip
    return folder


def caption_folder(folder: Path, n: int, side: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(side, side, 3, generator=gen) * 255).byte().numpy()
        Image.fromarray(arr).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(["a photo of a dog", "a red house", "a tree in a field"][i % 3])
    return folder


def run_setting(model: Path, data: Path, clip: Path, out: Path, setting: str, args) -> dict:
    from bilevel.cli import main

    precision, _, gc = setting.partition("+")
    argv = [
        "run", "--model", str(model), "--out", str(out), "--overwrite", "--device", args.device,
        "--concept", "van gogh style", "--arms", "kd,bilevel", "--steps", str(args.steps),
        "--set", f"data.finetune_data={data}", "--set", f"data.resolution={args.resolution}",
        "--set", f"evaluation.sd.clip_model={clip}", "--set", "evaluation.samples_per_prompt=2",
        "--set", "evaluation.steps=4", "--set", "evaluation.latency_repeats=2", "--set", "data.concept_size=4",
        "--set", f"training.batch_size={args.batch}", "--set", "training.upper_batch_size=2",
        "--set", "unlearner.options.pool_size=4", "--set", "unlearner.options.sample_steps=4",
        "--set", f"model.mixed_precision={precision}", "--set", f"model.gradient_checkpointing={gc == 'gc'}",
        "--set", f"training.log_every={args.steps}",
    ]  # fmt: skip
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    code = main(argv)
    wall = time.perf_counter() - t0
    result = {"setting": setting, "exit": code, "wall_s": round(wall, 1)}
    if args.device.startswith("cuda"):
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if code == 0:
        rows = {r["model"]: r for r in json.loads((out / "metrics.json").read_text())["rows"]}
        for arm, row in rows.items():
            result[f"{arm}_s_per_step"] = round(row["train_seconds"] / args.steps, 3)
            result[f"{arm}_params"] = row["params"]
            result[f"{arm}_clip"] = round(row["clip_score"], 2)
    return result


def train_only(model: Path, data: Path, clip: Path, setting: str, args) -> dict:
    """Lower-level (KD) steps alone: median seconds per step and peak GPU memory of training itself (the whole-run
    peak above also holds evaluation and sampling)."""
    from bilevel.core.config import build_config
    from bilevel.optim.problem import build_problem
    from bilevel.optim.steps import lower_step
    from bilevel.registry import get_registry
    from bilevel.worlds.resolve import build_world

    precision, _, gc = setting.partition("+")
    config = build_config(
        {
            "model": {"source": str(model), "device": args.device, "mixed_precision": precision,
                      "gradient_checkpointing": gc == "gc"},
            "concepts": ["van gogh style"],
            "data": {"finetune_data": str(data), "resolution": args.resolution},
            "evaluation": {"sd": {"clip_model": str(clip)}},
            "training": {"batch_size": args.batch},
        }
    )  # fmt: skip
    world = build_world(config)
    pruned = get_registry().create("pruner", "bk-sdm", {}).prune(world.teacher, None)
    student = pruned.student.train().requires_grad_(True)
    problem = build_problem(student, world, config, config.training.weights, pruned.feature_pairs, None)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        lower_step(problem)
        sync()
        times.append(time.perf_counter() - t0)
    result = {"setting": setting, "mode": "train", "batch": args.batch, "resolution": args.resolution}
    result["first_step_s"] = round(times[0], 3)
    result["median_step_s"] = round(sorted(times[1:] or times)[len(times[1:] or times) // 2], 3)
    if cuda:
        result["train_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del problem, student, pruned, world
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    from sd_fixtures import build_tiny_clip, build_tiny_sd

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=["sd-v1", "tiny"], default="sd-v1")
    parser.add_argument("--settings", nargs="+", default=["no", "bf16+gc"], help="precision[+gc] per run")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--mode", choices=["run", "train"], default="run", help="whole runs, or KD steps alone")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.size == "tiny":
        model = build_tiny_sd(args.out / "model")
        args.resolution = 16
    else:
        model = build_sd_v1_shaped(args.out / "model")
    clip = build_tiny_clip(args.out / "clip")
    data = caption_folder(args.out / "data", args.images, args.resolution)
    print(f"built {args.size} model and data in {time.perf_counter() - t0:.1f}s", flush=True)
    results = []
    for setting in args.settings:
        if args.mode == "train":
            results.append(train_only(model, data, clip, setting, args))
        else:
            results.append(run_setting(model, data, clip, args.out / f"run-{setting}", setting, args))
        print(json.dumps(results[-1]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
