"""Train the digits teacher on the real train split (all ten classes), reproducibly and resumably.

Every step's batch, prompt names, dropout and noise come from a generator seeded by (seed, step), and a checkpoint
holds the model, EMA, optimiser and LR schedule, so a resumed run draws and computes what an uninterrupted one would.
A checkpoint is a complete folder named by step; `state.json`, written last, points at it, so a kill at any moment
leaves the previous complete checkpoint.

    python -m bilevel.plugins.worlds.digits.teacher_training --out runs/digits-teacher --steps 12000
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from bilevel.core.errors import BilevelError
from bilevel.plugins.worlds.digits.architecture import DEFAULT_CHANNELS, build_digits_pipeline
from bilevel.plugins.worlds.digits.data import TEMPLATES, make_dataset, prompt_for
from bilevel.plugins.worlds.digits.plugin import write_marker
from bilevel.toolkit import PromptBank, add_noise, atomic_save_tensors, atomic_write_text, draw_generator, load_tensors
from bilevel.worlds.tiny.pipeline import TinyTextToImagePipeline

STATE = "state.json"
#: Options that do not change what is computed, so a resume may differ in them.
RESUMABLE_CHANGES = {"checkpoint_every", "threads"}


class DigitsTeacherConfig(BaseModel):
    """How the shipped digits teacher is trained."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    steps: int = Field(12000, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(200, ge=0)
    final_lr_fraction: float = Field(0.1, ge=0, le=1)  # cosine decay to this share of lr: a settled final model
    ema_decay: float = Field(0.999, ge=0, lt=1)
    uncond_prob: float = Field(0.1, ge=0, le=1)  # prompt dropout, for classifier-free guidance
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    checkpoint_every: int = Field(250, gt=0)
    threads: int = Field(1, gt=0)  # one core: the machine is shared


