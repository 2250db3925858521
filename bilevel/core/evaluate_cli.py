"""`bilevel eval`: evaluate the tiny teacher, a pipeline folder or a saved student on the tiny world."""

from __future__ import annotations

from pathlib import Path

from .modelinfo import model_stats
from .models import load_model
from .report import console, image_grid, results_table, write_json
from .tinyworld.evaluation import evaluate_tiny
from .tinyworld.world import TinyWorld


def evaluate_model(
    model: str, concepts: list[str], samples: int, steps: int, guidance: float, seed: int, out: Path | None
) -> dict:
    pipe, unet, _ = load_model(model)
    world = TinyWorld.build(pipe, concepts, finetune_size=max(512, samples * 8), concept_size=64, seed=0)
    result = evaluate_tiny(unet, world, samples_per_colour=samples, steps=steps, guidance=guidance, seed=seed)
    stats = model_stats(unet)
    row = {"model": model, **stats.to_json(), **result.metrics}
    columns = [("model", "model"), ("params", "params"), ("macs", "MACs"), ("latency_ms", "latency ms")]
    columns += [(f"concept_rate/{c}", f"{c} rate") for c in concepts]
    columns += [("retained_accuracy", "retained acc"), ("collateral", "collateral"), ("swd", "SWD")]
    console.print(results_table("evaluation", [row], columns))
    console.print("per colour: " + ", ".join(f"{c} {v:.2f}" for c, v in result.per_colour.items()))
    report = {
        "model": model,
        "concepts": concepts,
        "sampler": {"name": "DDIM", "steps": steps, "guidance": guidance, "seed": seed, "samples_per_colour": samples},
        **row,
        "per_colour": result.per_colour,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "report.json", report)
        image_grid(result.images, out / "grid.png")
        console.print(f"report written to {out}")
    return report
