"""`bilevel unlearn`: erase concepts from a model with one unlearner alone (no pruning, no lower level).

The model is anything `bilevel run` accepts (the shipped tiny teacher "tiny", a pipeline folder, a hub id, an exported
pipeline) or a student folder written by `bilevel run`/`prune`/`unlearn` (paired with the pipeline recorded in its
manifest, whose world then serves it). The frozen
reference the unlearner compares against (`UnlearnContext.teacher`) is a frozen copy of the model being erased.
Only the unlearner's parameters train (AdamW, weight decay 0, so mask-based unlearners keep masked weights exactly).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bilevel.compression.student_io import make_manifest, save_student
from bilevel.core.config import RunConfig, build_config
from bilevel.core.errors import BilevelError, NonFiniteLossError
from bilevel.core.interfaces import UnlearnContext, Unlearner
from bilevel.optim.adamw import adamw
from bilevel.optim.problem import unlearn_context
from bilevel.optim.training import TrainCost
from bilevel.runtime.progress import progress_bar
from bilevel.runtime.report import console, image_grid, results_table, write_json
from bilevel.runtime.seeding import draw_generator

RESULT_FILE = "unlearn.json"
COLUMNS = [
    ("model", "model"),
    ("concept_rate", "concept rate"),
    ("alias_rate", "2nd name"),
    ("unasked_rate", "unasked"),
    ("retained_accuracy", "retained acc"),
    ("collateral", "collateral"),
    ("quality_distance", "distance"),
    ("train_seconds", "train s"),
    ("train_cpu_seconds", "CPU s"),
]


@dataclass(frozen=True)
class Recommended:
    """Settings measured to erase a tiny-world colour from the shipped teacher (benchmarks/unlearn_alone.py)."""

    steps: int
    lr: float
    batch_size: int = 16
    options: dict[str, Any] = field(default_factory=dict)


#: Per built-in unlearner: what `bilevel unlearn` uses when steps/lr/options are not given. The plugins' own
#: defaults follow the papers (in a bilevel run the lower level keeps the other concepts). Used alone, erasing a
#: colour also costs its neighbours unless a retain term holds them: ESD and Concept Ablation get the retain
#: extension (teacher outputs on retain images), SalUn a stronger alpha and the frozen model's relabelled target.
#: Measured on the shipped tiny teacher, concept "purple" (benchmarks/unlearn_alone.py).
RECOMMENDED: dict[str, Recommended] = {
    "esd": Recommended(steps=200, lr=3e-4, options={"retain_weight": 5.0}),
    "concept-ablation": Recommended(steps=200, lr=3e-4, options={"retain_weight": 5.0}),
    "salun": Recommended(steps=200, lr=3e-4, options={"alpha": 5.0, "target_model": "frozen"}),
}


@dataclass
class UnlearnResult:
    out_dir: Path
    before: dict[str, Any]
    after: dict[str, Any]
    history: list[dict[str, float]]


def train_unlearner(
    unlearner: Unlearner, ctx: UnlearnContext, *, steps: int, lr: float, batch_size: int, seed: int, log_every: int = 25
) -> list[dict[str, float]]:
    """prepare -> AdamW (weight decay 0) over the unlearner's parameters only, `steps` steps. Returns the loss log."""
    student = ctx.student
    student.train().requires_grad_(True)
    unlearner.prepare(ctx)
    params = unlearner.trainable_parameters(student)
    if not params:
        raise BilevelError(f"unlearner {unlearner.name!r} selected no trainable parameters in this model")
    chosen = {id(p) for p in params.values()}
    for p in student.parameters():
        p.requires_grad_(id(p) in chosen)
    opt = adamw(params.values(), lr)
    history: list[dict[str, float]] = []
    with progress_bar(f"unlearning ({unlearner.name})", total=steps) as advance:
        for step in range(steps):
            gen = draw_generator(seed, step)
            loss = unlearner.loss(ctx, unlearner.draw(ctx, batch_size, gen))
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"unlearning loss became {loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            unlearner.before_step(student)
            opt.step()
            value = float(loss.detach())
            if step % log_every == 0 or step == steps - 1:
                history.append({"step": step, "loss": value})
            advance(1, loss=value)
    student.eval().requires_grad_(False)
    return history


