"""Markdown tables of finished digits-world runs (docs/digits-world.md), every rate with its 95% interval.

One table per concept: teacher, pruned, DDPM-only and KD-only (shared by every unlearner: same seed, same arms),
then two-stage and bilevel per unlearner. One seed (or identical rates on every seed): the Wilson interval of the
rate; several seeds: the mean and a t-interval of the per-seed rates, widened to at least the samples' own
uncertainty (from each seed's Wilson interval in its metrics.json).

    python -m bilevel.plugins.worlds.digits.tables runs/digits/*/ [--grid docs/img/digits-seven.png --concept seven]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from bilevel.core.stats import format_rate, rate_over_seeds

RATES = (("concept_rate", "concept rate"), ("retained_accuracy", "retained acc"), ("collateral", "collateral"))
SHARED = ("teacher", "pruned", "ddpm", "kd")
LABELS = {"teacher": "teacher", "pruned": "pruned, no training", "ddpm": "DDPM-only", "kd": "KD-only"}


def load_runs(folders: list[Path]) -> dict[str, dict[str, dict[int, dict]]]:
    """concept -> row label -> seed -> metrics row, from every folder with a metrics.json."""
    table: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for folder in folders:
        if not (folder / "metrics.json").is_file():
            continue
        config = json.loads((folder / "config.json").read_text())
        concept, seed = config["concepts"][0], config["training"]["seed"]
        unlearner = config["unlearner"]["name"]
        for row in json.loads((folder / "metrics.json").read_text())["rows"]:
            arm = row["model"]
            label = arm if arm in SHARED else f"{arm} ({unlearner})"
            table[concept][label][seed] = row
    return table


def cell(rows: dict[int, dict], key: str) -> str:
    values = [r[key] for r in rows.values() if r.get(key) is not None]
    if not values:
        return "-"
    if len(set(values)) == 1:  # one seed, or an arm the training seed does not touch (teacher, pruned): Wilson
        return format_rate(values[0], next(iter(rows.values())).get(f"{key}_ci"))
    known = [r.get(f"{key}_ci") for r in rows.values() if r.get(key) is not None]
    mean, low, high = rate_over_seeds(values, known if all(known) else None)
    return format_rate(mean, (low, high))


def markdown(table: dict[str, dict[str, dict[int, dict]]]) -> str:
    out = []
    for concept, arms in table.items():
        any_row = next(iter(next(iter(arms.values())).values()))
        n = any_row.get("concept_samples")
        out.append(f"### Concept `{concept}` ({n} concept samples, {any_row.get('samples')} per other class)\n")
        out.append("| model | seeds | " + " | ".join(h for _, h in RATES) + " | FID-digits |")
        out.append("|---" * (len(RATES) + 3) + "|")
        order = [a for a in SHARED if a in arms] + sorted(a for a in arms if a not in SHARED)
        for label in order:
            rows = arms[label]
            fid = [r["quality_distance"] for r in rows.values()]
            fid_text = f"{sum(fid) / len(fid):.1f}"
            seeds = ",".join(str(s) for s in sorted(rows))
            cells = " | ".join(cell(rows, key) for key, _ in RATES)
            out.append(f"| {LABELS.get(label, label)} | {seeds} | {cells} | {fid_text} |")
        out.append("")
    return "\n".join(out)


def concept_grid(folders: list[Path], concept: str, path: Path, columns: int = 16) -> None:
    """One PNG row per arm: its first samples for the concept prompts (word and numeral alternating), seed 0 runs."""
    from bilevel.plugins.worlds.digits.data import CLASS_NAMES, parse_digit
    from bilevel.toolkit import image_grid, load_tensors

    group = CLASS_NAMES[parse_digit(concept)]
    rows = {}
    for folder in folders:
        config_file = folder / "config.json"
        if not (folder / "metrics.json").is_file() or not config_file.is_file():
            continue
        config = json.loads(config_file.read_text())
        if config["concepts"][0] != concept or config["training"]["seed"] != 0:
            continue
        for images in sorted((folder / "rows").glob("*.images.safetensors")):
            arm = images.name.removesuffix(".images.safetensors")
            label = arm if arm in SHARED else f"{arm} ({config['unlearner']['name']})"
            rows[LABELS.get(label, label)] = load_tensors(images)[group][:columns]
    order = [LABELS[a] for a in SHARED if LABELS[a] in rows] + sorted(k for k in rows if k not in LABELS.values())
    image_grid({k: rows[k] for k in order}, path, columns=columns, label_width=190)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Markdown tables of digits-world runs.")
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (bilevel run --model digits --out ...)")
    parser.add_argument("--grid", type=Path, help="also write a PNG of every arm's concept samples (seed 0)")
    parser.add_argument("--concept", default="seven", help="the concept the grid shows")
    args = parser.parse_args(argv)
    print(markdown(load_runs(args.runs)))
    if args.grid:
        concept_grid(args.runs, args.concept, args.grid)


if __name__ == "__main__":
    main()
