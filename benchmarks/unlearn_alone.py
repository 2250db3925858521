"""Acceptance measurement: each unlearner alone on the shipped tiny teacher (no pruning, no lower level).

For every unlearner: concept rate before/after (target <= 0.1) and retained-accuracy drop (target <= 5 points),
evaluate_tiny(samples_per_colour=32, 25 DDIM steps, guidance 2, seed 1234) with the same noise before and after.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unlearn_alone.py --out /tmp/unlearn-alone
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/unlearn_alone.py --only salun --set salun.alpha=1.0
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from bilevel.commands.unlearn import RECOMMENDED, unlearn_model

TARGET_RATE = 0.1
TARGET_DROP = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/unlearn-alone"))
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--concepts", nargs="+", default=["purple"])
    parser.add_argument("--only", nargs="+", default=list(RECOMMENDED), help="unlearners to measure")
    parser.add_argument("--steps", type=int, default=None, help="override every unlearner's recommended steps")
    parser.add_argument("--lr", type=float, default=None, help="override every unlearner's recommended lr")
    parser.add_argument("--set", action="append", default=[], help="unlearner.option=value (YAML value)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    extra: dict[str, dict[str, Any]] = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        name, _, option = key.partition(".")
        extra.setdefault(name, {})[option] = yaml.safe_load(raw)

    rows = []
    for name in args.only:
        rec = RECOMMENDED[name]
        steps = args.steps or rec.steps
        lr = args.lr or rec.lr
        options = {**rec.options, **extra.get(name, {})}
        t0 = time.perf_counter()
        res = unlearn_model(
            args.model,
            name,
            options,
            args.concepts,
            steps,
            lr,
            args.out / name,
            batch_size=rec.batch_size,
            seed=args.seed,
        )
        drop = res.before["retained_accuracy"] - res.after["retained_accuracy"]
        row = {
            "unlearner": name, "steps": steps, "lr": lr, "batch_size": rec.batch_size, "options": options,
            "concept_rate_before": res.before["concept_rate"], "concept_rate_after": res.after["concept_rate"],
            "retained_before": res.before["retained_accuracy"], "retained_after": res.after["retained_accuracy"],
            "retained_drop_points": 100 * drop, "collateral_before": res.before["collateral"],
            "collateral_after": res.after["collateral"], "train_seconds": res.after["train_seconds"],
            "wall_seconds": time.perf_counter() - t0,
            "meets_target": res.after["concept_rate"] <= TARGET_RATE and drop <= TARGET_DROP,
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    print(
        f"{'unlearner':<18}{'rate before':>12}{'rate after':>12}{'ret before':>12}{'ret after':>12}{'drop pts':>10}{'ok':>5}"
    )
    for r in rows:
        print(
            f"{r['unlearner']:<18}{r['concept_rate_before']:>12.3f}{r['concept_rate_after']:>12.3f}"
            f"{r['retained_before']:>12.3f}{r['retained_after']:>12.3f}{r['retained_drop_points']:>10.1f}{r['meets_target']!s:>5}"
        )


if __name__ == "__main__":
    main()
