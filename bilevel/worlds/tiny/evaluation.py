"""Evaluate a UNet on the tiny world: concept rate (under its primary name, its second name, and on prompts that
do not name it), retained accuracy, collateral, distribution distance."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bilevel.core.world import EvalOutput, Evaluation, rate_intervals
from bilevel.diffusion.sampling import sample_images
from bilevel.worlds.tiny.detector import detect, detect_stripes
from bilevel.worlds.tiny.palette import ALIASES, COLOURS, SHAPES, STYLES, colour_names, nearest_colours, prompt_for
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


@dataclass
class PromptGroups:
    """Prompt groups sampled in one batch: label -> prompts; rows are kept in insertion order."""

    prompts: dict[str, list[str]]

    def add(self, label: str, make, count: int) -> None:
        self.prompts[label] = [make(i) for i in range(count)]

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for label, prompts in self.prompts.items():
            out[label] = slice(start, start + len(prompts))
            start += len(prompts)
        return out

    def flat(self) -> list[str]:
        return [p for prompts in self.prompts.values() for p in prompts]


def _shape(i: int) -> str:
    return SHAPES[i % len(SHAPES)]


@torch.no_grad()
def evaluate_tiny(
    unet: torch.nn.Module,
    world: TinyWorld,
    *,
    samples_per_colour: int = 32,
    concept_samples: int | None = None,
    steps: int = 25,
    guidance: float = 1.0,
    seed: int = 1234,
    secondary: bool = True,
) -> EvalOutput:
    """Sample every colour's prompts (shapes cycled) and each concept's groups with one shared noise seed, then
    score with the detectors. Colour concepts: the rate under the primary name (the concept rate), under the second
    name (`alias_rate`) and on colourless prompts (`unasked_rate`: the teacher renders each colour on 1/8 of them);
    a style: the striped share of `a <shape> striped` samples, of `... banded` ones and of every plain sample."""
    was_training = unet.training
    unet.eval()
    colours = colour_names()
    n_concept = concept_samples or samples_per_colour
    colour_concepts, style_concepts = world.colour_concepts, world.style_concepts
    groups = PromptGroups({})
    for c in colours:
        groups.add(c, lambda i, c=c: prompt_for(c, _shape(i)), n_concept if c in colour_concepts else samples_per_colour)
    for s in style_concepts:
        groups.add(s, lambda i, s=s: prompt_for(None, _shape(i), s), n_concept)
    if secondary:
        for c in colour_concepts:
            groups.add(f"alias:{c}", lambda i, c=c: prompt_for(ALIASES[c], _shape(i)), n_concept)
        for s in style_concepts:
            groups.add(f"alias:{s}", lambda i, s=s: prompt_for(None, _shape(i), STYLES[s]), n_concept)
        if colour_concepts:
            groups.add("colourless", lambda i: prompt_for(None, _shape(i)), n_concept)
    prompts = groups.flat()
    gen = torch.Generator().manual_seed(seed)
    images = sample_images(
        unet, world.scheduler_config, world.bank(prompts), world.bank.empty(1),
        steps=steps, guidance=guidance, generator=gen, channels=world.sample_shape[0], size=world.sample_shape[1],
    ).cpu()  # fmt: skip
    unet.train(was_training)
    det = detect(images)
    stripes = detect_stripes(images)
    rows = groups.slices()
    by_group = {label: images[sl] for label, sl in rows.items()}

    def hits_of(label: str, colour: str) -> tuple[int, int]:
        labels = det.labels[rows[label]]
        return sum(x == colour for x in labels), len(labels)

    def stripes_of(labels: list[str]) -> tuple[int, int]:
        flags = [f for label in labels for f in stripes[rows[label]]]
        return sum(flags), len(flags)

    own = {c: hits_of(c, c) for c in colours}  # each colour group rendered in its own colour: (hits, samples)
    per_colour = {c: k / n for c, (k, n) in own.items()}
    counts: dict[str, tuple[int, int]] = {}
    extra: dict[str, float] = {}
    near_of: dict[str, list[str]] = {}
    col_idx = {c: i for i, c in enumerate(colours)}
    for c in colour_concepts:
        counts[f"concept_rate/{c}"] = own[c]
        extra[f"concept_distance/{c}"] = float(det.distances[rows[c], col_idx[c]].clamp(max=2.0).mean())
        near_of[c] = [n for n in nearest_colours(c, k=len(COLOURS) - 1) if n not in colour_concepts][:2]
        extra[f"collateral/{c}"] = sum(per_colour[n] for n in near_of[c]) / len(near_of[c])
        if secondary:
            counts[f"alias_rate/{c}"] = hits_of(f"alias:{c}", c)
            counts[f"unasked_rate/{c}"] = hits_of("colourless", c)
    plain = [c for c in colours if c not in colour_concepts]
    for s in style_concepts:
        counts[f"concept_rate/{s}"] = stripes_of([s])
        if secondary:
            counts[f"alias_rate/{s}"] = stripes_of([f"alias:{s}"])
            counts[f"unasked_rate/{s}"] = stripes_of(plain)
    retain = world.retain_colours()
    near = [n for c in colour_concepts for n in near_of[c]]
    for key in ("concept_rate", "alias_rate", "unasked_rate"):
        parts = [counts[f"{key}/{c}"] for c in world.concepts if f"{key}/{c}" in counts]
        if parts:
            counts[key] = (sum(k for k, _ in parts), sum(n for _, n in parts))
    counts["retained_accuracy"] = (sum(own[c][0] for c in retain), sum(own[c][1] for c in retain))
    if near:
        counts["collateral"] = (sum(own[n][0] for n in near), sum(own[n][1] for n in near))
    rates = {key: k / n for key, (k, n) in counts.items()}
    for key in ("alias_rate", "unasked_rate"):
        extra.update({k: v for k, v in rates.items() if k == key or k.startswith(f"{key}/")})
    concept_rates = {c: rates[f"concept_rate/{c}"] for c in world.concepts}
    fake = torch.cat([by_group[c] for c in retain])
    real_idx = list(range(len(world.finetune)))[: len(fake)]
    evaluation = Evaluation(
        concept_rate=sum(concept_rates.values()) / len(concept_rates),
        concept_rates=concept_rates,
        retained_accuracy=rates["retained_accuracy"],
        collateral=(sum(extra[f"collateral/{c}"] for c in colour_concepts) / len(colour_concepts))
        if colour_concepts else None,
        quality_distance=sliced_wasserstein(fake, world.finetune.images[real_idx]),
        quality_metric="swd",
        per_group=per_colour | {s: concept_rates[s] for s in style_concepts},
        samples=samples_per_colour,
        concept_samples=n_concept,
        intervals=rate_intervals(counts),
        extra=extra,
    )  # fmt: skip
    return EvalOutput(evaluation, by_group)
