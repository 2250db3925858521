"""The report's tables as text: Markdown (people), CSV (spreadsheets), JSON (scripts)."""

from __future__ import annotations

import csv
import io
from typing import Any

from bilevel.commands.ablate.grid import AblationGrid
from bilevel.commands.ablate.results import ATTACK, CLAIM, LEAK, METRICS, Aggregate, ClaimCheck, attack_key
from bilevel.core.stats import format_rate
from bilevel.runtime.report import _si

KEY_HEADERS = ["method", "pruner", "unlearner", "solver", "seeds"]


def shown_metrics(aggregates: list[Aggregate]) -> list[tuple[str, str, bool]]:
    """The metric columns some result has (a grid written before a metric existed does not show it as all '-')."""
    return [m for m in METRICS if any(m[0] in a.mean for a in aggregates)]


def result_headers(aggregates: list[Aggregate]) -> list[str]:
    return KEY_HEADERS + [h for _, h, _ in shown_metrics(aggregates)]


def format_value(key: str, value: float) -> str:
    if key in ("params", "macs"):
        return _si(round(value))
    if key == "latency_ms":
        return f"{value:.1f}"
    if key in ("train_seconds", "train_cpu_seconds"):
        return f"{value:.0f}"
    return f"{value:.3f}"


def mean_std(a: Aggregate, key: str) -> str:
    """A rate with its 95% interval ('0.00 [0.00, 0.03]'), other metrics as mean ± std over seeds."""
    if key not in a.mean:
        return "-"
    if key in a.interval:
        return format_rate(a.mean[key], a.interval[key])
    text = format_value(key, a.mean[key])
    return f"{text} ± {format_value(key, a.std[key])}" if a.n > 1 else text


def difference_text(d: tuple[float, float, float]) -> str:
    return f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"


def result_rows(aggregates: list[Aggregate]) -> list[list[str]]:
    shown = shown_metrics(aggregates)
    return [[a.method, a.pruner, a.unlearner, a.solver, str(a.n)] + [mean_std(a, k) for k, _, _ in shown] for a in aggregates]


def claim_rows(checks: list[ClaimCheck]) -> list[list[str]]:
    rows = []
    for c in checks:
        rows.append(
            [
                c.pruner,
                c.unlearner,
                c.bilevel_solver,
                c.two_stage.method,
                f"{mean_std(c.bilevel, 'concept_rate')} vs {mean_std(c.two_stage, 'concept_rate')}",
                f"{mean_std(c.bilevel, 'retained_accuracy')} vs {mean_std(c.two_stage, 'retained_accuracy')}",
                f"{c.suppresses_as_well} ({difference_text(c.concept_difference)})",
                f"{c.keeps_quality_as_well} ({difference_text(c.quality_difference)})",
                _kd_cell(c),
                f"**{c.verdict}**",
            ]
        )
    return rows


CLAIM_HEADERS = [
    "pruner", "unlearner", "solver", "against", "concept rate: bilevel vs two-stage", "retained: bilevel vs two-stage",
    "suppresses as well (bilevel - two-stage)", "keeps quality as well (two-stage - bilevel)",
    "KD-only concept / retained", "claim",
]  # fmt: skip


def _kd_cell(c: ClaimCheck) -> str:
    if c.kd is None:
        return "-"
    text = f"{mean_std(c.kd, 'concept_rate')} / {mean_std(c.kd, 'retained_accuracy')}"
    return text if c.informative else f"{text} (uninformative)"


CELL_HEADERS = ["cell", "arms", "state", "wall time", "note"]

ROBUSTNESS_TITLE = "Robustness (concept rate under attack, 95% interval)"
ROBUSTNESS_NOTE = (
    "Erased or dormant? Each cell's arms were attacked after training (`--robustness`, or `bilevel attack` into the "
    "cell's robustness/<arm>/). An attack's rate is the attacker's best over the variants or checkpoints it tried; "
    "*no attack* is the same measurement on the untouched model. Against each attack bilevel holds when, at 95% confidence, its concept rate under that attack "
    "is at most two-stage's plus the margin, fails when it is confidently higher, and is inconclusive otherwise."
)


