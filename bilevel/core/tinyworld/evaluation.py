"""Evaluate a UNet on the tiny world: concept rate, retained accuracy, collateral, distribution distance."""

from __future__ import annotations

import torch

from ..sampling import sample_images
from ..world import EvalOutput, Evaluation
from .detector import detect
from .palette import COLOURS, SHAPES, colour_names, nearest_colours, prompt_for
from .world import TinyWorld


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
    steps: int = 25,
    guidance: float = 2.0,
    seed: int = 1234,
) -> EvalOutput:
    """Sample every colour's prompts (shapes cycled) with one shared noise seed, then score with the detector."""
    was_training = unet.training
    unet.eval()
    colours = colour_names()
    prompts = [prompt_for(c, SHAPES[i % len(SHAPES)]) for c in colours for i in range(samples_per_colour)]
    gen = torch.Generator().manual_seed(seed)
    images = sample_images(
        unet, world.scheduler_config, world.bank(prompts), world.bank.empty(1),
        steps=steps, guidance=guidance, generator=gen, channels=world.sample_shape[0], size=world.sample_shape[1],
    ).cpu()  # fmt: skip
    unet.train(was_training)
    det = detect(images)
    by_colour = {c: images[i * samples_per_colour : (i + 1) * samples_per_colour] for i, c in enumerate(colours)}
    per_colour: dict[str, float] = {}
    for i, c in enumerate(colours):
        labels = det.labels[i * samples_per_colour : (i + 1) * samples_per_colour]
        per_colour[c] = sum(label == c for label in labels) / samples_per_colour
    extra: dict[str, float] = {}
    collateral: dict[str, float] = {}
    col_idx = {c: i for i, c in enumerate(colours)}
    for c in world.concepts:
        rows = slice(col_idx[c] * samples_per_colour, (col_idx[c] + 1) * samples_per_colour)
        extra[f"concept_distance/{c}"] = float(det.distances[rows, col_idx[c]].clamp(max=2.0).mean())
        near = [n for n in nearest_colours(c, k=len(COLOURS) - 1) if n not in world.concepts][:2]
        collateral[c] = sum(per_colour[n] for n in near) / len(near)
        extra[f"collateral/{c}"] = collateral[c]
    retain = world.retain_colours()
    fake = torch.cat([by_colour[c] for c in retain])
    real_idx = list(range(len(world.finetune)))[: len(fake)]
    evaluation = Evaluation(
        concept_rate=sum(per_colour[c] for c in world.concepts) / len(world.concepts),
        concept_rates={c: per_colour[c] for c in world.concepts},
        retained_accuracy=sum(per_colour[c] for c in retain) / len(retain),
        collateral=sum(collateral.values()) / len(collateral),
        quality_distance=sliced_wasserstein(fake, world.finetune.images[real_idx]),
        quality_metric="swd",
        per_group=per_colour,
        samples=samples_per_colour,
        extra=extra,
    )
    return EvalOutput(evaluation, by_colour)