def lr_factor(step: int, config: DigitsTeacherConfig) -> float:
    """Linear warm-up, then cosine decay to final_lr_fraction."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.final_lr_fraction + (1 - config.final_lr_fraction) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, progress))
    )


def train_digits_teacher(config: DigitsTeacherConfig, out_dir: Path, *, resume: bool = True) -> TinyTextToImagePipeline:
    """Train and save the teacher pipeline (EMA weights) to out_dir/pipeline; resumes from out_dir/checkpoints."""
    torch.set_num_threads(config.threads)
    pipe = build_digits_pipeline(config.seed, config.channels)
    unet = pipe.unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config))
    data = make_dataset("train", config.seed)
    bank = PromptBank(pipe.encode_prompts)
    # (N, names, tokens, dim): each image's prompt under both names; a step picks one name per sample.
    cond_all = torch.stack([bank([prompt_for(d, n) for d in data.labels.tolist()]) for n in range(len(TEMPLATES))], 1)
    uncond = bank.empty(1)[0]
    alphas = pipe.scheduler.alphas_cumprod.float()
    out_dir = Path(out_dir)
    ckpts = out_dir / "checkpoints"
    start = _load_checkpoint(ckpts, unet, ema, opt, sched, config) if resume else 0
    history: list[dict[str, float]] = []
    losses: list[float] = []
    t0, cpu0 = time.time(), time.process_time()
    for step in range(start, config.steps):
        gen = draw_generator(config.seed, step)
        idx = torch.randint(len(data), (config.batch_size,), generator=gen)
        names = torch.randint(len(TEMPLATES), (config.batch_size,), generator=gen)
        x0 = data.images[idx]
        cond = cond_all[idx, names].clone()
        drop = torch.rand(config.batch_size, generator=gen) < config.uncond_prob
        cond[drop] = uncond
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (config.batch_size,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = add_noise(x0, noise, a)
        loss = (unet(xt, t, encoder_hidden_states=cond).sample - noise).pow(2).mean()
        if not torch.isfinite(loss):
            raise BilevelError(f"teacher loss became {loss.item()} at step {step}; the last checkpoint is kept")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - config.ema_decay)
        losses.append(loss.item())
        done = step + 1
        if done % 100 == 0 or done == config.steps:
            recent = sum(losses[-100:]) / len(losses[-100:])
            history.append({"step": done, "loss": recent, "seconds": time.time() - t0})
            print(f"step {done}/{config.steps} loss {recent:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{time.time() - t0:.0f}s this session", flush=True)  # fmt: skip
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save_checkpoint(ckpts, done, unet, ema, opt, sched, config)
    pipe.register_modules(unet=ema)
    pipe.save_pretrained(out_dir / "pipeline", safe_serialization=True)
    write_marker(out_dir / "pipeline")  # `--model out_dir/pipeline` resolves to the digits world
    _append_session(out_dir / "training.json", config, start, time.time() - t0, time.process_time() - cpu0, history)
    return pipe


def _append_session(
    path: Path, config: DigitsTeacherConfig, start: int, seconds: float, cpu_seconds: float, history: list
) -> None:
    """training.json keeps every session (a resumed run has several), so the total compute time is on record."""
    record = json.loads(path.read_text()) if path.is_file() else {"config": config.model_dump(), "sessions": []}
    record["config"] = config.model_dump()
    record["sessions"].append({"first_step": start, "seconds": seconds, "cpu_seconds": cpu_seconds, "history": history})
    record["total_seconds"] = sum(s["seconds"] for s in record["sessions"])
    record["total_cpu_seconds"] = sum(s.get("cpu_seconds", 0.0) for s in record["sessions"])
    atomic_write_text(path, json.dumps(record, indent=1))


def _save_checkpoint(ckpts: Path, step: int, unet, ema, opt, sched, config: DigitsTeacherConfig) -> None:
    target = ckpts / f"step-{step:06d}"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    atomic_save_tensors(unet.state_dict(), target / "unet.safetensors")
    atomic_save_tensors(ema.state_dict(), target / "ema.safetensors")
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, target / "optimizer.pt")
    state = {"step": step, "folder": target.name, "config": config.model_dump()}
    atomic_write_text(ckpts / STATE, json.dumps(state, indent=1))
    for old in ckpts.glob("step-*"):
        if old.name != target.name:
            shutil.rmtree(old)


def _load_checkpoint(ckpts: Path, unet, ema, opt, sched, config: DigitsTeacherConfig) -> int:
    """The step to continue from: 0 when there is no checkpoint, else the step of the complete one state.json names.

    The config must be the checkpoint's: another step count would bend the LR schedule, another seed the data draws.
    """
    if not (ckpts / STATE).is_file():
        return 0
    try:
        state = json.loads((ckpts / STATE).read_text())
        saved = DigitsTeacherConfig.model_validate(state["config"]).model_dump(exclude=RESUMABLE_CHANGES)
        wanted = config.model_dump(exclude=RESUMABLE_CHANGES)
        if saved != wanted:
            raise BilevelError(
                f"{ckpts} was trained with {saved}, not {wanted}; "
                "resume with the same options or delete the folder to start over"
            )
        folder = ckpts / state["folder"]
        unet.load_state_dict(load_tensors(folder / "unet.safetensors"))
        ema.load_state_dict(load_tensors(folder / "ema.safetensors"))
        states = torch.load(folder / "optimizer.pt", weights_only=True)
        opt.load_state_dict(states["opt"])
        sched.load_state_dict(states["sched"])
        return int(state["step"])
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise BilevelError(
            f"cannot resume teacher training from {ckpts}: {exc}; delete the folder to start over"
        ) from exc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the digits-world teacher (resumable).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=DigitsTeacherConfig().steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)
    config = DigitsTeacherConfig(steps=args.steps, seed=args.seed, threads=args.threads)
    train_digits_teacher(config, args.out, resume=not args.no_resume)


if __name__ == "__main__":
    main()
