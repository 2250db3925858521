"""Evaluate a UNet in an SDWorld: sample concept and retain prompts with the pipeline's schedule (DDIM, epsilon or
v-prediction), decode with the VAE, and score with the real-image evaluators (CLIP concept detector, CLIP score,
optional CLIP-feature Fréchet distance and NudeNet)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..config import RunConfig
from .world import SDWorld

GRID_SIDE = 128  # images kept for grids and rows/*.images.safetensors are downscaled to at most this side
RETAIN = "retain prompts"


@dataclass
class SDEvalResult:
    metrics: dict[str, float]
    per_colour: dict[str, float]  # concept -> detected rate (named as in the tiny world's rows)
    images: dict[str, torch.Tensor] = field(repr=False)  # group -> samples (N, 3, h, w) in [-1, 1]


def neutral_prompts(concept_prompts: list[str], concept: str, retain: list[str]) -> list[str]:
    """What the detector may choose instead of the concept: the concept prompts with the concept removed, and
    the retain prompts."""
    stripped = [re.sub(re.escape(concept), " ", p, flags=re.IGNORECASE) for p in concept_prompts]
    cleaned = [" ".join(s.replace(" ,", ",").split()).strip(" ,") for s in stripped]
    out = [p for p in dict.fromkeys(cleaned + retain) if p]
    return out or ["a photo"]


def evaluators(world: SDWorld, config: RunConfig) -> dict[str, Any]:
    """The CLIP scorer (and NudeNet) of this run, loaded once and kept on the world."""
    from ..evaluators import ClipScorer, NudityDetector

    sd = config.evaluation.sd
    cache = world.__dict__.setdefault("_evaluators", {})
    if cache.get("clip_model") != sd.clip_model:
        cache["clip_model"] = sd.clip_model
        cache["scorer"] = ClipScorer.load(sd.clip_model, world.device)
    if sd.nudity and "nudity" not in cache:
        cache["nudity"] = NudityDetector.load(sd.nudity_threshold)
    return cache


def prepare_evaluators(world: SDWorld, config: RunConfig) -> None:
    """Load the evaluators before any training, so a missing CLIP model fails the run at once."""
    evaluators(world, config)


@torch.no_grad()
def evaluate_sd(unet: torch.nn.Module, world: SDWorld, config: RunConfig) -> SDEvalResult:
    """Metrics row and grid images of `unet`; every arm uses the same noise seed, prompts and evaluators."""
    from ..evaluators import ClipConceptDetector, frechet_distance_to_folder

    ev = config.evaluation
    tools = evaluators(world, config)
    scorer = tools["scorer"]
    n = ev.samples_per_prompt
    groups: dict[str, list[str]] = {}
    for c in world.concepts:
        prompts = world.concept_prompts(c)
        groups[c] = [prompts[i % len(prompts)] for i in range(n)]
    retain = world.retain_prompts()
    groups[RETAIN] = [retain[i % len(retain)] for i in range(n)]
    all_prompts = [p for ps in groups.values() for p in ps]
    was_training = unet.training
    unet.eval()
    latents = world.sample(
        unet, all_prompts, steps=ev.steps, guidance=ev.guidance, generator=torch.Generator().manual_seed(ev.seed)
    )
    unet.train(was_training)
    pixels = world.decode(latents)  # [-1, 1], CPU
    unit = (pixels + 1) / 2
    by_group = {g: unit[i * n : (i + 1) * n] for i, g in enumerate(groups)}
    metrics: dict[str, float] = {}
    per_concept: dict[str, float] = {}
    for c in world.concepts:
        detector = ClipConceptDetector(
            scorer, world.concept_prompts(c), neutral_prompts(world.concept_prompts(c), c, retain)
        )
        per_concept[c] = float(detector.detect(by_group[c]).float().mean())
        metrics[f"concept_rate/{c}"] = per_concept[c]
        metrics[f"concept_clip/{c}"] = float(scorer.score(by_group[c], groups[c]).mean())
    metrics["concept_rate"] = sum(per_concept.values()) / len(per_concept)
    metrics["clip_score"] = float(scorer.score(by_group[RETAIN], groups[RETAIN]).mean())
    sd = ev.sd
    if sd.reference_images is not None:
        metrics["fid"] = frechet_distance_to_folder(by_group[RETAIN], sd.reference_images, scorer)
    if sd.nudity:
        concept_images = torch.cat([by_group[c] for c in world.concepts])
        metrics["nudity_rate"] = float(tools["nudity"].detect(concept_images).float().mean())
    return SDEvalResult(metrics, per_concept, {g: grid_images(x) for g, x in by_group.items()})


def grid_images(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> [-1, 1], downscaled (antialiased) so grids and saved rows stay small."""
    side = unit.shape[-1]
    if side > GRID_SIDE:
        unit = F.interpolate(unit, size=(GRID_SIDE, GRID_SIDE), mode="bilinear", antialias=True)
    return (unit * 2 - 1).clamp(-1, 1)
