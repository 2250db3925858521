"""Ship a trained digits teacher: copy its pipeline folder into the package, measure it, write its model card.

python -m bilevel.plugins.worlds.digits.ship runs/digits-teacher --guidance 2
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from bilevel.plugins.worlds.digits.data import CLASS_NAMES
from bilevel.plugins.worlds.digits.quality import Quality, measure_quality
from bilevel.toolkit import atomic_write_text, image_grid
from bilevel.worlds.models import load_tiny_pipeline

SHIPPED_TEACHER = Path(__file__).resolve().parents[3] / "assets" / "digits-teacher"


def ship_teacher(
    run: Path,
    dest: Path = SHIPPED_TEACHER,
    *,
    guidances: list[float],
    samples: int = 64,
    steps: int = 25,
    cpu_seconds: float | None = None,
) -> list[Quality]:
    """Copy run/pipeline to dest (replacing it), measure every guidance, write quality.json, samples.png, README.md.

    cpu_seconds: the training's CPU time when training.json lacks it (a run measured from outside, e.g. with ps).
    """
    run, dest = Path(run), Path(dest)
    training = json.loads((run / "training.json").read_text())
    if cpu_seconds is not None:
        training["total_cpu_seconds"] = cpu_seconds
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run / "pipeline", dest)
    for f in dest.rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # safetensors writes 0600 files; package data must be readable by every user
    pipe = load_tiny_pipeline(str(dest))
    measured = [measure_quality(pipe, samples_per_class=samples, steps=steps, guidance=g) for g in guidances]
    results = [q for q, _ in measured]
    best = max(range(len(results)), key=lambda i: (results[i].min_rate, results[i].mean_rate))
    grid = {f"{d} ({CLASS_NAMES[d]})": imgs.expand(-1, 3, -1, -1) for d, imgs in enumerate(measured[best][1])}
    image_grid(grid, dest / "samples.png", columns=16)
    record = {"training": training["config"], "total_seconds": training["total_seconds"],
              "total_cpu_seconds": training.get("total_cpu_seconds"), "sessions": len(training["sessions"]),
              "sampler": {"steps": steps, "guidance": results[best].guidance},
              "quality": [q.model_dump() for q in results]}  # fmt: skip
    final_loss = training["sessions"][-1]["history"][-1]["loss"]
    atomic_write_text(dest / "quality.json", json.dumps(record, indent=1))
    params = sum(p.numel() for p in pipe.unet.parameters())
    atomic_write_text(dest / "README.md", model_card(training, results, results[best], params, final_loss))
    return results


def most_confused(q: Quality, k: int = 3) -> list[str]:
    """The k largest off-diagonal cells of the confusion: 'asked -> detected share'."""
    conf = torch.tensor(q.confusion)[:, : len(CLASS_NAMES)].clone()
    conf.fill_diagonal_(0)
    top = conf.flatten().topk(k)
    cells = [(int(i) // len(CLASS_NAMES), int(i) % len(CLASS_NAMES), float(v)) for v, i in zip(top.values, top.indices)]
    return [f"{CLASS_NAMES[a]} -> {CLASS_NAMES[b]} {v:.2f}" for a, b, v in cells if v > 0]


def model_card(training: dict, results: list[Quality], best: Quality, params: int, final_loss: float) -> str:
    c = training["config"]
    minutes = training["total_seconds"] / 60
    cpu = training.get("total_cpu_seconds")
    cpu_text = f"{cpu / 60:.0f} CPU-minutes, " if cpu else ""
    guidance_args = " ".join(f"{q.guidance:g}" for q in results)
    train_args = f"--steps {c['steps']} --seed {c['seed']}"
    note = guidance_note(results, best)
    header = "| guidance | " + " | ".join(CLASS_NAMES) + " | min | mean | none |"
    rule = "|---" * (len(CLASS_NAMES) + 4) + "|"
    rows = [
        f"| {q.guidance:g} | " + " | ".join(f"{v:.2f}" for v in q.per_class.values())
        + f" | {q.min_rate:.2f} | {q.mean_rate:.3f} | {q.none_rate:.3f} |"
        for q in results
    ]  # fmt: skip
    names = "; ".join(
        f"guidance {q.guidance:g}: " + ", ".join(f"`{t}` {r:.3f}" for t, r in q.per_name.items()) for q in results
    )
    confusions = "; ".join(f"guidance {q.guidance:g}: " + ", ".join(most_confused(q)) for q in results)
    q0 = results[0]
    return f"""# Digits-world teacher (shipped with bilevel)

