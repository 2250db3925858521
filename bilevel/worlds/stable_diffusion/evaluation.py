"""Evaluate a UNet in an SDWorld: sample concept and retain prompts with the pipeline's schedule (DDIM, epsilon or
v-prediction), decode with the VAE, and score with the real-image evaluators (CLIP concept detector, CLIP score,
optional CLIP-feature Fréchet distance and NudeNet)."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F

from bilevel.core.config import EvalConfig
from bilevel.core.world import EvalOutput, Evaluation, rate_intervals
from bilevel.worlds.stable_diffusion.world import SDWorld

#: the guidance when evaluation.guidance is unset (the project's long-standing Stable Diffusion default)
DEFAULT_GUIDANCE = 2.0
GRID_SIDE = 128  # images kept for grids and rows/*.images.safetensors are downscaled to at most this side
RETAIN = "retain prompts"


def neutral_prompts(concept_prompts: list[str], concept: str, retain: list[str]) -> list[str]:
    """What the detector may choose instead of the concept: the concept prompts with the concept removed, and
    the retain prompts."""
    stripped = [re.sub(re.escape(concept), " ", p, flags=re.IGNORECASE) for p in concept_prompts]
    cleaned = [" ".join(s.replace(" ,", ",").split()).strip(" ,") for s in stripped]
    out = [p for p in dict.fromkeys(cleaned + retain) if p]
    return out or ["a photo"]


def evaluators(world: SDWorld, settings: EvalConfig) -> dict[str, Any]:
    """The CLIP scorer (and NudeNet) of this run, loaded once and kept on the world."""
    from bilevel.evaluators import ClipScorer, NudityDetector

    sd = settings.sd
    cache = world.__dict__.setdefault("_evaluators", {})
    if cache.get("clip_model") != sd.clip_model:
        cache["clip_model"] = sd.clip_model
        cache["scorer"] = ClipScorer.load(sd.clip_model, world.device)
    if sd.nudity and "nudity" not in cache:
        cache["nudity"] = NudityDetector.load(sd.nudity_threshold)
    return cache


def prepare_evaluators(world: SDWorld, settings: EvalConfig) -> None:
    """Load the evaluators before any training, so a missing CLIP model fails the run at once."""
    evaluators(world, settings)


@torch.no_grad()
def evaluate_sd(unet: torch.nn.Module, world: SDWorld, settings: EvalConfig) -> EvalOutput:
    """Metrics and grid images of `unet`; every arm uses the same noise seed, prompts and evaluators."""
    from bilevel.evaluators import ClipConceptDetector, frechet_distance_to_folder

    ev = settings
    tools = evaluators(world, settings)
    scorer = tools["scorer"]
    n, n_concept = ev.samples_per_prompt, ev.concept_sample_count()
    groups: dict[str, list[str]] = {}
    for c in world.concepts:
        prompts = world.concept_prompts(c)
        groups[c] = [prompts[i % len(prompts)] for i in range(n_concept)]
    retain = world.retain_prompts()
    groups[RETAIN] = [retain[i % len(retain)] for i in range(n)]
    all_prompts = [p for ps in groups.values() for p in ps]
    was_training = unet.training
    unet.eval()
    latents = world.sample(
        unet, all_prompts, steps=ev.steps, guidance=ev.guidance_or(DEFAULT_GUIDANCE),
        generator=torch.Generator().manual_seed(ev.seed),
    )
    unet.train(was_training)
    pixels = world.decode(latents)  # [-1, 1], CPU
    unit = (pixels + 1) / 2
    bounds = [0]
    for ps in groups.values():
        bounds.append(bounds[-1] + len(ps))
    by_group = {g: unit[bounds[i] : bounds[i + 1]] for i, g in enumerate(groups)}
    extra: dict[str, float] = {}
    per_concept: dict[str, float] = {}
    counts: dict[str, tuple[int, int]] = {}
    for c in world.concepts:
        detector = ClipConceptDetector(
            scorer, world.concept_prompts(c), neutral_prompts(world.concept_prompts(c), c, retain)
        )
        flagged = detector.detect(by_group[c])
        per_concept[c] = float(flagged.float().mean())
        counts[f"concept_rate/{c}"] = (int(flagged.sum()), len(flagged))
        extra[f"concept_clip/{c}"] = float(scorer.score(by_group[c], groups[c]).mean())
    extra["clip_score"] = float(scorer.score(by_group[RETAIN], groups[RETAIN]).mean())
    fid = None
    if ev.sd.reference_images is not None:
        fid = frechet_distance_to_folder(by_group[RETAIN], ev.sd.reference_images, scorer)
    if ev.sd.nudity:
        concept_images = torch.cat([by_group[c] for c in world.concepts])
        extra["nudity_rate"] = float(tools["nudity"].detect(concept_images).float().mean())
    evaluation = Evaluation(
        concept_rate=sum(per_concept.values()) / len(per_concept),
        concept_rates=per_concept,
        quality_distance=fid,
        quality_metric="fid",
        per_group=dict(per_concept),
        samples=n,
        concept_samples=n_concept,
        intervals=rate_intervals(counts | {"concept_rate": tuple(map(sum, zip(*counts.values(), strict=True)))}),
        extra=extra,
    )
    return EvalOutput(evaluation, {g: grid_images(x) for g, x in by_group.items()})


def grid_images(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> [-1, 1], downscaled (antialiased) so grids and saved rows stay small."""
    side = unit.shape[-1]
    if side > GRID_SIDE:
        unit = F.interpolate(unit, size=(GRID_SIDE, GRID_SIDE), mode="bilinear", antialias=True)
    return (unit * 2 - 1).clamp(-1, 1)
