"""How well a digits model renders each class: sample both names of every class, score with the detector.

Returns per-class rates and the confusion (asked class x detected class or none): the classes a model most confuses
with a concept are where collateral damage from erasing it shows first.

    python -m bilevel.plugins.worlds.digits.quality runs/digits-teacher/pipeline --samples 64 --guidance 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from pydantic import BaseModel

from bilevel.plugins.worlds.digits.data import CLASS_NAMES, TEMPLATES, prompt_for
from bilevel.plugins.worlds.digits.detector import DigitDetector, shipped_detector
from bilevel.toolkit import sample_images


class Quality(BaseModel):
    """Share of samples detected as the asked class, per class and per name; confusion rows sum to 1."""

    steps: int
    guidance: float
    seed: int
    samples_per_class: int
    per_class: dict[str, float]
    per_name: dict[str, float]  # template ("a handwritten {word}", "the digit {numeral}") -> rate over classes
    none_rate: float
    confusion: list[list[float]]  # (10, 11): asked digit x detected digit, last column none

    @property
    def min_rate(self) -> float:
        return min(self.per_class.values())

    @property
    def mean_rate(self) -> float:
        return sum(self.per_class.values()) / len(self.per_class)


@torch.no_grad()
def class_samples(pipe, samples_per_class: int, *, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """(10, n, 1, 8, 8) samples, names alternating (word, numeral) within each class, one shared noise seed."""
    prompts = [prompt_for(d, i % len(TEMPLATES)) for d in range(len(CLASS_NAMES)) for i in range(samples_per_class)]
    cond = pipe.encode_prompts(prompts)
    uncond = pipe.encode_prompts([""])
    gen = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    images = sample_images(
        pipe.unet, dict(pipe.scheduler.config), cond, uncond, steps=steps, guidance=guidance, generator=gen,
        channels=cfg.in_channels, size=cfg.sample_size,
    )  # fmt: skip
    return images.view(len(CLASS_NAMES), samples_per_class, *images.shape[1:])


def measure_quality(
    pipe,
    detector: DigitDetector | None = None,
    *,
    samples_per_class: int = 64,
    steps: int = 25,
    guidance: float = 2.0,
    seed: int = 0,
) -> tuple[Quality, torch.Tensor]:
    """(quality, the samples (10, n, 1, 8, 8)) of a pipeline; the shipped detector unless another is given."""
    detector = detector or shipped_detector()
    images = class_samples(pipe, samples_per_class, steps=steps, guidance=guidance, seed=seed)
    found = detector.detect(images.flatten(0, 1)).indices.view(len(CLASS_NAMES), samples_per_class)
    asked = torch.arange(len(CLASS_NAMES)).view(-1, 1)
    hit = found == asked
    cols = torch.where(found < 0, torch.full_like(found, len(CLASS_NAMES)), found)
    confusion = torch.stack([torch.bincount(row, minlength=len(CLASS_NAMES) + 1) for row in cols]).float()
    names = torch.arange(samples_per_class) % len(TEMPLATES)
    quality = Quality(
        steps=steps,
        guidance=guidance,
        seed=seed,
        samples_per_class=samples_per_class,
        per_class={c: float(hit[d].float().mean()) for d, c in enumerate(CLASS_NAMES)},
        per_name={t: float(hit[:, names == i].float().mean()) for i, t in enumerate(TEMPLATES)},
        none_rate=float((found < 0).float().mean()),
        confusion=(confusion / samples_per_class).tolist(),
    )
    return quality, images


def load_checkpoint_pipeline(checkpoints: Path):
    """A pipeline carrying the EMA weights of a training run's latest checkpoint (to watch a run in progress)."""
    from bilevel.plugins.worlds.digits.architecture import build_digits_pipeline
    from bilevel.toolkit import load_tensors

    state = json.loads((checkpoints / "state.json").read_text())
    pipe = build_digits_pipeline(state["config"]["seed"], tuple(state["config"]["channels"]))
    pipe.unet.load_state_dict(load_tensors(checkpoints / state["folder"] / "ema.safetensors"))
    pipe.unet.eval()
    return pipe, int(state["step"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Per-class rendered-as-asked rates of a digits pipeline.")
    parser.add_argument("source", type=Path, help="a pipeline folder, or a training run's checkpoints folder")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if (args.source / "state.json").is_file():
        pipe, step = load_checkpoint_pipeline(args.source)
        print(f"checkpoint at step {step}")
    else:
        from bilevel.worlds.models import load_tiny_pipeline

        pipe = load_tiny_pipeline(str(args.source))
    for guidance in args.guidance:
        q, _ = measure_quality(
            pipe, samples_per_class=args.samples, steps=args.steps, guidance=guidance, seed=args.seed
        )
        rates = " ".join(f"{c} {r:.2f}" for c, r in q.per_class.items())
        print(f"guidance {guidance}: min {q.min_rate:.3f} mean {q.mean_rate:.3f} none {q.none_rate:.3f} | {rates}")


if __name__ == "__main__":
    main()
