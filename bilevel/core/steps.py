"""Single optimiser steps that every solver and baseline shares."""

from __future__ import annotations

import torch

from .interfaces import BilevelProblem


def gradient_step(
    loss: torch.Tensor,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    before_step=None,
    scheduler=None,
) -> None:
    """Gradients for exactly these parameters (others untouched), then one optimiser step."""
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    for n, g in zip(names, grads):
        params[n].grad = g
    if before_step is not None:
        before_step()
    optimizer.step()
    for n in names:
        params[n].grad = None
    if scheduler is not None:
        scheduler.step()


def lower_step(problem: BilevelProblem) -> float:
    loss = problem.lower.loss(problem.lower.draw())
    gradient_step(loss, problem.lower_params, problem.lower_optimizer, scheduler=problem.lower_scheduler)
    return float(loss.detach())
