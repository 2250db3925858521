"""Evaluate a UNet on the digits world, scored by the shipped real-digit classifier.

- concept rate: share of concept-prompt samples the detector labels as the concept (`none` counts as not);
- retained accuracy: share of the other classes' samples labelled as asked;
- collateral: the rendered-as-asked rate of the two classes the teacher most confuses with each concept
  (`neighbours.confusability`, measured once from the teacher);
- quality: a Frechet distance between the detector's penultimate features of the retained classes' samples and of
  the held-out real digits of those classes ("fid-digits": an FID with the digit classifier as feature network).
Every rate carries its 95% Wilson interval.
"""

from __future__ import annotations

import torch

from bilevel.core.world import EvalOutput, Evaluation, rate_intervals
from bilevel.plugins.worlds.digits.data import CLASS_NAMES, make_dataset, prompts_for
from bilevel.plugins.worlds.digits.detector import shipped_detector
from bilevel.plugins.worlds.digits.neighbours import nearest_digits
from bilevel.plugins.worlds.digits.world import DigitsWorld
from bilevel.toolkit import frechet_distance, sample_images

#: classes per concept on which collateral is measured
NEIGHBOURS = 2


def class_prompts(digit: int, count: int) -> list[str]:
    """`count` prompts of a class, its two names alternating (the word first)."""
    names = prompts_for(digit)
    return [names[i % len(names)] for i in range(count)]


@torch.no_grad()
def evaluate_digits(
    unet: torch.nn.Module,
    world: DigitsWorld,
    *,
    samples_per_class: int = 32,
    concept_samples: int | None = None,
    steps: int = 25,
    guidance: float = 1.25,
    seed: int = 1234,
) -> EvalOutput:
    """Sample every class (concepts: `concept_samples`, others: `samples_per_class`) with one shared noise seed,
    then label with the detector."""
    was_training = unet.training
    unet.eval()
    concepts = world.concept_digits
    digits = range(len(CLASS_NAMES))
    count = {d: (concept_samples or samples_per_class) if d in concepts else samples_per_class for d in digits}
    prompts = [p for d in digits for p in class_prompts(d, count[d])]
    gen = torch.Generator().manual_seed(seed)
    images = sample_images(
        unet, world.scheduler_config, world.bank(prompts), world.bank.empty(1),
        steps=steps, guidance=guidance, generator=gen, channels=world.sample_shape[0], size=world.sample_shape[1],
    ).cpu()  # fmt: skip
    unet.train(was_training)
    detector = shipped_detector()
    found = detector.detect(images).indices
    bounds = torch.tensor([0] + [count[d] for d in digits]).cumsum(0).tolist()
    rows = {d: slice(bounds[d], bounds[d + 1]) for d in digits}
    hits = {d: int((found[rows[d]] == d).sum()) for d in digits}
    rate = {d: hits[d] / count[d] for d in digits}
    retain = world.retain_digits
    matrix = world.confusability()
    near = {d: nearest_digits(matrix, d, set(concepts), NEIGHBOURS) for d in concepts}
    counts: dict[str, tuple[int, int]] = {}
    extra: dict[str, float] = {}
    for name, d in zip(world.concepts, concepts, strict=True):
        counts[f"concept_rate/{name}"] = (hits[d], count[d])
        extra[f"collateral/{name}"] = sum(rate[n] for n in near[d]) / len(near[d])
        extra[f"concept_none/{name}"] = float((found[rows[d]] < 0).float().mean())
    near_all = [n for d in concepts for n in near[d]]
    counts["concept_rate"] = (sum(hits[d] for d in concepts), sum(count[d] for d in concepts))
    counts["retained_accuracy"] = (sum(hits[d] for d in retain), sum(count[d] for d in retain))
    counts["collateral"] = (sum(hits[n] for n in near_all), sum(count[n] for n in near_all))
    retained = torch.cat([images[rows[d]] for d in retain])
    real = make_dataset("held_out", include=list(retain)).images
    distance = frechet_distance(detector.features(retained).double(), detector.features(real).double())
    evaluation = Evaluation(
        concept_rate=sum(rate[d] for d in concepts) / len(concepts),
        concept_rates={name: rate[d] for name, d in zip(world.concepts, concepts, strict=True)},
        retained_accuracy=sum(rate[d] for d in retain) / len(retain),
        collateral=sum(extra[f"collateral/{c}"] for c in world.concepts) / len(world.concepts),
        quality_distance=distance,
        quality_metric=world.quality_metric,
        per_group={CLASS_NAMES[d]: rate[d] for d in digits},
        samples=samples_per_class,
        concept_samples=count[concepts[0]],
        intervals=rate_intervals(counts),
        extra=extra,
    )
    # RGB for the PNG grids; repeat, not expand: the run saves them with safetensors, which needs contiguous tensors
    grids = {CLASS_NAMES[d]: images[rows[d]].repeat(1, 3, 1, 1) for d in digits}
    return EvalOutput(evaluation, grids)
