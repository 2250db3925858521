"""Unrolled (reverse-mode) hypergradient: backpropagate the upper loss through K lower SGD steps."""

from __future__ import annotations

import torch
from pydantic import Field

from bilevel.core.interfaces import BilevelProblem, ProximalSolverConfig
from bilevel.plugins.solvers.coupled import CoupledSolver
from bilevel.toolkit import (
    Tensors,
    double_backward_attention,
    explain_missing_double_backward,
    grads_or_zeros,
    loss_scale,
    scale_loss,
    set_parameters,
    swap_parameters,
    unrolled_hypergrad,
)


class UnrolledConfig(ProximalSolverConfig):
    inner_steps: int = Field(
        1, gt=0, description="K: lower SGD steps per outer step (they are the lower level's training)"
    )
    inner_lr: float = Field(
        1e-3, gt=0, description="eta: the lower SGD rate (plain SGD: Adam is not differentiated through)"
    )
    truncate: int | None = Field(
        None, gt=0, description="backpropagate through only the last k of the K steps (None: all); memory O(k)"
    )
    upper_every: int = Field(
        1, gt=0, description="compute the hypergradient every k-th outer step (others: plain steps)"
    )
    math_attention: bool = Field(
        True,
        description="run differentiated steps on the math attention kernel (flash attention has no double backward)",
    )


class UnrolledSolver(CoupledSolver):
    """y_{k+1} = y_k - eta grad_y G(x, y_k) for K steps, then dF(x, y_K)/dx by backpropagation through the steps.

    Couplings: 'proximal' (x is an anchor copy, G = L_low(y) + mu/2 ||y - x||^2; the upper optimiser steps the
    anchor, the model keeps y) and 'split' (x = upper_params, y = lower_params, disjoint). Not 'shared': with
    x and y the same tensors there is no upper variable for y_K to depend on except its own starting point.
    The K SGD steps are the lower level's training (the problem's lower optimiser and scheduler are not used, since
    differentiating through Adam's sqrt is unstable); the graph lives only inside step(), so memory does not grow.
    """

    name = "unrolled"
    second_order = True
    description = "Reverse-mode hypergradient through K (optionally truncated) lower SGD steps."
    Config = UnrolledConfig
    api_version = 2

    def step(self, problem: BilevelProblem, step: int) -> dict[str, float]:
        c, cfg = self.coupled(problem), self.config
        model = problem.model
        lower_losses: list[float] = []

        def lower_grad(xs: Tensors, ys: Tensors, graph: bool) -> Tensors:
            batch = problem.lower.draw()
            with (
                swap_parameters(model, dict(zip(c.lower, ys))),
                double_backward_attention(graph and cfg.math_attention),
            ):
                loss = problem.lower.loss(batch)
            lower_losses.append(float(loss.detach()))
            grads = grads_or_zeros(loss, ys, create_graph=graph)
            return c.add_prox_grad(grads, ys, xs, cfg.mu)

        def upper(xs: Tensors, ys: Tensors) -> torch.Tensor:  # fp16: scaled, so dF/dx survives the backward
            with swap_parameters(model, dict(zip(c.lower, ys))):
                return scale_loss(problem.upper.loss(problem.upper.draw()), problem.upper_optimizer)

        upper_now = (step + 1) % cfg.upper_every == 0
        xs = [a.detach().requires_grad_(True) for a in c.anchors] if c.coupling == "proximal" else list(c.upper)
        y0 = [p.detach() for p in c.lower]
        if upper_now:
            with explain_missing_double_backward(self.name, "set math_attention: true"):
                hypergrad, y_k, value = unrolled_hypergrad(
                    upper, lower_grad, xs, y0, cfg.inner_steps, cfg.inner_lr, cfg.truncate
                )
            scale = loss_scale(problem.upper_optimizer)
            if scale != 1.0:  # back to true gradients (exact: a power of two); optimizer_step rescales them
                hypergrad, value = [g / scale for g in hypergrad], value / scale
        else:  # plain lower SGD steps, no graph kept
            y_k = y0
            for _ in range(cfg.inner_steps):
                ys = [t.detach().requires_grad_(True) for t in y_k]
                y_k = [(t - cfg.inner_lr * g).detach() for t, g in zip(ys, lower_grad(xs, ys, False))]
        set_parameters(c.lower, y_k)
        metrics = {"lower_loss": sum(lower_losses) / len(lower_losses)}
        if upper_now:
            c.upper_step(problem, hypergrad)
            metrics["upper_loss"] = float(value)
        return metrics