def attack_names(aggregates: list[Aggregate]) -> list[str]:
    """Every attack measured in any aggregate, "none" (no attack) first, then in first-seen order."""
    names = dict.fromkeys(k.removeprefix(ATTACK) for a in aggregates for k in a.mean if k.startswith(ATTACK))
    return (["none"] if "none" in names else []) + [n for n in names if n != "none"]


def robustness_headers(names: list[str]) -> list[str]:
    return ["method", "pruner", "unlearner", "solver", "seeds"] + ["no attack" if n == "none" else n for n in names]


def robustness_rows(aggregates: list[Aggregate], names: list[str]) -> list[list[str]]:
    """One row per method and setting that was attacked, one column per attack."""
    return [
        [a.method, a.pruner, a.unlearner, a.solver, str(a.n)] + [mean_std(a, attack_key(n)) for n in names]
        for a in aggregates
        if any(attack_key(n) in a.mean for n in names)
    ]


def robustness_lines(checks: list[ClaimCheck], with_solver: bool = False) -> list[str]:
    """One line per claim check: bilevel vs that two-stage arm under each attack both were measured with."""
    lines = []
    for c in checks:
        setting = "/".join([c.pruner, c.unlearner] + ([c.bilevel_solver] if with_solver else []))
        verdicts = c.robustness
        parts = [f"{name}: {verdicts[name]} ({difference_text(d)})" for name, d in c.robustness_differences.items()]
        lines.append(f"bilevel vs {c.two_stage.method} ({setting}): " + ("; ".join(parts) or "no attack on both"))
    return lines


def robustness_section(grid: AblationGrid, aggregates: list[Aggregate], checks: list[ClaimCheck]) -> list[str]:
    """The report's robustness section as Markdown lines; empty when no cell was attacked."""
    names = attack_names(aggregates)
    if not names:
        return []
    lines = robustness_lines(checks, with_solver=len(grid.solvers) > 1)
    return [
        f"## {ROBUSTNESS_TITLE}",
        "",
        ROBUSTNESS_NOTE,
        "",
        markdown_table(robustness_headers(names), robustness_rows(aggregates, names)),
        "",
        *(["Bilevel minus two-stage under each attack, with its 95% interval:", ""] if lines else []),
        *(f"- {line}" for line in lines),
        "",
    ]


