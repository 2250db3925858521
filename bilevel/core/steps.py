"""Single optimiser steps that every solver and baseline shares."""

from __future__ import annotations

import torch

from .distributed import average_gradients
from .interfaces import BilevelProblem
from .precision import loss_scaler


def gradient_step(
    loss: torch.Tensor,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    before_step=None,
    scheduler=None,
) -> None:
    """Gradients for exactly these parameters (others untouched), then one optimiser step.

    Under fp16 (a loss scaler attached to the optimiser) the loss is scaled before backward and the step is skipped,
    with a smaller scale next time, when a gradient overflowed."""
    scaler = loss_scaler(optimizer)
    names = list(params)
    grads = torch.autograd.grad(scaler.scale(loss) if scaler else loss, [params[n] for n in names], allow_unused=True)
    for n, g in zip(names, grads):
        params[n].grad = g
    if before_step is not None:
        before_step()
    if scaler is None:
        optimizer.step()
    else:
        average_gradients(params.values())  # every process must see the same overflow and skip together
        scaler.step(optimizer)
        scaler.update()
    for n in names:
        params[n].grad = None
    if scheduler is not None:
        scheduler.step()


def lower_step(problem: BilevelProblem) -> float:
    loss = problem.lower.loss(problem.lower.draw())
    gradient_step(loss, problem.lower_params, problem.lower_optimizer, scheduler=problem.lower_scheduler)
    return float(loss.detach())
