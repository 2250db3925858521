"""Classifier-free-guided DDIM sampling for any UNet2DConditionModel-like student or teacher.

Conditional and unconditional passes are batched into one forward (half the Python overhead).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def sample_images(
    unet: torch.nn.Module,
    scheduler_config: dict,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    steps: int = 25,
    guidance: float = 2.0,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    channels: int = 3,
    size: int = 16,
    stop_at: int | None = None,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample len(cond) images; `stop_at` ends after that many DDIM steps and returns x_t (for ESD's partial sampling)."""
    from diffusers import DDIMScheduler  # here, not at import: `bilevel plugins` must not pay for diffusers

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    device = cond.device
    dtype = next(unet.parameters()).dtype
    outs = []
    for start in range(0, cond.shape[0], batch_size):
        c = cond[start : start + batch_size].to(dtype)
        n = c.shape[0]
        u = uncond.to(dtype).expand(n, -1, -1) if uncond.shape[0] == 1 else uncond[start : start + n].to(dtype)
        if initial is not None:
            x = initial[start : start + n].to(device, dtype)
        else:
            x = torch.randn((n, channels, size, size), generator=generator, device="cpu").to(device, dtype)
        for i, t in enumerate(scheduler.timesteps):
            if stop_at is not None and i >= stop_at:
                break
            eps = guided_eps(unet, x, t, c, u, guidance)
            x = scheduler.step(eps, t, x).prev_sample
        outs.append(x)
    return torch.cat(outs)


def guided_eps(
    unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor, uncond: torch.Tensor, guidance: float
) -> torch.Tensor:
    """eps_uncond + w (eps_cond - eps_uncond), with one batched forward."""
    if guidance == 1.0:
        return unet(x, t, encoder_hidden_states=cond).sample
    e_u, e_c = uncond_cond_eps(unet, x, t, cond, uncond)
    return e_u + guidance * (e_c - e_u)


def uncond_cond_eps(
    unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor, uncond: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps(x, uncond), eps(x, cond)) from one batched forward; t is a scalar or one timestep per sample."""
    if torch.is_tensor(t) and t.ndim > 0 and t.numel() > 1:
        t = torch.cat([t, t])
    both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    e_u, e_c = both.chunk(2)
    return e_u, e_c


@torch.no_grad()
def sample_trajectories(
    unet: torch.nn.Module,
    scheduler_config: dict,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    steps: int,
    guidance: float,
    generator: torch.Generator,
    shape: tuple[int, int, int],
    batch_size: int = 256,
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every intermediate x_t of guided DDIM runs: ((N, steps, C, H, W), timesteps (steps,)).

    x[:, i] is the state fed to the model at timesteps[i], i.e. a sample of partial sampling down to step i.
    score: when given, also returns score(eps_uncond, eps_cond) at every state (N, steps, C, H, W); the sampler
    computes both predictions anyway, so e.g. ESD's frozen-model targets come for free.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    dtype = next(unet.parameters()).dtype
    device = cond.device
    chunks, score_chunks = [], []
    for start in range(0, cond.shape[0], batch_size):
        c = cond[start : start + batch_size].to(dtype)
        n = c.shape[0]
        u = uncond.to(dtype).expand(n, -1, -1)
        x = torch.randn((n, *shape), generator=generator).to(device, dtype)
        states, scores = [], []
        for t in scheduler.timesteps:
            states.append(x.cpu())
            if score is None:
                eps = guided_eps(unet, x, t, c, u, guidance)
            else:
                e_u, e_c = uncond_cond_eps(unet, x, t, c, u)
                scores.append(score(e_u, e_c).cpu())
                eps = e_u + guidance * (e_c - e_u)
            x = scheduler.step(eps, t, x).prev_sample
        chunks.append(torch.stack(states, dim=1))
        if score is not None:
            score_chunks.append(torch.stack(scores, dim=1))
    if score is not None:
        return torch.cat(chunks), scheduler.timesteps.clone(), torch.cat(score_chunks)
    return torch.cat(chunks), scheduler.timesteps.clone()