A pixel-space `TinyTextToImagePipeline` (the tiny world's pipeline class, so the same loaders work) for the real
digits world: 8x8 one-channel images of handwritten digits (scikit-learn's `load_digits`, grey levels scaled to
[-1, 1]), prompts `a handwritten <word>` and `the digit <numeral>` (two names per class). Weights are safetensors only.

- UNet2DConditionModel shaped like Stable Diffusion's (as the tiny teacher): down (CrossAttn, CrossAttn, CrossAttn,
  plain), up (plain, CrossAttn, CrossAttn, CrossAttn), `UNetMidBlock2DCrossAttn`, 2 layers per block, channels
  {tuple(c["channels"])}, 4 GroupNorm groups, 2 attention heads, 1 input/output channel, {params:,} parameters.
- Text encoder: CLIPTextModel, 2 layers, width 64, word-level tokenizer over both class names (random init, frozen).
- Scheduler: DDIM, 1000 training steps, `squaredcos_cap_v2`, epsilon prediction.

## How it was trained

```bash
python -m bilevel.plugins.worlds.digits.teacher_training --out runs/digits-teacher {train_args}
python -m bilevel.plugins.worlds.digits.ship runs/digits-teacher --guidance {guidance_args}
```

Seed {c["seed"]}, {c["steps"]:,} steps, batch {c["batch_size"]}, AdamW lr {c["lr"]} ({c["warmup"]} warm-up steps,
cosine decay to {c["final_lr_fraction"]:g}x), {c["uncond_prob"]:.0%} prompt dropout (for classifier-free guidance), each
sample's prompt under a random one of its two names, EMA {c["ema_decay"]} (the shipped weights are the EMA), on the
real train split only (1,347 digits, all ten classes; the 450 held-out digits are never seen). Every step's draws
come from a generator seeded by (seed, step), so resuming is exact. {c["threads"]} CPU thread(s) on a 2-core machine
shared with other jobs: {cpu_text}{minutes:.0f} minutes wall-clock, {len(training["sessions"])} session(s); final
training loss (mean of the last 100 steps) {final_loss:.3f}.

## Measured quality

Share of samples the shipped digits detector (`bilevel/assets/digits-detector`, 0.98 held-out accuracy; `none`
counts as wrong) labels as the asked digit: {q0.samples_per_class} samples per class (names alternating),
DDIM {q0.steps} steps, generator seed {q0.seed}:

{header}
{rule}
{chr(10).join(rows)}

Per name: {names}.

Most confused (asked -> detected): {confusions}.

**Stated sampler: DDIM {best.steps} steps, guidance {best.guidance:g}** (the measured guidance with the highest
worst-class rate; also in `quality.json` under `sampler`): every class rendered as asked at >= {best.min_rate:.2f}, mean
{best.mean_rate:.3f}.

{note}`samples.png`: the first 16 samples per class with the stated sampler (word and numeral
prompts alternating).
"""


def guidance_note(results: list[Quality], best: Quality) -> str:
    """A warning when stronger guidance than the stated one clearly hurts (as the tiny world's default 2 can)."""
    worse = [q for q in results if q.guidance > best.guidance and q.mean_rate < best.mean_rate - 0.1]
    if not worse:
        return ""
    q = max(worse, key=lambda r: r.guidance)
    return (
        f"Stronger guidance hurts this teacher: at guidance {q.guidance:g} the mean rate falls to {q.mean_rate:.2f} "
        f"(none {q.none_rate:.2f}; the samples get grey, noisy backgrounds and heavy strokes the detector reads as "
        "other digits or none), so sample it with the stated sampler, not the tiny world's guidance 2.\n\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Copy a trained digits teacher into the package and measure it.")
    parser.add_argument("run", type=Path, help="the training folder (holding pipeline/ and training.json)")
    parser.add_argument("--dest", type=Path, default=SHIPPED_TEACHER)
    parser.add_argument("--guidance", type=float, nargs="+", default=[2.0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--cpu-minutes", type=float, default=None, help="training CPU time, if training.json lacks it")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cpu = args.cpu_minutes * 60 if args.cpu_minutes is not None else None
    for q in ship_teacher(args.run, args.dest, guidances=args.guidance, samples=args.samples, cpu_seconds=cpu):
        print(f"guidance {q.guidance:g}: min {q.min_rate:.3f} mean {q.mean_rate:.3f} {q.per_class}")


if __name__ == "__main__":
    main()
