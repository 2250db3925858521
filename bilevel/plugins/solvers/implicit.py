"""Implicit-function-theorem hypergradient: d_x F - d2_xy G . [d2_yy G]^-1 d_y F, solved with CG or Neumann."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import BilevelProblem, ProximalSolverConfig
from bilevel.plugins.solvers.coupled import CoupledSolver
from bilevel.toolkit import (
    HVP,
    Coupled,
    Tensors,
    batch_head,
    conjugate_gradient,
    double_backward_attention,
    explain_missing_double_backward,
    gradient_step,
    grads_or_zeros,
    hvp_autograd,
    hvp_finite_difference,
    implicit_hypergrad,
    neumann,
    swap_parameters,
    unscaled_grads,
)


class ImplicitConfig(ProximalSolverConfig):
    mu: float = Field(
        1.0, gt=0, description="proximal coupling: G = L_low(y) + mu/2 ||y - x||^2 (also makes H + mu I SPD)"
    )
    lower_steps: int = Field(1, gt=0, description="lower optimiser steps per outer step (y tracks y*(x))")
    upper_every: int = Field(
        4,
        gt=0,
        description="compute the hypergradient (and step the upper variable) every k-th outer step, lower steps in "
        "between, as the alternating solver does (same default k, so both make as many upper updates)",
    )
    hvp_batch_size: int | None = Field(
        8,
        gt=0,
        description="HVPs and the mixed term on the first n samples of the last lower batch (None: all of it); "
        "curvature needs fewer samples than gradients, and every HVP then runs at batch n",
    )
    warm_start: bool = Field(
        False,
        description="cg: start from the previous hypergradient's solution; its initial residual takes one HVP of "
        "the `iters` budget (at least one CG iteration runs)",
    )
    hessian_block: Literal["full", "upper"] = Field(
        "full",
        description="proximal coupling: 'full' differentiates through every lower parameter; 'upper' restricts the "
        "Hessian (and d_y F) to the anchored upper parameters, holding the others fixed (cheaper; exact when the "
        "unlearner trains every parameter)",
    )
    linear_solver: Literal["cg", "neumann"] = Field("cg", description="how H v = d_y F is solved")
    iters: int = Field(
        5, gt=0, description="CG iterations or Neumann terms, i.e. HVPs per hypergradient (set explicitly)"
    )
    damping: float = Field(0.0, ge=0, description="solve (H + damping I) v = d_y F; > 0 guards against indefinite H")
    neumann_alpha: float = Field(0.01, gt=0, description="Neumann step; needs alpha < 2 / lambda_max(H)")
    hvp: Literal["autograd", "finite-difference"] = Field(
        "autograd", description="HVPs by double backward, or by differences of gradients (first derivatives only)"
    )
    fd_eps: float = Field(1e-3, gt=0, description="finite-difference step, relative to max(1, ||y||)")
    fd_scheme: Literal["central", "forward"] = Field(
        "central", description="central: 2 grads per HVP, O(h^2) error; forward: 1, O(h)"
    )
    math_attention: bool = Field(
        True, description="autograd HVPs run attention on the math kernel (flash attention has no double backward)"
    )


class ImplicitSolver(CoupledSolver):
    """Lower optimiser steps on G, then the IFT hypergradient at the current y (an approximation of y*(x)).

    Couplings: 'proximal' (x is an anchor copy, G = L_low(y) + mu/2 ||y - x||^2, so d2_xy G = -mu I and the
    hypergradient is mu (H + mu I)^-1 d_y F: the mu I term keeps CG well posed on a network's indefinite Hessian;
    the upper optimiser steps the anchor, the model keeps y) and 'split' (x = upper_params, y = lower_params,
    disjoint). Not 'shared': with x and y the same tensors y*(x) is not a function of a separate upper variable.
    Memory is independent of `iters`; every graph is local to step().

    Cost reductions of the stochastic bilevel literature, each an option: the hypergradient every `upper_every`
    steps, HVPs on a sub-batch (`hvp_batch_size`), CG warm-started from the previous solution (`warm_start`), and
    in the proximal coupling the Hessian restricted to the anchored parameters (`hessian_block: upper`). With
    upper_every 1, hvp_batch_size None, warm_start false and hessian_block full it is the plain IFT estimator.
    """

    name = "implicit-gradient"
    second_order = True
    description = "Implicit-function-theorem hypergradient with CG or Neumann and autograd or finite-difference HVPs."
    Config = ImplicitConfig
    api_version = 2

    def __init__(self, config: BaseModel | None = None) -> None:
        super().__init__(config)
        self._cg_start: Tensors | None = None  # warm start: the last CG solution, in the order of _solved()
        self._pending_cg: dict[str, torch.Tensor] | None = None

    def setup(self, problem: BilevelProblem) -> None:
        if self.config.hessian_block == "upper" and self.config.coupling != "proximal":
            raise BilevelError(
                "implicit-gradient: hessian_block 'upper' needs the proximal coupling (in 'split' the Hessian is "
                "already over the lower subset only); use hessian_block 'full'"
            )
        super().setup(problem)
        if self._pending_cg is not None:
            self._load_cg(self._pending_cg)
            self._pending_cg = None

    def step(self, problem: BilevelProblem, step: int) -> dict[str, float]:
        c, cfg = self.coupled(problem), self.config
        batch = None
        for _ in range(cfg.lower_steps):
            batch = problem.lower.draw()
            loss = problem.lower.loss(batch)
            lower_value = float(loss.detach())
            gradient_step(
                loss + c.prox_penalty(cfg.mu),
                problem.lower_params,
                problem.lower_optimizer,
                scheduler=problem.lower_scheduler,
            )
        metrics = {"lower_loss": lower_value}
        if (step + 1) % cfg.upper_every != 0:
            return metrics
        with explain_missing_double_backward(self.name, "set math_attention: true or hvp: finite-difference"):
            hypergrad, upper_value = self.hypergradient(problem, batch)
        c.upper_step(problem, hypergrad)
        metrics["upper_loss"] = upper_value
        return metrics

    def _solved(self, c: Coupled) -> tuple[list[str], list[torch.nn.Parameter]]:
        """Names and tensors of the y that H is taken over (all lower parameters, or the anchored block)."""
        if c.coupling == "proximal" and self.config.hessian_block == "upper":
            return [c.lower_names[i] for i in c.prox_index], [c.lower[i] for i in c.prox_index]
        return list(c.lower_names), list(c.lower)

    def hypergradient(self, problem: BilevelProblem, batch: Any) -> tuple[Tensors, float]:
        """IFT hypergradient at the model's current y, with H from the last lower batch `batch` (reused, so its
        teacher pass is paid once), or from its first hvp_batch_size samples."""
        c, cfg = self.coupled(problem), self.config
        _, ys = self._solved(c)
        split = c.coupling == "split"
        block = c.coupling == "proximal" and cfg.hessian_block == "upper"
        xs = list(c.upper) if split else []
        upper = problem.upper.loss(problem.upper.draw())
        g = unscaled_grads(upper, xs + ys, problem.upper_optimizer)  # fp16: through the upper loss scale
        direct, b = g[: len(xs)], g[len(xs) :]
        upper_value = float(upper.detach())
        del upper, g
        if cfg.hvp_batch_size is not None:
            batch = batch_head(batch, cfg.hvp_batch_size)

        if cfg.hvp == "autograd":
            with double_backward_attention(cfg.math_attention):
                lower = problem.lower.loss(batch)
            gy = grads_or_zeros(lower, ys, create_graph=True)
            del lower
            hvp: HVP = hvp_autograd(gy, ys)
            cross = hvp_autograd(gy, xs) if split else None
        else:

            def grad_at(points: Tensors, wrt_x: bool) -> Tensors:
                with swap_parameters(problem.model, dict(zip(ys, points))):
                    loss = problem.lower.loss(batch)
                return grads_or_zeros(loss, xs if wrt_x else points)

            hvp = hvp_finite_difference(lambda p: grad_at(p, False), ys, cfg.fd_eps, cfg.fd_scheme)
            cross = hvp_finite_difference(lambda p: grad_at(p, True), ys, cfg.fd_eps, cfg.fd_scheme) if split else None

        if split:
            full_hvp, mixed = hvp, cross
        elif block:  # y = the anchored block only: H_G = H_UU + mu I, d2_xy G = -mu I

            def full_hvp(v: Tensors) -> Tensors:
                return [h + cfg.mu * u for h, u in zip(hvp(v), v)]

            def mixed(v: Tensors) -> Tensors:
                return [-cfg.mu * u for u in v]

            direct = [torch.zeros_like(a) for a in c.anchors]
        else:  # proximal: H_G = H_low + mu P_U, d2_xy G = -mu P_U

            def full_hvp(v: Tensors) -> Tensors:
                return c.add_prox_grad(hvp(v), v, [torch.zeros_like(v[i]) for i in c.prox_index], cfg.mu)

            def mixed(v: Tensors) -> Tensors:
                return [-cfg.mu * v[i] for i in c.prox_index]

            direct = [torch.zeros_like(a) for a in c.anchors]

        def solve(h: HVP, rhs: Tensors) -> Tensors:
            if cfg.linear_solver == "cg":
                x0 = self._cg_start if cfg.warm_start else None
                iters = cfg.iters if x0 is None else max(1, cfg.iters - 1)  # x0's residual takes one HVP
                v = conjugate_gradient(h, rhs, iters, cfg.damping, x0=x0)
                if cfg.warm_start:
                    self._cg_start = [t.detach().clone() for t in v]
                return v
            damped = h if cfg.damping == 0 else (lambda v: [a + cfg.damping * u for a, u in zip(h(v), v)])
            return neumann(damped, rhs, cfg.iters, cfg.neumann_alpha)

        return implicit_hypergrad(direct, b, full_hvp, mixed, solve), upper_value

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._cg_start is not None and self._coupled is not None:
            state["cg_start"] = dict(zip(self._solved(self._coupled)[0], (t.clone() for t in self._cg_start)))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        cg = state.get("cg_start")
        if cg is None:
            self._cg_start = None
        elif self._coupled is not None:
            self._load_cg(cg)
        else:
            self._pending_cg = cg

    def _load_cg(self, cg: dict[str, torch.Tensor]) -> None:
        names, ys = self._solved(self._coupled)
        missing = [n for n in names if n not in cg]
        if missing:
            raise BilevelError(f"solver state lacks the CG warm start for {missing[0]!r}; resume with the same options")
        self._cg_start = [cg[n].to(y.device, y.dtype).clone() for n, y in zip(names, ys)]
