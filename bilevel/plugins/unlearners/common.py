"""Helpers shared by the built-in unlearners: noising, teacher-generated image sets (cached as safetensors), PNG
folders and parameter subsets (prompt mapping is core.prompt_mapping, shared with third-party plugins)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...core.errors import BilevelError
from ...core.interfaces import UnlearnContext
from ...core.io import atomic_save_tensors
from ...core.losses import task_target
from ...core.sampling import sample_images


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


@dataclass
class RetainBatch:
    """Noised retain images with their prompts and the frozen model's prediction on them (the retain target)."""

    xt: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    target: torch.Tensor


def draw_retain(ctx: UnlearnContext, batch_size: int, generator: torch.Generator, who: str) -> RetainBatch:
    """The retain extension's batch: noised retain images, their prompts, and sg(eps_frozen(x_t, c_r)) as target."""
    if ctx.retain_images is None or not ctx.retain_image_prompts:
        raise BilevelError(f"{who} retain_weight > 0 needs retain images; set retain_weight=0")
    j = torch.randint(ctx.retain_images.shape[0], (batch_size,), generator=generator)
    xr, tr, _ = noised(ctx.retain_images[j], ctx.alphas_cumprod, generator, ctx.device)
    c_r = ctx.encode([ctx.retain_image_prompts[k] for k in j.tolist()])
    with torch.no_grad():
        target = ctx.teacher(xr, tr, encoder_hidden_states=c_r).sample
    return RetainBatch(xr, tr, c_r, target)


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
