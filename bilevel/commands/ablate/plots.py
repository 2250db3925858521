"""PNG plots of a grid: concept rate and retained accuracy over training steps per method, a scatter of concept
rate against quality per cell, and (attacked grids) the concept rate along each relearning attack. matplotlib with
the Agg backend (no screen needed)."""

from __future__ import annotations

from pathlib import Path

from bilevel.commands.ablate.results import Aggregate, Record
from bilevel.core.stats import rate_over_seeds

METHOD_COLOURS = {
    "teacher": "#444444",
    "pruned only": "#999999",
    "DDPM only": "#8c564b",
    "KD only": "#d62728",
    "bilevel": "#1f77b4",
    "two-stage": "#ff7f0e",
}
PRUNER_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_series(records: list[Record]) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """pruner -> line label -> [(step, concept rate, retained)], averaged over seeds.

    KD and bilevel lines start (step 0) at the pruned model; the two-stage line is drawn after the KD stage it
    starts from (x offset by the KD steps, first point the KD student), so every line's x is total training steps.
    """
    pruned = {(r.pruner, r.seed): r for r in records if r.arm == "pruned"}
    kd = {(r.pruner, r.seed): r for r in records if r.arm == "kd"}
    per_seed: dict[tuple[str, str], list[list[tuple[float, float, float]]]] = {}
    for r in records:
        points = [
            (float(h["step"]), float(h["eval_concept_rate"]), float(h["eval_retained_accuracy"]))
            for h in r.history
            if "eval_concept_rate" in h and "eval_retained_accuracy" in h
        ]
        if not points:
            continue
        if r.arm == "two-stage" and (r.pruner, r.seed) in kd:
            source = kd[(r.pruner, r.seed)]
            offset = float(source.history[-1]["step"]) if source.history else 0.0
            points = [(offset, source.metrics["concept_rate"], source.metrics["retained_accuracy"])] + [
                (s + offset, c, q) for s, c, q in points
            ]
        elif (r.pruner, r.seed) in pruned:
            start = pruned[(r.pruner, r.seed)]
            points = [(0.0, start.metrics["concept_rate"], start.metrics["retained_accuracy"])] + points
        label = " / ".join([r.method] + [p for p in (r.unlearner, r.solver) if p != "-"])
        per_seed.setdefault((r.pruner, label), []).append(points)
    series: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for (pruner, label), runs in per_seed.items():
        length = min(len(p) for p in runs)
        mean = [
            (runs[0][i][0], sum(p[i][1] for p in runs) / len(runs), sum(p[i][2] for p in runs) / len(runs))
            for i in range(length)
        ]
        series.setdefault(pruner, {})[label] = mean
    return series


_SETTING_PALETTE = ["#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#bcbd22", "#e377c2", "#8c564b", "#7f7f7f"]
_settings: dict[str, str] = {}


def _setting_colour(setting: str) -> str:
    """The same unlearner/solver keeps its colour across pruners and across both of its methods."""
    return _settings.setdefault(setting, _SETTING_PALETTE[len(_settings) % len(_SETTING_PALETTE)])


