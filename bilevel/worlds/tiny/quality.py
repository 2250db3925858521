"""How well a tiny-world model renders what prompts ask for, under every name: the teacher's model-card figures.

Per colour and name (`a red circle`, `a crimson circle`, shapes cycled): share rendered in the asked colour; the
style asked under both names (striped share); what colourless prompts (`a circle`) render, per colour; how often
plain prompts come out striped unasked (the teacher was trained to, on a quarter of them).

    python -m bilevel.worlds.tiny.quality bilevel/assets/tiny-teacher --samples 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from pydantic import BaseModel

from bilevel.core.stats import wilson_interval
from bilevel.diffusion.sampling import sample_images
from bilevel.worlds.tiny.detector import NONE, detect, detect_stripes
from bilevel.worlds.tiny.evaluation import PromptGroups
from bilevel.worlds.tiny.palette import ALIASES, SHAPES, STYLES, colour_names, prompt_for


class NameQuality(BaseModel):
    """Rates with their 95% Wilson intervals, by prompt group."""

    samples: int
    steps: int
    guidance: float
    seed: int
    per_name: dict[str, float]  # colour word -> rendered in that colour
    per_name_ci: dict[str, tuple[float, float]]
    style_asked: dict[str, float]  # style word -> striped share
    unasked_stripes: float  # striped share of every plain colour prompt
    colourless: dict[str, float]  # share of `a <shape>` samples per detected colour (and none)

    @property
    def min_rate(self) -> float:
        return min(self.per_name.values())


@torch.no_grad()
def measure_names(
    pipe, *, samples: int = 64, steps: int = 25, guidance: float = 1.0, seed: int = 1234
) -> NameQuality:
    words = [w for c in colour_names() for w in (c, ALIASES[c])]
    groups = PromptGroups({})
    for w in words:
        groups.add(w, lambda i, w=w: prompt_for(w, SHAPES[i % 3]), samples)
    for w in (w for pair in STYLES.items() for w in pair):
        groups.add(f"style:{w}", lambda i, w=w: prompt_for(None, SHAPES[i % 3], w), samples)
    groups.add("colourless", lambda i: prompt_for(None, SHAPES[i % 3]), samples)
    prompts = groups.flat()
    cfg = pipe.unet.config
    images = sample_images(
        pipe.unet, dict(pipe.scheduler.config), pipe.encode_prompts(prompts), pipe.encode_prompts([""]),
        steps=steps, guidance=guidance, generator=torch.Generator().manual_seed(seed),
        channels=cfg.in_channels, size=cfg.sample_size,
    )  # fmt: skip
    labels, stripes = detect(images).labels, detect_stripes(images)
    colour_of = {w: c for c in colour_names() for w in (c, ALIASES[c])}
    rows = {key: range(sl.start, sl.stop) for key, sl in groups.slices().items()}
    hits = {w: sum(labels[i] == colour_of[w] for i in rows[w]) for w in words}
    plain = [i for w in words for i in rows[w]]
    less = [labels[i] for i in rows["colourless"]]
    return NameQuality(
        samples=samples, steps=steps, guidance=guidance, seed=seed,
        per_name={w: hits[w] / samples for w in words},
        per_name_ci={w: wilson_interval(hits[w], samples) for w in words},
        style_asked={k.split(":", 1)[1]: sum(stripes[i] for i in r) / samples for k, r in rows.items() if k.startswith("style:")},
        unasked_stripes=sum(stripes[i] for i in plain) / len(plain),
        colourless={c: less.count(c) / samples for c in [*colour_names(), NONE]},
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    from bilevel.worlds.tiny.pipeline import TinyTextToImagePipeline

    pipe = TinyTextToImagePipeline.from_pretrained(str(args.pipeline))
    quality = measure_names(pipe, samples=args.samples, steps=args.steps, guidance=args.guidance, seed=args.seed)
    print(json.dumps(quality.model_dump(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