def unlearn_model(
    model: str,
    unlearner_name: str,
    options: dict[str, Any],
    concepts: list[str],
    steps: int,
    lr: float,
    out: Path,
    *,
    batch_size: int = 16,
    seed: int = 0,
    pipeline: str | None = None,
    device: str = "cpu",
    samples_per_colour: int = 32,
    eval_steps: int = 25,
    eval_guidance: float | None = None,
    eval_seed: int = 1234,
    finetune_size: int = 4096,
    concept_size: int = 512,
    data_seed: int = 0,
    evaluate: bool = True,
    world_config: RunConfig | None = None,
) -> UnlearnResult:
    """Erase `concepts` from `model` (anything `bilevel run` accepts, or a student folder) with one unlearner, save
    the result as a student in `out`, evaluate before/after on the model's world.

    world_config: the world's settings (world name, data, evaluation.sd); the keyword arguments above set its
    model, data sizes and sampler. A student is paired with the pipeline recorded in its manifest (`pipeline`
    overrides)."""
    from bilevel.registry import get_registry
    from bilevel.worlds.models import ModelRef, absolute_source, load_unet, resolve_model_ref
    from bilevel.worlds.resolve import build_world, world_plugin

    if steps <= 0:
        raise BilevelError(f"steps must be positive, got {steps}")
    if not lr > 0:
        raise BilevelError(f"lr must be positive, got {lr}")
    if batch_size <= 0:
        raise BilevelError(f"batch size must be positive, got {batch_size}")
    concepts = [c.strip() for c in concepts]
    if not concepts:
        raise BilevelError("at least one concept is needed")
    ref: ModelRef = resolve_model_ref(model, pipeline)
    config = _world_config(world_config, ref, concepts, device, finetune_size, concept_size, data_seed,
                           samples_per_colour, eval_steps, eval_guidance, eval_seed)  # fmt: skip
    world_plugin(config).check(config, "unlearn")  # before any loading: a typo in a concept fails at once
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise BilevelError(f"output path {out} exists and is not a folder")
    src = Path(model).expanduser()
    if model != "tiny" and src.exists() and out.resolve() == src.resolve():
        raise BilevelError(f"output folder {out} is the input model; choose another output folder")

    unlearner = get_registry().create("unlearner", unlearner_name, options)
    torch.manual_seed(seed)
    world = build_world(config, "unlearn")
    original, extras = load_unet(ref, world.teacher, device)
    reference = copy.deepcopy(original).eval().requires_grad_(False)
    student = copy.deepcopy(original)
    out.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]bilevel unlearn[/] {model} -> {out}  (unlearner={unlearner.name}, concepts={', '.join(concepts)}, "
        f"world={world.name})"
    )

    def measure(label: str, unet: nn.Module, extra: dict[str, Any]) -> dict[str, Any]:
        result = world.evaluate(unet, config.evaluation)
        image_grid({f"{label}: {g}": result.images[g] for g in result.images}, out / "grids" / f"{label}.png")
        return {"model": label, **result.metrics, **extra, "per_group": result.per_group}

    before = measure("before", reference, {}) if evaluate else {}
    ctx = unlearn_context(student, reference, world, out, seed)  # reference: the model being erased
    t0, c0 = time.perf_counter(), time.process_time()
    history = train_unlearner(unlearner, ctx, steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    cost = TrainCost(time.perf_counter() - t0, time.process_time() - c0)
    info = {"unlearner": unlearner.name, "options": unlearner.config.model_dump(mode="json"), "concepts": concepts,
            "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "source": model}  # fmt: skip
    previous = extras.pop("unlearned", [])  # a student erased before keeps the record of every pass
    previous = [previous] if isinstance(previous, dict) else list(previous)
    provenance = {"teacher": absolute_source(ref.pipeline), "world": world.name}
    manifest = make_manifest(student, [], **{**extras, **provenance}, unlearned=[*previous, info])
    save_student(out, student, manifest)
    after = measure("after", student, cost.row()) if evaluate else {}
    write_json(out / RESULT_FILE, {**info, "world": world.name, "before": before, "after": after, "history": history})
    if evaluate:
        columns = [(k, world.quality_metric.upper() if k == "quality_distance" else h) for k, h in COLUMNS]
        columns = [c for c in columns if before.get(c[0]) is not None or after.get(c[0]) is not None]
        console.print(results_table(f"unlearn {', '.join(concepts)} with {unlearner.name}", [before, after], columns))
    return UnlearnResult(out, before, after, history)


def _world_config(
    base: RunConfig | None, ref: Any, concepts: list[str], device: str, finetune_size: int, concept_size: int,
    data_seed: int, samples: int, steps: int, guidance: float | None, seed: int,
) -> RunConfig:  # fmt: skip
    """The world's settings: `base` (from --config/--set) with this command's model, concepts, data and sampler."""
    base = base or RunConfig()
    data = base.model_dump(mode="json", exclude_unset=True)
    data.setdefault("model", {}).update({"source": ref.pipeline, "device": device})
    data["concepts"] = concepts
    d = data.setdefault("data", {})
    d.setdefault("finetune_size", finetune_size)
    d.setdefault("concept_size", concept_size)
    d.setdefault("seed", data_seed)
    e = data.setdefault("evaluation", {})
    for key, value in (("samples_per_prompt", samples), ("steps", steps), ("guidance", guidance), ("seed", seed)):
        e.setdefault(key, value)
    return build_config(data)