def plot_curves(records: list[Record], path: Path) -> Path | None:
    series = curve_series(records)
    if not series:
        return None
    plt = _pyplot()
    pruners = list(series)
    fig, axes = plt.subplots(len(pruners), 2, figsize=(12, 3.6 * len(pruners)), squeeze=False)
    for row, pruner in enumerate(pruners):
        for label, points in series[pruner].items():
            method, *setting = label.split(" / ")
            style = "--" if method == "two-stage" else "-"
            # one colour per unlearner/solver setting (bilevel solid, its two-stage dashed); baselines by method
            colour = _setting_colour(" / ".join(setting)) if setting else METHOD_COLOURS.get(method)
            steps = [p[0] for p in points]
            for col, index in ((0, 1), (1, 2)):
                axes[row][col].plot(steps, [p[index] for p in points], style, marker=".", color=colour, label=label)
        axes[row][0].set_title(f"{pruner}: concept rate (lower is better)")
        axes[row][1].set_title(f"{pruner}: retained accuracy (higher is better)")
        for ax in axes[row]:
            ax.set_xlabel("training steps (two-stage: after its KD stage)")
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
        axes[row][1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_scatter(aggregates: list[Aggregate], path: Path) -> Path | None:
    """One panel per pruner (the teacher in each): colour = method, marker = unlearner / solver, error bars = std."""
    points = [a for a in aggregates if "concept_rate" in a.mean and "retained_accuracy" in a.mean]
    if not points:
        return None
    plt = _pyplot()
    pruners = list(dict.fromkeys(a.pruner for a in points if a.pruner != "-")) or ["-"]
    settings = list(dict.fromkeys(_setting(a) for a in points if _setting(a)))
    fig, axes = plt.subplots(1, len(pruners), figsize=(5.2 * len(pruners), 5), squeeze=False)
    for ax, pruner in zip(axes[0], pruners):
        for a in points:
            if a.pruner not in (pruner, "-"):
                continue
            setting = _setting(a)
            marker = "*" if a.pruner == "-" else PRUNER_MARKERS[settings.index(setting) + 1] if setting else "o"
            ax.errorbar(
                a.mean["retained_accuracy"], a.mean["concept_rate"],
                xerr=a.std.get("retained_accuracy", 0.0), yerr=a.std.get("concept_rate", 0.0),
                fmt=marker, color=METHOD_COLOURS.get(a.method, "black"), capsize=3, markersize=9, alpha=0.85,
            )  # fmt: skip
        ax.set_title(f"{pruner}: bottom right is best")
        ax.set_xlabel("retained accuracy (higher is better)")
        ax.set_xlim(-0.03, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("concept rate (lower is better)")
    handles = [
        plt.Line2D([], [], color=c, marker="o", linestyle="", label=m)
        for m, c in METHOD_COLOURS.items()
        if any(a.method == m for a in points)
    ] + [
        plt.Line2D([], [], color="black", marker=PRUNER_MARKERS[i + 1], linestyle="", label=s)
        for i, s in enumerate(settings)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _setting(a: Aggregate) -> str:
    return " / ".join(p for p in (a.unlearner, a.solver) if p != "-")


#: a relearning line: (attack step, mean concept rate, band low, band high); the band is None where unknown
RelearnPoint = tuple[float, float, float | None, float | None]
_TWO_STAGE_STYLES = {"two-stage": "--", "two-stage (tuned)": ":"}


def relearning_series(records: list[Record]) -> dict[str, dict[str, dict[str, list[RelearnPoint]]]]:
    """attack -> pruner -> line label -> points, for the attacks that relearn (`relearn-*`), averaged over seeds.

    The band is the run's Wilson interval for one seed and a t-interval of the per-seed rates for several, at least
    the samples' own uncertainty (as the tables' rates). The teacher (no pruner) is drawn in every pruner's panel."""
    pruners = list(dict.fromkeys(r.pruner for r in records if r.pruner != "-")) or ["-"]
    runs: dict[tuple[str, str, str], list[list[dict]]] = {}
    for r in records:
        for attack, curve in r.curves.items():
            if not attack.startswith("relearn") or len(curve) < 2:
                continue
            label = " / ".join([r.method] + [p for p in (r.unlearner, r.solver) if p != "-"])
            for pruner in pruners if r.pruner == "-" else [r.pruner]:
                runs.setdefault((attack, pruner, label), []).append(curve)
    series: dict[str, dict[str, dict[str, list[RelearnPoint]]]] = {}
    for (attack, pruner, label), curves in runs.items():
        series.setdefault(attack, {}).setdefault(pruner, {})[label] = _mean_points(curves)
    return series


def _mean_points(curves: list[list[dict]]) -> list[RelearnPoint]:
    points: list[RelearnPoint] = []
    for i in range(min(len(c) for c in curves)):
        rates = [float(c[i]["concept_rate"]) for c in curves]
        if len(curves) > 1:
            known = [c[i].get("interval") for c in curves]
            mean, low, high = rate_over_seeds(rates, known if all(known) else None)
            points.append((float(curves[0][i]["step"]), mean, low, high))
        else:
            interval = curves[0][i].get("interval")
            low, high = (float(interval[0]), float(interval[1])) if interval else (None, None)
            points.append((float(curves[0][i]["step"]), rates[0], low, high))
    return points


def plot_relearning(records: list[Record], path: Path) -> Path | None:
    """Concept rate vs relearning steps: one panel per relearning attack (columns) and pruner (rows), one line per
    method and setting (bilevel solid, two-stage dashed, tuned dotted), 95% band shaded; None without curves."""
    series = relearning_series(records)
    if not series:
        return None
    plt = _pyplot()
    attacks = list(series)
    pruners = list(dict.fromkeys(p for by_pruner in series.values() for p in by_pruner))
    fig, axes = plt.subplots(len(pruners), len(attacks), figsize=(6 * len(attacks), 3.8 * len(pruners)),
                             squeeze=False)  # fmt: skip
    for row, pruner in enumerate(pruners):
        for col, attack in enumerate(attacks):
            ax = axes[row][col]
            for label, points in series[attack].get(pruner, {}).items():
                _relearning_line(ax, label, points)
            ax.set_title(f"{pruner}: {attack} (lower is more robust)")
            ax.set_xlabel("relearning steps")
            ax.set_ylabel("concept rate (95% interval)")
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _relearning_line(ax, label: str, points: list[RelearnPoint]) -> None:
    method, *setting = label.split(" / ")
    colour = _setting_colour(" / ".join(setting)) if setting else METHOD_COLOURS.get(method)
    steps = [p[0] for p in points]
    line = ax.plot(steps, [p[1] for p in points], _TWO_STAGE_STYLES.get(method, "-"), marker=".", color=colour,
                   label=label)[0]  # fmt: skip
    banded = [p for p in points if p[2] is not None and p[3] is not None]
    if len(banded) > 1:
        ax.fill_between([p[0] for p in banded], [p[2] for p in banded], [p[3] for p in banded], alpha=0.12,
                        color=line.get_color(), linewidth=0)  # fmt: skip
