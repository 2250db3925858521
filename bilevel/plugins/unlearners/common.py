"""Helpers shared by the built-in unlearners: prompt remapping, noising, teacher-generated image sets
(cached as safetensors), PNG folders and parameter subsets."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn

from ...core.errors import BilevelError
from ...core.interfaces import UnlearnContext
from ...core.io import atomic_save_tensors
from ...core.losses import task_target
from ...core.sampling import sample_images

#: Keywords accepted by the prompt-remapping options besides a literal word.
FARTHEST = "farthest"
DROP = "drop"
RANDOM = "random"
_WORD = re.compile(r"^[A-Za-z][A-Za-z-]*$")


def check_word(value: str, option: str, keywords: tuple[str, ...]) -> str:
    """A remapping option is a keyword or one plain word (it replaces the concept word in each prompt)."""
    value = value.strip()
    if value in keywords or _WORD.match(value):
        return value
    raise ValueError(f"{option} must be one of {', '.join(keywords)} or a single word, got {value!r}")


def concept_in(prompt: str, concepts: list[str]) -> str:
    """The concept named in a prompt (longest match first); a BilevelError when it names none."""
    for c in sorted(concepts, key=len, reverse=True):
        if re.search(rf"(?<!\w){re.escape(c)}(?!\w)", prompt):
            return c
    raise BilevelError(
        f"prompt {prompt!r} names none of the concepts ({', '.join(concepts)}); give explicit target prompts instead"
    )


def replace_concept(prompt: str, concept: str, word: str | None) -> str:
    """Replace (or, with word None, drop) the concept word in a prompt; whitespace is normalised."""
    out = re.sub(rf"(?<!\w){re.escape(concept)}(?!\w)", word or "", prompt)
    return " ".join(out.split())


def farthest_colour(concept: str, exclude: list[str]) -> str:
    """The tiny-world palette colour farthest (RGB) from `concept`, skipping `exclude` (the other concepts)."""
    from ...core.tinyworld.palette import colour_names, palette_tensor

    names = colour_names()
    if concept not in names:
        raise BilevelError(
            f"'farthest' needs tiny-world colour concepts, got {concept!r} (accepted: {', '.join(names)}); "
            "give a replacement word or explicit prompts instead"
        )
    pal = palette_tensor()
    d = (pal - pal[names.index(concept)]).norm(dim=1)
    for i, n in enumerate(names):
        if n == concept or n in exclude:
            d[i] = -1.0
    if float(d.max()) < 0:
        raise BilevelError("every palette colour is a concept; no colour is left to map the concepts onto")
    return names[int(d.argmax())]


def non_concept_colours(concepts: list[str]) -> list[str]:
    from ...core.tinyworld.palette import colour_names

    left = [c for c in colour_names() if c not in concepts]
    if not left:
        raise BilevelError("every palette colour is a concept; no colour is left to map the concepts onto")
    return left


def remap_prompts(prompts: list[str], concepts: list[str], mode: str, option: str) -> list[str]:
    """One replacement prompt per prompt: mode 'farthest' (farthest non-concept palette colour), 'drop'
    (remove the concept word) or a literal word that replaces the concept word."""
    out = []
    for p in prompts:
        c = concept_in(p, concepts)
        if mode == FARTHEST:
            out.append(replace_concept(p, c, farthest_colour(c, concepts)))
        elif mode == DROP:
            out.append(replace_concept(p, c, None))
        else:
            if mode in concepts:
                raise BilevelError(f"{option} {mode!r} is itself a concept; choose a word that is not being erased")
            out.append(replace_concept(p, c, mode))
    return out


def explicit_prompts(given: list[str], targets: list[str], option: str) -> list[str]:
    if len(given) != len(targets):
        raise BilevelError(
            f"{option} has {len(given)} prompts but there are {len(targets)} concept prompts; give one per concept prompt"
        )
    return list(given)


def noised(
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    gen: torch.Generator,
    device: torch.device,
    prediction_type: str = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, target) with t uniform over the training timesteps (random draws on CPU, deterministic by gen).
    target is what the model should output: eps, or v = sqrt(a) eps - sqrt(1-a) x0 for v-prediction schedulers."""
    t = torch.randint(len(alphas_cumprod), (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1).to(torch.float32)
    x0 = x0.to(device)
    eps = eps.to(device, x0.dtype)
    a = a.to(device, x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t.to(device), task_target(x0, eps, a, prediction_type)


def generate_or_load(
    ctx: UnlearnContext,
    prompts: list[str],
    *,
    filename: str,
    steps: int,
    guidance: float,
    seed: int,
) -> torch.Tensor:
    """Images of the frozen teacher for `prompts` (one each), cached in ctx.run_dir/filename and reused when the
    cache was made with the same prompts and settings."""
    meta = {
        "prompts": json.dumps(prompts),
        "steps": str(steps),
        "guidance": repr(guidance),
        "seed": str(seed),
        "model": model_fingerprint(ctx.teacher),
    }
    path = Path(ctx.run_dir) / filename if ctx.run_dir is not None else None
    if path is not None and path.is_file():
        cached = read_cached(path, meta, "images")
        if cached is not None:
            return cached.to(ctx.device)
    gen = torch.Generator().manual_seed(seed)
    images = sample_images(
        ctx.teacher, ctx.scheduler_config, ctx.encode(prompts), ctx.encode([""]),
        steps=steps, guidance=guidance, generator=gen, channels=ctx.sample_shape[0], size=ctx.sample_shape[1],
    )  # fmt: skip
    if getattr(ctx, "clamp_samples", True):  # pixels; latents are left as sampled
        images = images.clamp(-1, 1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors({"images": images}, path, metadata=meta)
    return images.to(ctx.device)


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's weights (names, shapes, sums), so a cache made by another model is not reused."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach().double()
            h.update(f"{name}{tuple(p.shape)}{float(t.sum()):.12e}{float(t.abs().sum()):.12e}".encode())
    return h.hexdigest()[:32]


def read_cached(path: Path, meta: dict[str, str], *keys: str) -> torch.Tensor | None:
    """The tensor `keys[0]` of a safetensors cache whose metadata equals `meta`; None when absent, stale or corrupt
    (the caller then recomputes and overwrites it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}) != meta or keys[0] not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
                return None
            return f.get_tensor(keys[0])
    except (SafetensorError, OSError):
        return None


def load_png_folder(folder: Path, shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[str], list[str | None]]:
    """(images in [-1, 1], file names, prompt per image from an optional `<stem>.txt` beside it, else None)."""
    from PIL import Image

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BilevelError(f"image folder not found: {folder}; expected a folder of .png images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise BilevelError(f"no .png images in {folder}; expected a folder of .png images")
    c, h, w = shape
    if c != 3:
        raise BilevelError(f"PNG images need a 3-channel model, this one has {c} input channels")
    images, prompts = [], []
    for p in files:
        try:
            img = Image.open(p).convert("RGB")
        except OSError as exc:
            raise BilevelError(f"cannot read image {p}: {exc}") from None
        if img.size != (w, h):
            raise BilevelError(f"image {p} is {img.size[0]}x{img.size[1]}; the model samples {w}x{h} images")
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)
        images.append(x.float() / 127.5 - 1)
        side = p.with_suffix(".txt")
        prompts.append(side.read_text().strip() if side.is_file() else None)
    return torch.stack(images), [p.name for p in files], prompts


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}


def select_subset(model: nn.Module, subset: str) -> dict[str, nn.Parameter]:
    """cross-attention-kv: to_k/to_v of every cross-attention; attention: every parameter of every attention
    (self and cross); full: all parameters."""
    params = dict(model.named_parameters())
    if subset == "full":
        return params
    chosen: set[str] = set()
    for name, m in attention_modules(model).items():
        if subset == "attention":
            chosen.update(f"{name}.{k}" for k, _ in m.named_parameters())
        elif subset == "cross-attention-kv" and m.is_cross_attention:
            chosen.update(f"{name}.to_k.{k}" for k, _ in m.to_k.named_parameters())
            chosen.update(f"{name}.to_v.{k}" for k, _ in m.to_v.named_parameters())
    return {k: v for k, v in params.items() if k in chosen}
