"""GPU check: fp16 (loss-scaled) and bf16 bilevel runs on CUDA with the tiny SD-format test pipeline.

Usage (repository root, a CUDA machine): python scripts/check_precision_gpu.py /tmp/precision-check
Prints each run's rows, the last history entries and how many loss-scaled steps ran at which scales."""

import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sd_fixtures import build_tiny_clip, build_tiny_sd

from bilevel.cli import main
from bilevel.optim import steps

root = Path(sys.argv[1])
data = root / "data"
data.mkdir(parents=True)
gen = torch.Generator().manual_seed(0)
for i in range(6):
    Image.fromarray((torch.rand(20, 24, 3, generator=gen) * 255).byte().numpy()).save(data / f"{i:03d}.png")
    (data / f"{i:03d}.txt").write_text(["a photo of a cat", "a dog on grass", "a red car"][i % 3])
sd, clip = build_tiny_sd(root / "sd"), build_tiny_clip(root / "clip")
scales = []
orig = steps.loss_scaler


def spy(opt):
    s = orig(opt)
    if s is not None:
        scales.append(s.get_scale())
    return s


steps.loss_scaler = spy
for prec in ("fp16", "bf16"):
    out = root / f"run-{prec}"
    t = time.time()
    code = main(
        [
            "run",
            "--model",
            str(sd),
            "--out",
            str(out),
            "--concept",
            "cat",
            "--steps",
            "20",
            "--device",
            "cuda",
            "--arms",
            "kd,bilevel,two-stage",
            "--set",
            f"data.finetune_data={data}",
            "--set",
            f"evaluation.sd.clip_model={clip}",
            "--set",
            "evaluation.samples_per_prompt=2",
            "--set",
            "evaluation.steps=2",
            "--set",
            "evaluation.latency_repeats=1",
            "--set",
            "data.concept_size=4",
            "--set",
            "training.batch_size=2",
            "--set",
            "training.upper_batch_size=2",
            "--set",
            f"model.mixed_precision={prec}",
            "--set",
            "unlearner.options.pool_size=2",
            "--set",
            "unlearner.options.sample_steps=2",
        ]
    )
    m = json.loads((out / "metrics.json").read_text()) if code == 0 else {}
    print(
        prec,
        "exit",
        code,
        f"{time.time() - t:.1f}s",
        [(r["model"], round(r["concept_rate"], 3), round(r["clip_score"], 2)) for r in m.get("rows", [])],
    )
    for arm, h in m.get("histories", {}).items():
        print(
            "  ",
            arm,
            [
                (e["step"], round(e.get("lower_loss", float("nan")), 4), round(e.get("upper_loss", float("nan")), 4))
                for e in h
            ][-3:],
        )
    print("  scaler calls", len(scales), "scales seen", sorted(set(scales))[:5])
    scales.clear()
