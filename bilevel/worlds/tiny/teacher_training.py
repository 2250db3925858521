"""Train the tiny teacher on the full tiny world (concept included), reproducibly and resumably.

Every step's batch and noise come from a generator seeded by (seed, step), so a resumed run draws exactly
what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from bilevel.core.errors import BilevelError
from bilevel.diffusion.conditioning import PromptBank
from bilevel.diffusion.noise import add_noise
from bilevel.runtime.io import atomic_save_tensors, load_tensors
from bilevel.runtime.progress import progress_bar
from bilevel.runtime.seeding import draw_generator
from bilevel.worlds.tiny.architecture import IMAGE_SIZE, build_tiny_pipeline
from bilevel.worlds.tiny.dataset import make_dataset
from bilevel.worlds.tiny.pipeline import TinyTextToImagePipeline


class TeacherTrainConfig(BaseModel):
    """How the shipped tiny teacher is trained."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    steps: int = Field(6000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(100, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    uncond_prob: float = Field(0.1, ge=0, le=1)
    dataset_size: int = Field(16384, gt=0)
    checkpoint_every: int = Field(250, gt=0)


def train_teacher(config: TeacherTrainConfig, out_dir: Path, *, resume: bool = True) -> TinyTextToImagePipeline:
    """Train and save the teacher pipeline (EMA weights) to out_dir; resumes from out_dir/checkpoint if present."""
    torch.manual_seed(config.seed)
    pipe = build_tiny_pipeline(config.seed)
    unet = pipe.unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, config.warmup)))
    data = make_dataset(config.dataset_size, config.seed, size=IMAGE_SIZE)
    bank = PromptBank(pipe.encode_prompts)
    cond_all = bank(data.prompts)
    uncond = bank.empty(1)[0]
    alphas = pipe.scheduler.alphas_cumprod.float()
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint"
    start = 0
    if resume and (ckpt / "state.json").exists():
        start = _load_checkpoint(ckpt, unet, ema, opt, sched)
    losses: list[float] = []
    t0 = time.time()
    with progress_bar("training tiny teacher", total=config.steps, completed=start) as advance:
        for step in range(start, config.steps):
            gen = draw_generator(config.seed, step)
            idx = torch.randint(len(data), (config.batch_size,), generator=gen)
            x0 = data.images[idx]
            cond = cond_all[idx].clone()
            drop = torch.rand(config.batch_size, generator=gen) < config.uncond_prob
            cond[drop] = uncond
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, len(alphas), (config.batch_size,), generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = add_noise(x0, noise, a)
            loss = (unet(xt, t, encoder_hidden_states=cond).sample - noise).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(p, 1 - config.ema_decay)
            losses.append(loss.item())
            advance(1, loss=loss.item())
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                _save_checkpoint(ckpt, step + 1, unet, ema, opt, sched, losses)
    pipe.unet = ema
    pipe.register_modules(unet=ema)
    pipe.save_pretrained(out_dir / "pipeline", safe_serialization=True)
    summary = {
        "config": config.model_dump(),
        "seconds_this_session": time.time() - t0,
        "steps": config.steps,
        "first_step_this_session": start,
        "losses_this_session": losses,
    }
    (out_dir / "training.json").write_text(json.dumps(summary, indent=1))
    return pipe


def _save_checkpoint(ckpt: Path, step: int, unet, ema, opt, sched, losses: list[float]) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(unet.state_dict(), ckpt / "unet.safetensors")
    atomic_save_tensors(ema.state_dict(), ckpt / "ema.safetensors")
    tmp = ckpt / "optimizer.pt.tmp"
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp)
    tmp.replace(ckpt / "optimizer.pt")
    state = ckpt / "state.json.tmp"
    state.write_text(json.dumps({"step": step, "recent_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}))
    state.replace(ckpt / "state.json")


def _load_checkpoint(ckpt: Path, unet, ema, opt, sched) -> int:
    try:
        unet.load_state_dict(load_tensors(ckpt / "unet.safetensors"))
        ema.load_state_dict(load_tensors(ckpt / "ema.safetensors"))
        states = torch.load(ckpt / "optimizer.pt", weights_only=True)
        opt.load_state_dict(states["opt"])
        sched.load_state_dict(states["sched"])
        return int(json.loads((ckpt / "state.json").read_text())["step"])
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise BilevelError(f"cannot resume teacher training from {ckpt}: {exc}; delete the folder to start over") from exc
