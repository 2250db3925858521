"""`bilevel run --robustness`: every trained arm (and the teacher) under every attack, as one table and
robustness.json: is the suppression erasure, or does the concept come back under another name, a learned prompt
embedding or further fine-tuning?"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bilevel.core.config import RunConfig
from bilevel.core.stats import format_rate
from bilevel.runtime.io import atomic_write_text
from bilevel.runtime.report import console, results_table, write_json
from bilevel.worlds.models import ModelRef

ROBUSTNESS_FILE = "robustness.json"  # <run>/robustness.json: the concept rate of every arm under every attack

#: arms with nothing to attack: the pruned student before training renders no concept to begin with
SKIPPED_ARMS = ("pruned",)


def attack_arms(out: Path, config: RunConfig, arms: list[str]) -> dict[str, Any]:
    """Attack the teacher and each trained student of the run in `out` (students/<arm>); an arm whose attacks are
    already in robustness/<arm>/attacks.json (an interrupted run resumed) is read back, not attacked again."""
    from bilevel.commands.ablate.tables import markdown_table
    from bilevel.commands.attack import attack_model
    from bilevel.registry import get_registry

    names = config.robustness.attacks or get_registry().names("attack")
    reports: dict[str, dict[str, Any]] = {}
    for arm in [a for a in arms if a not in SKIPPED_ARMS]:
        folder = out / "robustness" / arm
        done = folder / "attacks.json"
        if done.is_file():
            reports[arm] = json.loads(done.read_text())
            continue
        student = None if arm == "teacher" else out / "students" / arm
        ref = ModelRef(config.model.source, student)
        console.rule(f"robustness: {arm}")
        reports[arm] = attack_model(
            ref, config, list(names), list(config.robustness.options), folder, explicit=bool(config.robustness.attacks),
            label=arm,
        )  # fmt: skip
    table = robustness_rows(reports)
    columns = [("arm", "arm"), ("concept", "concept"), ("none", "no attack")] + [(n, n) for n in names]
    console.print(results_table("concept rate under attack [95%]", table, columns))
    summary = {"attacks": list(names), "rows": table, "reports": reports}
    write_json(out / ROBUSTNESS_FILE, summary)
    cells = [[str(row.get(key, "-")) for key, _ in columns] for row in table]
    atomic_write_text(out / "robustness.md", markdown_table([h for _, h in columns], cells) + "\n")
    return summary


def robustness_rows(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm and concept: the rate with no attack and under each attack, formatted with its interval;
    the numbers themselves stay in robustness.json's reports."""
    rows: list[dict[str, Any]] = []
    for arm, report in reports.items():
        for plain in report["no_attack"]:
            concept = plain["concept"]
            row: dict[str, Any] = {"arm": arm, "concept": concept}
            row["none"] = format_rate(plain["concept_rate"], tuple(plain["interval"]))
            for result in report["results"]:
                if result["concept"] == concept:
                    row[result["attack"]] = format_rate(result["concept_rate"], tuple(result["interval"]))
            for skipped in report.get("skipped", []):
                if skipped["concept"] == concept:
                    row[skipped["attack"]] = "skipped"
            rows.append(row)
    return rows

