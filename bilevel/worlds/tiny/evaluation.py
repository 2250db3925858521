"""Evaluate a UNet on the tiny world: concept rate, retained accuracy, collateral, distribution distance."""

from __future__ import annotations

import torch

from bilevel.core.world import EvalOutput, Evaluation, rate_intervals
from bilevel.diffusion.sampling import sample_images
from bilevel.worlds.tiny.detector import detect
from bilevel.worlds.tiny.palette import COLOURS, SHAPES, colour_names, nearest_colours, prompt_for
from bilevel.worlds.tiny.world import TinyWorld


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between two image sets (flattened); deterministic projections."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    n = min(len(a), len(b))
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=gen)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = (a[:n] @ dirs).sort(dim=0).values
    pb = (b[:n] @ dirs).sort(dim=0).values
    return float((pa - pb).abs().mean())


@torch.no_grad()
def evaluate_tiny(
    unet: torch.nn.Module,
    world: TinyWorld,
    *,
    samples_per_colour: int = 32,
    concept_samples: int | None = None,
    steps: int = 25,
    guidance: float = 2.0,
    seed: int = 1234,
) -> EvalOutput:
    """Sample every colour's prompts (shapes cycled) with one shared noise seed, then score with the detector.
    The concept colours get `concept_samples` (default: as many as the others), the rest `samples_per_colour`."""
    was_training = unet.training
    unet.eval()
    colours = colour_names()
    count = {c: (concept_samples or samples_per_colour) if c in world.concepts else samples_per_colour for c in colours}
    prompts = [prompt_for(c, SHAPES[i % len(SHAPES)]) for c in colours for i in range(count[c])]
    gen = torch.Generator().manual_seed(seed)
    images = sample_images(
        unet, world.scheduler_config, world.bank(prompts), world.bank.empty(1),
        steps=steps, guidance=guidance, generator=gen, channels=world.sample_shape[0], size=world.sample_shape[1],
    ).cpu()  # fmt: skip
    unet.train(was_training)
    det = detect(images)
    starts = dict(zip(colours, [sum(count[c] for c in colours[:i]) for i in range(len(colours))], strict=True))
    rows = {c: slice(starts[c], starts[c] + count[c]) for c in colours}
    by_colour = {c: images[rows[c]] for c in colours}
    hits = {c: sum(label == c for label in det.labels[rows[c]]) for c in colours}
    per_colour = {c: hits[c] / count[c] for c in colours}
    col_idx = {c: i for i, c in enumerate(colours)}
    extra: dict[str, float] = {}
    counts: dict[str, tuple[int, int]] = {}
    near_of: dict[str, list[str]] = {}
    for c in world.concepts:
        extra[f"concept_distance/{c}"] = float(det.distances[rows[c], col_idx[c]].clamp(max=2.0).mean())
        near_of[c] = [n for n in nearest_colours(c, k=len(COLOURS) - 1) if n not in world.concepts][:2]
        extra[f"collateral/{c}"] = sum(per_colour[n] for n in near_of[c]) / len(near_of[c])
        counts[f"concept_rate/{c}"] = (hits[c], count[c])
    retain = world.retain_colours()
    near = [n for c in world.concepts for n in near_of[c]]
    counts["concept_rate"] = (sum(hits[c] for c in world.concepts), sum(count[c] for c in world.concepts))
    counts["retained_accuracy"] = (sum(hits[c] for c in retain), sum(count[c] for c in retain))
    counts["collateral"] = (sum(hits[n] for n in near), sum(count[n] for n in near))
    fake = torch.cat([by_colour[c] for c in retain])
    real_idx = list(range(len(world.finetune)))[: len(fake)]
    evaluation = Evaluation(
        concept_rate=sum(per_colour[c] for c in world.concepts) / len(world.concepts),
        concept_rates={c: per_colour[c] for c in world.concepts},
        retained_accuracy=sum(per_colour[c] for c in retain) / len(retain),
        collateral=sum(extra[f"collateral/{c}"] for c in world.concepts) / len(world.concepts),
        quality_distance=sliced_wasserstein(fake, world.finetune.images[real_idx]),
        quality_metric="swd",
        per_group=per_colour,
        samples=samples_per_colour,
        concept_samples=count[world.concepts[0]],
        intervals=rate_intervals(counts),
        extra=extra,
    )
    return EvalOutput(evaluation, by_colour)
