"""Train, calibrate and ship the digits detector, reproducibly (seeded, one thread).

The real train split is cut into a fit part and a calibration part (stratified); the network never sees the
held-out split, which only measures the shipped accuracy. Synthetic negatives (blank, uniform and Gaussian noise,
sparse dots, smooth blobs) teach the reject class.

    python -m bilevel.plugins.worlds.digits.detector_training --out bilevel/assets/digits-detector
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from bilevel.plugins.worlds.digits.data import CLASS_NAMES, IMAGE_SIZE, load_real_digits, split_indices
from bilevel.plugins.worlds.digits.detector import (
    CONFIG,
    FORMAT,
    NONE,
    REJECT,
    SHIPPED,
    WEIGHTS,
    DetectorArch,
    DigitClassifier,
    DigitDetector,
)
from bilevel.toolkit import atomic_save_tensors, atomic_write_text


class DetectorTrainConfig(BaseModel):
    """How the shipped detector is trained and calibrated."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    arch: DetectorArch = DetectorArch()
    epochs: int = Field(60, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    calibration_fraction: float = Field(0.15, gt=0, lt=1)  # of the train split, kept out of fitting
    negative_fraction: float = Field(0.2, ge=0, lt=1)  # share of each batch that is a synthetic negative
    augment_noise: float = Field(0.1, ge=0)  # std of Gaussian noise added to real digits while fitting
    # The confidence threshold is this quantile of the top-class probability on calibration digits, within bounds.
    reject_quantile: float = Field(0.01, ge=0, lt=1)
    threshold_bounds: tuple[float, float] = (0.3, 0.9)


def synthetic_negatives(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, 8, 8) non-digits in [-1, 1]: blank canvases, uniform and Gaussian noise, sparse dots, smooth blobs."""
    kinds = torch.randint(5, (n,), generator=gen)
    shape = (n, 1, IMAGE_SIZE, IMAGE_SIZE)
    blank = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1).expand(shape) + 0.03 * torch.randn(shape, generator=gen)
    uniform = torch.rand(shape, generator=gen) * 2 - 1
    gaussian = torch.randn(shape, generator=gen) * (0.3 + torch.rand(n, 1, 1, 1, generator=gen))
    density = 0.05 + 0.5 * torch.rand(n, 1, 1, 1, generator=gen)
    dots = torch.where(torch.rand(shape, generator=gen) < density, torch.rand(shape, generator=gen) * 2 - 1, -1.0)
    coarse = torch.rand(n, 1, 3, 3, generator=gen) * 2 - 1
    blobs = F.interpolate(coarse, size=IMAGE_SIZE, mode="bilinear", align_corners=True)
    stack = torch.stack([blank, uniform, gaussian, dots, blobs])  # (5, n, 1, 8, 8)
    return stack[kinds, torch.arange(n)].clamp(-1, 1)


def shift(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1..1 pixels in x and y (background-filled): scans are not perfectly centred."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(3, (2, len(images)), generator=gen).tolist()
    return torch.stack([p[:, y : y + IMAGE_SIZE, x : x + IMAGE_SIZE] for p, y, x in zip(padded, dy, dx)])


def train_detector(config: DetectorTrainConfig | None = None) -> tuple[DigitDetector, dict]:
    """Fit on the train split's fit part, calibrate the threshold on its calibration part, score on held-out."""
    config = config or DetectorTrainConfig()
    torch.set_num_threads(1)
    torch.manual_seed(config.seed)
    images, labels = load_real_digits()
    train, held = split_indices(labels)
    fit_rel, cal_rel = split_indices(labels[train], seed=config.seed + 1, held_out_fraction=config.calibration_fraction)
    fit, cal = train[fit_rel], train[cal_rel]
    model = DigitClassifier(config.arch)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(fit) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(config.seed)
    n_neg = round(config.batch_size * config.negative_fraction / (1 - config.negative_fraction))
    t0 = time.time()
    model.train()
    for _ in range(config.epochs):
        order = fit[torch.randperm(len(fit), generator=gen)]
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            x = shift(images[idx], gen)
            x = (x + config.augment_noise * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
            x = torch.cat([x, synthetic_negatives(n_neg, gen)])
            y = torch.cat([labels[idx], torch.full((n_neg,), REJECT)])
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        cal_conf = model(images[cal]).softmax(1)[:, :REJECT].max(1).values
    low, high = config.threshold_bounds
    threshold = float(cal_conf.quantile(config.reject_quantile).clamp(low, high))
    detector = DigitDetector(model=model, threshold=threshold, info={})
    metrics = evaluate_detector(detector, images, labels, cal, held)
    metrics["train_seconds"] = round(time.time() - t0, 1)
    return detector, metrics


def evaluate_detector(detector: DigitDetector, images, labels, cal, held) -> dict:
    """Accuracy (a `none` counts as wrong) and none-rates on real digits and synthetic negatives."""
    out: dict = {"threshold": detector.threshold}
    for name, idx in (("calibration", cal), ("held_out", held)):
        det = detector.detect(images[idx])
        out[f"{name}_accuracy"] = float((det.indices == labels[idx]).float().mean())
        out[f"{name}_none_rate"] = float((det.indices < 0).float().mean())
        out[f"{name}_count"] = len(idx)
    held_det = detector.detect(images[held])
    out["held_out_per_class"] = {
        CLASS_NAMES[d]: float((held_det.indices[labels[held] == d] == d).float().mean())
        for d in range(len(CLASS_NAMES))
    }
    gen = torch.Generator().manual_seed(12345)
    checks = {
        "blank": torch.full((64, 1, IMAGE_SIZE, IMAGE_SIZE), -1.0),
        "uniform_noise": torch.rand(256, 1, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1,
        "gaussian_noise": torch.randn(256, 1, IMAGE_SIZE, IMAGE_SIZE, generator=gen).clamp(-1, 1),
    }
    for name, x in checks.items():
        out[f"{name}_none_rate"] = sum(label == NONE for label in detector.detect(x).labels) / len(x)
    return out


def save_detector(detector: DigitDetector, config: DetectorTrainConfig, metrics: dict, out: Path, command: str) -> None:
    """Weights (safetensors), config.json (format, arch, threshold, training config, metrics) and a model card."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(detector.model.state_dict(), out / WEIGHTS)
    info = {
        "format": FORMAT,
        "arch": config.arch.model_dump(),
        "threshold": detector.threshold,
        "classes": list(CLASS_NAMES),
        "training": config.model_dump(),
        "metrics": metrics,
        "command": command,
    }
    atomic_write_text(out / CONFIG, json.dumps(info, indent=1))
    atomic_write_text(out / "README.md", model_card(config, metrics, command))
    for f in (out / WEIGHTS, out / CONFIG, out / "README.md"):
        f.chmod(0o644)  # safetensors writes 0600 files; package data must be readable by every user


def model_card(config: DetectorTrainConfig, m: dict, command: str) -> str:
    per_class = m["held_out_per_class"]

    def row(part: str) -> str:
        return f"{m[part + '_count']} | {m[part + '_accuracy']:.3f} | {m[part + '_none_rate']:.3f}"

    return f"""# Digits-world concept detector (shipped with bilevel)

A small CNN that labels 8x8 grey-level digit images (scikit-learn's `load_digits`, grey 0..16 scaled to [-1, 1])
as one of the ten digits or `none`. It scores the digits world's concept rate, retained accuracy and collateral;
its {config.arch.feature_dim}-d penultimate features serve a Frechet distance. Weights are safetensors only.

- Network: conv 3x3 (1->{config.arch.conv_channels[0]}), ReLU, conv 3x3 (->{config.arch.conv_channels[1]}), ReLU,
  max-pool 2, linear (->{config.arch.feature_dim}, ReLU: the features), linear (-> 10 digits + 1 reject class).
- `none` when the reject class wins or the top probability is below {m["threshold"]:.3f}: the
  {config.reject_quantile:.0%} quantile of the top probability on calibration digits (bounded to
  {config.threshold_bounds}).

## How it was trained

```bash
{command}
```

Seed {config.seed}. Fitted only on the real train split (the split fixed by seed 0, 75% of each class), less a
stratified {config.calibration_fraction:.0%} calibration part used only for the threshold: {config.epochs} epochs,
batch {config.batch_size} real digits (shifted by up to 1 pixel, Gaussian noise std {config.augment_noise}) plus
{config.negative_fraction:.0%} synthetic negatives (blank, uniform and Gaussian noise, sparse dots, smooth blobs)
labelled as the reject class, AdamW lr {config.lr} (one-cycle), one CPU thread, {m["train_seconds"]} s.

## Measured (a `none` counts as wrong)

| set | images | accuracy | none rate |
|---|---|---|---|
| held-out real digits (never seen) | {row("held_out")} |
| calibration real digits | {row("calibration")} |

Held-out accuracy per class: {", ".join(f"{k} {v:.2f}" for k, v in per_class.items())}.

`none` rate on blank images {m["blank_none_rate"]:.2f}, uniform noise {m["uniform_noise_none_rate"]:.2f}, Gaussian
noise {m["gaussian_noise_none_rate"]:.2f}.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train, calibrate and save the digits-world detector.")
    parser.add_argument("--out", type=Path, default=SHIPPED)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = DetectorTrainConfig(seed=args.seed)
    detector, metrics = train_detector(config)
    command = f"python -m bilevel.plugins.worlds.digits.detector_training --out {args.out} --seed {args.seed}"
    save_detector(detector, config, metrics, args.out, command)
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
