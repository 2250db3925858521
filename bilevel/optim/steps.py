"""The one optimiser step every solver and baseline makes, so fp16 loss scaling and data-parallel gradient
averaging apply to every update whichever solver computed the gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from bilevel.core.interfaces import BilevelProblem
from bilevel.optim.hypergrad import grads_or_zeros
from bilevel.runtime.distributed import average_gradients
from bilevel.runtime.precision import loss_scaler


def scale_loss(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The loss times the optimiser's fp16 loss scale (unchanged without one), before differentiating it."""
    scaler = loss_scaler(optimizer)
    return scaler.scale(loss) if scaler is not None else loss


def loss_scale(optimizer: torch.optim.Optimizer) -> float:
    """The optimiser's current fp16 loss scale (1.0 without one); always a power of two."""
    scaler = loss_scaler(optimizer)
    return float(scaler.get_scale()) if scaler is not None else 1.0


def unscaled_grads(
    loss: torch.Tensor, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer
) -> list[torch.Tensor]:
    """Gradients of `loss` (zeros for unused tensors) computed on the fp16-scaled loss, so small values survive an
    fp16 backward, then divided by the scale again; exact, the scale being a power of two. An overflow stays inf,
    and the step that receives it is skipped by `optimizer_step`. For solvers that combine gradients of several
    losses before one step (BOME, the hypergradient solvers)."""
    scale = loss_scale(optimizer)
    grads = grads_or_zeros(scale_loss(loss, optimizer), list(params))
    return [g.detach() / scale for g in grads] if scale != 1.0 else [g.detach() for g in grads]


def optimizer_step(
    params: Sequence[torch.nn.Parameter],
    grads: Sequence[torch.Tensor | None],
    optimizer: torch.optim.Optimizer,
    before_step: Callable[[], None] | None = None,
    scheduler: Any = None,
    *,
    scaled: bool = False,
) -> None:
    """Set these gradients, run `before_step` (e.g. a gradient mask), step, clear the gradients, step the schedule.

    grads are true gradients, or with `scaled` gradients of the optimiser's scaled loss (`gradient_step`). Under
    fp16 (a loss scaler attached to the optimiser) the step goes through the scaler: gradients are averaged over
    data-parallel processes first (so every process sees the same overflow), a step with an inf/nan gradient is
    skipped and the scale lowered. Without a scaler, averaging happens in the optimisers' step pre-hook.
    """
    scaler = loss_scaler(optimizer)
    scale = scaler.get_scale() if scaler is not None and not scaled else None
    for p, g in zip(params, grads):
        if g is None:
            p.grad = None
        else:
            p.grad = g.detach() * scale if scale is not None else g.detach()
    if before_step is not None:
        before_step()
    if scaler is None:
        optimizer.step()
    else:
        average_gradients(params)  # every process must see the same overflow and skip together
        scaler.step(optimizer)
        scaler.update()
    for p in params:
        p.grad = None
    if scheduler is not None:
        scheduler.step()


def gradient_step(
    loss: torch.Tensor,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    before_step: Callable[[], None] | None = None,
    scheduler: Any = None,
) -> None:
    """Gradients for exactly these parameters (others untouched), then one `optimizer_step`."""
    tensors = list(params.values())
    grads = torch.autograd.grad(scale_loss(loss, optimizer), tensors, allow_unused=True)
    optimizer_step(tensors, grads, optimizer, before_step, scheduler, scaled=True)


def lower_step(problem: BilevelProblem) -> float:
    """One lower-level step on a fresh batch; returns its loss."""
    loss = problem.lower.loss(problem.lower.draw())
    gradient_step(loss, problem.lower_params, problem.lower_optimizer, scheduler=problem.lower_scheduler)
    return float(loss.detach())


def upper_step(problem: BilevelProblem) -> float:
    """One upper-level step on a fresh batch (the unlearner's mask applied before it); returns its loss."""
    loss = problem.upper.loss(problem.upper.draw())
    gradient_step(
        loss, problem.upper_params, problem.upper_optimizer, problem.before_upper_step, problem.upper_scheduler
    )
    return float(loss.detach())