def claim_summary(checks: list[ClaimCheck], margin: float) -> str:
    if not checks:
        return "Not tested: the grid has no two-stage baseline (add `two-stage` to its baselines)."

    def tally(cs: list[ClaimCheck]) -> str:
        count = {v: sum(c.verdict == v for c in cs) for v in ("holds", "fails", "inconclusive")}
        return f"holds in {count['holds']}, fails in {count['fails']}, inconclusive in {count['inconclusive']} of {len(cs)}"

    text = (
        f"The claim {tally(checks)} comparisons (each setting against each two-stage arm run). Each part is decided from 95% intervals of the difference "
        f"(Newcombe's for one seed; over seeds a paired t-interval, never narrower than the samples' own uncertainty): it fails when bilevel is confidently worse than "
        f"two-stage, holds when it is at most {margin:g} worse at 95% confidence, and is inconclusive when the samples "
        "cannot tell."
    )
    informative = [c for c in checks if c.informative]
    if len(informative) < len(checks):
        text += (
            f" Only {len(informative)} of them can tell the methods apart: in the others KD alone shows the concept "
            f"in fewer than {LEAK:.0%} of samples or keeps under {LEAK:.0%} retained accuracy (nothing leaked to "
            f"suppress, or the pruned student never recovered); there the claim {tally(informative)}."
        )
    return text


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cell_rows(cells, status: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for cell in cells:
        s = status.get(cell.name, {})
        wall = float(s.get("wall_seconds", 0.0))
        rows.append([cell.name, ",".join(cell.arms), s.get("state", "pending"), _duration(wall), s.get("error") or ""])
    return rows


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def grid_summary(grid: AblationGrid, run_settings: dict[str, Any]) -> list[str]:
    return [
        (
            f"- pruners: {', '.join(grid.pruners)}; unlearners: {', '.join(grid.unlearners)}; "
            f"solvers: {', '.join(grid.solvers)}; seeds: {', '.join(map(str, grid.seeds))}"
        ),
        f"- baselines: {', '.join(grid.baselines)}",
        *(f"- {k}: {v}" for k, v in run_settings.items()),
    ]


def markdown_report(
    grid: AblationGrid,
    run_settings: dict[str, Any],
    aggregates: list[Aggregate],
    checks: list[ClaimCheck],
    cells,
    status: dict[str, dict[str, Any]],
    plots: dict[str, str],
) -> str:
    parts = [
        "# Ablation report",
        "",
        *grid_summary(grid, run_settings),
        "",
        "## The claim being tested",
        "",
        f"> {CLAIM}",
        "",
        claim_summary(checks, grid.claim_margin),
        "",
    ]
    if checks:
        parts += [markdown_table(CLAIM_HEADERS, claim_rows(checks)), ""]
    seeds = (
        "rates: mean and 95% interval over seeds (t, at least the samples' own); the rest: mean ± std over seeds"
        if len(grid.seeds) > 1
        else "one seed; rates with their 95% Wilson interval"
    )
    parts += [f"## Results ({seeds})", "", markdown_table(result_headers(aggregates), result_rows(aggregates)), ""]
    parts += robustness_section(grid, aggregates, checks)
    parts += ["## Plots", ""] + [f"![{name}]({rel})" for name, rel in plots.items()] + [""]
    parts += ["## Cells", "", markdown_table(CELL_HEADERS, cell_rows(cells, status)), ""]
    parts += [READING_GUIDE]
    return "\n".join(parts)


COLUMN_NOTES = [
    ("concept rate", ("share of samples for the concept's prompts that the detector labels as the concept "
                      "(lower: the concept is suppressed)")),
    ("retained acc.", "share of samples for every other concept's prompts labelled correctly (higher: quality kept)"),
    ("collateral", "the same for the two concepts nearest to the erased one (damage to neighbours shows here first)"),
    ("SWD", "sliced Wasserstein distance between samples and clean data (lower: closer to the data distribution)"),
    ("params / MACs / latency ms", "size and cost of the model (latency: batch 64, on the machine that ran the grid)"),
    ("train s", "training time of that arm; two-stage includes its KD stage, so it compares with bilevel at equal cost"),
    ("CPU s", "the same in CPU seconds of the arm's process, which other jobs on a shared machine do not inflate (on a GPU: host time only)"),
    ("robustness", ("concept rate under each attack (paraphrase, inversion, relearn-*), when the grid ran "
                    "--robustness; attack:<name> in report.csv and report.json")),
]  # fmt: skip
READING_GUIDE = "## Columns\n" + "\n".join(f"- **{term}**: {text}." for term, text in COLUMN_NOTES) + "\n"


def csv_report(aggregates: list[Aggregate]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    keys = [k for k, _, _ in METRICS] + [attack_key(n) for n in attack_names(aggregates)]
    writer.writerow(
        ["method", "pruner", "unlearner", "solver", "n"]
        + [f"{k}_{s}" for k in keys for s in ("mean", "std", "ci_low", "ci_high")]
    )
    for a in aggregates:
        values = []
        for k in keys:
            low, high = a.interval.get(k, ("", ""))
            values += [a.mean.get(k, ""), a.std.get(k, ""), low, high]
        writer.writerow([a.method, a.pruner, a.unlearner, a.solver, a.n] + values)
    return buf.getvalue()
