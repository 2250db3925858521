"""Forward noising and regression targets in one place: x_t = sqrt(a) x0 + sqrt(1 - a) eps and v = sqrt(a) eps -
sqrt(1 - a) x0 (the closed forms of diffusers' `add_noise` / `get_velocity`), plus `noised`, which draws t and eps."""

from __future__ import annotations

import torch


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t for clean x0 and noise at cumulative alpha `alpha_bar` (broadcastable, e.g. (N, 1, 1, 1))."""
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def get_velocity(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The v-prediction target sqrt(a) eps - sqrt(1 - a) x0."""
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


PREDICTION_TYPES = ("epsilon", "v_prediction")


def task_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet is trained to output for x_t = sqrt(a) x0 + sqrt(1-a) eps: eps (epsilon models) or
    v = sqrt(a) eps - sqrt(1-a) x0 (v-prediction models such as SD 2.x at 768 px). alpha_bar broadcasts to x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return get_velocity(x0, noise, alpha_bar.to(x0.dtype))
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}")


def prediction_type(scheduler_config: dict) -> str:
    """The scheduler's prediction type (diffusers' default is epsilon)."""
    return str(scheduler_config.get("prediction_type", "epsilon"))


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
    return add_noise(x0, eps, a), t.to(device), task_target(x0, eps, a, prediction_type)
