"""Image sets an unlearner works from: teacher-generated sets cached as safetensors beside the run (keyed by the
teacher's fingerprint and the generation settings), and PNG folders."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import UnlearnContext
from bilevel.diffusion.sampling import sample_images
from bilevel.runtime.io import atomic_save_tensors


def generate_or_load(
    ctx: UnlearnContext,
    prompts: list[str],
    *,
    filename: str,
    steps: int,
    guidance: float,
    seed: int,
) -> torch.Tensor:
    """Images of the frozen teacher for `prompts` (one each), cached (see `preparation_cache`) and reused when the
    cache was made by the same teacher with the same prompts and settings."""
    meta = {
        "prompts": json.dumps(prompts),
        "steps": str(steps),
        "guidance": repr(guidance),
        "seed": str(seed),
        "model": model_fingerprint(ctx.teacher),
    }

    def sample() -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        images = sample_images(
            ctx.teacher, ctx.scheduler_config, ctx.encode(prompts), ctx.encode([""]),
            steps=steps, guidance=guidance, generator=gen, channels=ctx.sample_shape[0], size=ctx.sample_shape[1],
        )  # fmt: skip
        if getattr(ctx, "clamp_samples", True):  # pixels; latents are left as sampled
            images = images.clamp(-1, 1)
        return {"images": images}

    return preparation_cache(ctx, filename, meta, ["images"], sample)["images"].to(ctx.device)


def preparation_cache(
    ctx: UnlearnContext, filename: str, meta: dict[str, str], keys: list[str],
    compute: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:  # fmt: skip
    """`cached_tensors` for an unlearner's one-off preparation. With ctx.cache_dir (shared by runs) the file is
    named by a digest of `meta`, so every run that would compute the same tensors (another cell of a grid, another
    pruner with the same frozen teacher and seed) reads them instead; otherwise it lives in the run's own folder."""
    if ctx.cache_dir is None:
        return cached_tensors(ctx.run_dir, filename, meta, keys, compute)
    return cached_tensors(Path(ctx.cache_dir) / "unlearner", digested_name(filename, meta), meta, keys, compute)


def digested_name(filename: str, meta: dict[str, str]) -> str:
    """filename with a digest of `meta` before its suffix ('pool.safetensors' -> 'pool-<digest>.safetensors'): one
    file per distinct content, so caches made from other models or settings sit side by side."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    name = Path(filename)
    return f"{name.stem}-{digest}{name.suffix}"


def cached_tensors(
    folder: Path | None, filename: str, meta: dict[str, str], keys: list[str],
    compute: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The tensors `keys` of folder/filename when it was written with the same `meta` (put there what the result
    depends on: model and tensor fingerprints, settings), else compute() and write them there (atomically) for
    the next caller. folder None: compute, keep nothing."""
    path = Path(folder) / filename if folder is not None else None
    found = read_cached_tensors(path, meta, keys) if path is not None else None
    if found is not None:
        return found
    result = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors({k: v.contiguous() for k, v in result.items()}, path, metadata=meta)
    return result


def model_fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's weights (names, shapes, sums), so a cache made by another model is not reused."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach().double()
            h.update(f"{name}{tuple(p.shape)}{float(t.sum()):.12e}{float(t.abs().sum()):.12e}".encode())
    return h.hexdigest()[:32]


def read_cached_tensors(path: Path, meta: dict[str, str], keys: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor] | None:
    """Every tensor in `keys` of a safetensors cache whose metadata equals `meta`; None when absent, stale, corrupt
    or missing one of them."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if (f.metadata() or {}) != meta or not set(keys) <= names:
                return None
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError):
        return None


def tensor_fingerprint(t: torch.Tensor) -> str:
    """Exact identity of one tensor's values (e.g. the prompt embeddings a cache was made with)."""
    t = t.detach().to("cpu").contiguous()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes()).hexdigest()[:32]


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
