"""`bilevel attack`: is a suppressed concept really gone? Runs attack plugins (other names, learned prompt
embeddings, relearning) on any model a run accepts and reports the concept rate under each attack with its 95%
interval, as a table, attacks.json and a PNG of the concept rate along each attack's steps."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bilevel.core.attack import Attack, AttackConfig, AttackResult
from bilevel.core.config import RunConfig, apply_override
from bilevel.core.errors import BilevelError
from bilevel.core.stats import format_rate
from bilevel.runtime.report import console, results_table, write_json
from bilevel.worlds.concept_rate import measure_concept_rate
from bilevel.worlds.models import ModelRef, load_unet
from bilevel.worlds.resolve import build_world

#: the world a set of attacks needs, narrowest first (a world built for a later purpose holds the earlier ones' data)
PURPOSES = ("eval", "unlearn", "run")


def split_attack_sets(assignments: list[str], selected: list[str], every: list[str]) -> dict[str, dict[str, Any]]:
    """Attack options from --set: `NAME.key=value` sets one attack's option, `key=value` every selected attack that
    has the option (an option none of them has is a one-line error, as is a name that is not selected)."""
    from bilevel.registry import get_registry

    reg = get_registry()
    options: dict[str, dict[str, Any]] = {name: {} for name in selected}
    for assignment in assignments:
        key = assignment.split("=", 1)[0].strip()
        head = key.split(".", 1)[0]
        if "." in key and head in every:
            if head not in selected:
                raise BilevelError(f"--set {key}: attack {head!r} is not selected (selected: {', '.join(selected)})")
            apply_override(options[head], assignment.strip()[len(head) + 1 :])
            continue
        takers = [n for n in selected if key in reg.get("attack", n).cls.Config.model_fields]
        if not takers:
            raise BilevelError(
                f"--set {key}: no selected attack has this option (selected: {', '.join(selected)}); give "
                "NAME.option=value, or a world setting (model.*, world.*, data.*, evaluation.*)"
            )
        for name in takers:
            apply_override(options[name], assignment.strip())
    return options


def plot_curves(results: list[AttackResult], path: Path) -> bool:
    """Concept rate vs attack steps (95% band), one line per attack and concept; False when none has a curve."""
    curves = [r for r in results if len(r.curve) > 1]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in curves:
        steps = [p.step for p in r.curve]
        line = ax.plot(steps, [p.concept_rate for p in r.curve], marker="o", label=f"{r.attack} ({r.concept})")[0]
        lows, highs = [p.interval[0] for p in r.curve], [p.interval[1] for p in r.curve]
        ax.fill_between(steps, lows, highs, alpha=0.15, color=line.get_color())
    ax.set_xlabel("attack steps")
    ax.set_ylabel("concept rate (95% interval)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def attack_model(
    ref: ModelRef,
    config: RunConfig,
    names: list[str],
    assignments: list[str],
    out: Path | None,
    *,
    explicit: bool,
    label: str | None = None,
) -> dict[str, Any]:
    """Run the named attacks on the model for each of config.concepts. An attack that cannot run on this model
    (say, no aliases and no prompt file) is an error when named, and a skipped row when it ran by default."""
    from bilevel.registry import get_registry

    reg = get_registry()
    every = reg.names("attack")
    for name in names:
        reg.get("attack", name)  # unknown name: one line, before anything is loaded
    options = split_attack_sets(assignments, names, every)
    attacks: list[Attack] = [reg.create("attack", n, options[n]) for n in names]
    base = AttackConfig(**{k: v for k, v in options[names[0]].items() if k in AttackConfig.model_fields}) if (
        names) else AttackConfig()  # fmt: skip
    purpose = max((a.purpose for a in attacks), key=PURPOSES.index, default="eval")
    world = build_world(config, purpose)
    unet, _ = load_unet(ref, world.teacher, config.model.device)
    results: list[AttackResult] = []
    skipped: list[dict[str, str]] = []
    rows: list[dict[str, Any]] = []
    no_attack: list[dict[str, Any]] = []
    for concept in config.concepts:
        plain = measure_concept_rate(world, unet, concept, config.evaluation, base.samples, base.sampler_steps)
        no_attack.append({"concept": concept, "concept_rate": plain.rate, "interval": list(plain.interval),
                          "samples": plain.samples})  # fmt: skip
        rows.append(
            {
                "attack": "none",
                "concept": concept,
                "rate": format_rate(plain.rate, plain.interval),
                "n": plain.samples,
                "reached": "-",
                "seconds": "-",
                "what": "the concept prompts as given",
            }
        )
        for attack in attacks:
            start = time.perf_counter()
            try:
                result = attack.run(unet, world, concept, config.evaluation)
            except BilevelError as exc:
                if explicit:
                    raise
                skipped.append({"attack": attack.name, "concept": concept, "reason": str(exc)})
                console.print(f"[yellow]skipped[/] {attack.name} ({concept}): {exc}")
                continue
            seconds = time.perf_counter() - start
            results.append(result)
            rows.append({
                "attack": attack.name, "concept": concept, "rate": format_rate(result.concept_rate, result.interval),
                "n": result.samples, "reached": "-" if result.reached_at is None else str(result.reached_at),
                "seconds": f"{seconds:.0f}", "what": result.note or summary(result),
            })  # fmt: skip
    columns = [("attack", "attack"), ("concept", "concept"), ("rate", "concept rate [95%]"), ("n", "samples"),
               ("reached", "reached at"), ("what", "what it used"), ("seconds", "s")]  # fmt: skip
    name = label or str(ref.student or ref.pipeline)
    console.print(results_table(f"attacks on {name} ({world.name} world)", rows, columns))
    report = {
        "model": name,
        "pipeline": ref.pipeline,
        "world": world.name,
        "concepts": list(config.concepts),
        "no_attack": no_attack,
        "results": [r.model_dump(mode="json") for r in results],
        "skipped": skipped,
        "options": {a.name: a.config.model_dump(mode="json") for a in attacks},
        "evaluation": {"guidance": config.evaluation.guidance, "seed": config.evaluation.seed},
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "attacks.json", report)
        plotted = plot_curves(results, out / "relearning.png")
        console.print(f"attacks written to {out}" + (" (curves: relearning.png)" if plotted else ""))
    return report


def summary(result: AttackResult) -> str:
    """One short cell: the variant or checkpoint behind the reported rate."""
    used = result.used
    if "best" in used:
        return str(used["best"])
    if "best_at" in used:
        return f"best at step {used['best_at']} of {used.get('steps', used.get('steps_max'))}"
    if "steps" in used:
        return f"{used['steps']} steps"
    return ""
