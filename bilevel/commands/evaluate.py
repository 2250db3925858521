"""`bilevel eval`: evaluate any model a run accepts (tiny, a pipeline folder, a hub id, a student or an exported
pipeline) on its world: concept rates, retained accuracy, collateral, quality distance, params, MACs, latency."""

from __future__ import annotations

from pathlib import Path

from bilevel.compression.model_stats import model_stats
from bilevel.core.config import RunConfig
from bilevel.runtime.report import console, image_grid, results_table, write_json
from bilevel.worlds.models import ModelRef, load_unet
from bilevel.worlds.resolve import build_world


def evaluate_model(ref: ModelRef, config: RunConfig, out: Path | None, label: str | None = None) -> dict:
    """config: the world's settings and config.evaluation (samples, DDIM steps, guidance, seed); model.source is
    the pipeline the world is built from (the student, if any, replaces its UNet)."""
    world = build_world(config, "eval")
    unet, _ = load_unet(ref, world.teacher, config.model.device)
    result = world.evaluate(unet, config.evaluation)
    stats = model_stats(unet, repeats=config.evaluation.latency_repeats)
    name = label or str(ref.student or ref.pipeline)
    row = {"model": name, **stats.to_json(), **result.metrics}
    columns = [("model", "model"), ("params", "params"), ("macs", "MACs"), ("latency_ms", "latency ms")]
    columns += [(f"concept_rate/{c}", f"{c} rate") for c in config.concepts]
    columns += [(f"alias_rate/{c}", f"{c} 2nd name") for c in config.concepts]
    columns += [(f"unasked_rate/{c}", f"{c} unasked") for c in config.concepts]
    columns += [("retained_accuracy", "retained acc"), ("collateral", "collateral")]
    columns += [("quality_distance", world.quality_metric.upper()), ("clip_score", "CLIP")]
    console.print(results_table(f"evaluation ({world.name} world)", [row], [c for c in columns if row.get(c[0]) is not None]))
    console.print("rendered as asked: " + ", ".join(f"{g} {v:.2f}" for g, v in result.per_group.items()))
    ev = config.evaluation
    report = {
        "model": name,
        "pipeline": ref.pipeline,
        "world": world.name,
        "concepts": list(config.concepts),
        "sampler": {"name": "DDIM", "steps": ev.steps, "guidance": "world default" if ev.guidance is None else ev.guidance, "seed": ev.seed,
                    "samples_per_group": ev.samples_per_prompt, "concept_samples": ev.concept_sample_count()},
        **row,
        "per_group": result.per_group,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "report.json", report)
        image_grid(result.images, out / "grid.png")
        console.print(f"report written to {out}")
    return report
