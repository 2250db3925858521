"""BOME (Liu et al., 2022, "Bilevel Optimization Made Easy"): a first-order value-function method.

With q(x, y) = G(x, y) - G(x, y^T) (y^T: T lower gradient steps from y, treated as a constant) the update is
-(grad F + lambda grad q), lambda = max(phi - <grad F, grad q>, 0) / ||grad q||^2: follow the upper gradient
unless it would not decrease q at rate phi. Only first derivatives are needed.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from bilevel.core.interfaces import BilevelProblem, BilevelSolver, SolverConfig
from bilevel.toolkit import (
    Tensors,
    conflict_averse_weight,
    dot,
    grads_or_zeros,
    optimizer_step,
    split_names,
    swap_parameters,
    unscaled_grads,
)


class BomeConfig(SolverConfig):
    coupling: Literal["shared", "split"] = Field(
        "shared", description="shared (one set of tensors) or split (disjoint subsets); not proximal"
    )
    eta: float = Field(0.5, gt=0, description="phi = eta * ||grad q||^2 ('grad-norm') or eta * q ('value')")
    phi: Literal["grad-norm", "value"] = Field(
        "grad-norm", description="control barrier phi (the paper's default is grad-norm)"
    )
    inner_steps: int = Field(
        1, ge=0, description="T: lower gradient steps that estimate y^T (for q; in shared only needed by phi='value')"
    )
    inner_lr: float = Field(
        1e-3, gt=0, description="step size of those estimation steps (plain gradient descent, not applied)"
    )


class BomeSolver(BilevelSolver):
    """One combined first-order step per outer step; no second derivatives, no unrolled graph.

    Couplings: 'shared' (x = y = theta, q = G(theta) - G(theta^T), grad q = grad G: the conflict-averse weighting
    of the notes; the combined direction is stepped by the lower optimiser, and by the upper one for upper
    parameters the lower level does not hold; the unlearner's gradient mask is applied to grad F) and 'split'
    (x = upper_params, y = lower_params; grad_x q = grad_x G(x, y) - grad_x G(x, y^T); x is stepped by the upper
    optimiser, y by the lower one). Not 'proximal': BOME needs no separate anchor to be well defined.
    """

    name = "bome"
    description = "BOME: first-order value-function bilevel method (conflict-averse weighting in the shared case)."
    Config = BomeConfig
    api_version = 2

    def setup(self, problem: BilevelProblem) -> None:
        if self.coupling == "split":
            split_names(problem)

    def step(self, problem: BilevelProblem, step: int) -> dict[str, float]:
        if self.coupling == "split":
            return self._step_split(problem)
        return self._step_shared(problem)

    def _inner(
        self, problem: BilevelProblem, ys: list[torch.nn.Parameter], batch, xs: list[torch.nn.Parameter]
    ) -> tuple[float, Tensors]:
        """G(x, y^T) and grad_x G(x, y^T), y^T from T detached gradient steps on `batch` (the model is untouched)."""
        y = [p.detach() for p in ys]
        for _ in range(self.config.inner_steps):
            leaves = [t.clone().requires_grad_(True) for t in y]
            with swap_parameters(problem.model, dict(zip(ys, leaves))):
                loss = problem.lower.loss(batch)
            y = [(t - self.config.inner_lr * g).detach() for t, g in zip(leaves, grads_or_zeros(loss, leaves))]
        with swap_parameters(problem.model, dict(zip(ys, y))):
            loss = problem.lower.loss(batch)
        gx = [g.detach() for g in grads_or_zeros(loss, xs)] if xs else []
        return float(loss.detach()), gx

    def _phi(self, grad_q: Tensors, q: float) -> float:
        return self.config.eta * (float(dot(grad_q, grad_q)) if self.config.phi == "grad-norm" else max(q, 0.0))

    def _step_shared(self, problem: BilevelProblem) -> dict[str, float]:
        params: dict[int, torch.nn.Parameter] = {id(p): p for p in problem.lower_params.values()}
        params.update({id(p): p for p in problem.upper_params.values()})
        theta = list(params.values())
        lower_ids = {id(p) for p in problem.lower_params.values()}
        upper_ids = {id(p) for p in problem.upper_params.values()}

        batch = problem.lower.draw()
        lower = problem.lower.loss(batch)
        gq = [
            g if id(p) in lower_ids else torch.zeros_like(p)
            for p, g in zip(theta, unscaled_grads(lower, theta, problem.lower_optimizer))
        ]
        upper = problem.upper.loss(problem.upper.draw())
        gf = [
            g if id(p) in upper_ids else torch.zeros_like(p)
            for p, g in zip(theta, unscaled_grads(upper, theta, problem.upper_optimizer))
        ]
        lower_value, upper_value = float(lower.detach()), float(upper.detach())
        del lower, upper
        if problem.before_upper_step is not None:  # the unlearner's mask restricts grad F, not the lower level
            for p, g in zip(theta, gf):
                p.grad = g
            problem.before_upper_step()
            gf = [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in theta]
            for p in theta:
                p.grad = None
        q = lower_value - self._inner(problem, theta, batch, [])[0] if self.config.phi == "value" else 0.0
        lam = conflict_averse_weight(gf, gq, self._phi(gq, q))
        direction = [f + lam * g for f, g in zip(gf, gq)]
        low = [(p, d) for p, d in zip(theta, direction) if id(p) in lower_ids]
        up_only = [(p, d) for p, d in zip(theta, direction) if id(p) not in lower_ids]
        optimizer_step([p for p, _ in low], [d for _, d in low], problem.lower_optimizer, None, problem.lower_scheduler)
        if up_only:
            optimizer_step(
                [p for p, _ in up_only], [d for _, d in up_only], problem.upper_optimizer, None, problem.upper_scheduler
            )
        metrics = {"lower_loss": lower_value, "upper_loss": upper_value, "lambda": lam}
        if self.config.phi == "value":
            metrics["value_gap"] = q
        return metrics

    def _step_split(self, problem: BilevelProblem) -> dict[str, float]:
        upper_names, lower_names = split_names(problem)
        xs = [problem.upper_params[n] for n in upper_names]
        ys = [problem.lower_params[n] for n in lower_names]
        batch = problem.lower.draw()
        lower = problem.lower.loss(batch)
        g_lower = unscaled_grads(lower, xs + ys, problem.lower_optimizer)
        upper = problem.upper.loss(problem.upper.draw())
        gf = unscaled_grads(upper, xs + ys, problem.upper_optimizer)
        lower_value, upper_value = float(lower.detach()), float(upper.detach())
        del lower, upper
        inner_value, gx_inner = self._inner(problem, ys, batch, xs)
        q = lower_value - inner_value
        gq = [g - gi for g, gi in zip(g_lower[: len(xs)], gx_inner)] + g_lower[len(xs) :]
        lam = conflict_averse_weight(gf, gq, self._phi(gq, q))
        direction = [f + lam * g for f, g in zip(gf, gq)]
        optimizer_step(ys, direction[len(xs) :], problem.lower_optimizer, None, problem.lower_scheduler)
        optimizer_step(
            xs, direction[: len(xs)], problem.upper_optimizer, problem.before_upper_step, problem.upper_scheduler
        )
        return {"lower_loss": lower_value, "upper_loss": upper_value, "lambda": lam, "value_gap": q}
