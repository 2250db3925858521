"""Hypergradient math as pure functions over lists of tensors and closures (see shared notes: solvers.md).

Nothing here knows about modules or optimisers, so the closed-form tests run it on plain float64 tensors and
the solver plugins feed it closures that evaluate a BilevelProblem. Conventions: x upper, y lower variables;
F(x, y) upper and G(x, y) lower objective; H = d2_yy G; an HVP maps v to H v.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

Tensors = list[torch.Tensor]
HVP = Callable[[Tensors], Tensors]
GradFn = Callable[[Tensors], Tensors]


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inner product of two tensor lists, accumulated in float64 so CG's scalars do not lose precision."""
    return sum(((u.double() * w.double()).sum() for u, w in zip(a, b)), torch.zeros((), dtype=torch.float64))


def norm(a: Sequence[torch.Tensor]) -> float:
    return math.sqrt(float(dot(a, a)))


def grads_or_zeros(outputs: torch.Tensor | Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], **kwargs) -> Tensors:
    """autograd.grad with unused inputs given zero gradients (a None would silently drop a term)."""
    grads = torch.autograd.grad(outputs, list(inputs), allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads)]


def conjugate_gradient(
    hvp: HVP,
    b: Sequence[torch.Tensor],
    iters: int,
    damping: float = 0.0,
    tol: float = 0.0,
    x0: Sequence[torch.Tensor] | None = None,
) -> Tensors:
    """Approximately solve (H + damping I) v = b with at most `iters` CG iterations (one HVP each).

    iters must be explicit and >= 1: with iters = 0 CG returns v = 0, i.e. silently a zero hypergradient.
    x0: warm start (e.g. the previous outer step's solution, when successive systems are close); its residual
    b - (H + damping I) x0 costs one extra HVP. Without it CG starts from v = 0.
    Stops early once ||r|| <= tol ||b|| (tol = 0: only on an exactly zero residual, which happens after dim(y)
    iterations on a quadratic). H must be positive definite on the Krylov space; on non-positive curvature
    CG stops and returns its iterate, or at the first iteration x0 if given, else b itself (the H ~ I guess).
    """
    if iters < 1:
        raise ValueError(f"conjugate_gradient needs iters >= 1, got {iters}")

    def apply(v: Tensors) -> Tensors:
        out = hvp(v)
        return [a + damping * q for a, q in zip(out, v)] if damping else out

    if x0 is None:
        x = [torch.zeros_like(t) for t in b]
        r = [t.clone() for t in b]
    else:
        x = [t.detach().clone() for t in x0]
        r = [u - a for u, a in zip(b, apply(x))]
    p = [t.clone() for t in r]
    rr = float(dot(r, r))
    stop = tol * tol * float(dot(b, b))
    if rr <= stop:  # tol = 0: only an exactly zero residual (b = 0, or x0 exact)
        return x
    for i in range(iters):
        ap = apply(p)
        pap = float(dot(p, ap))
        if not pap > 0.0:  # also catches NaN
            if i > 0 or x0 is not None:
                return x
            return [t.clone() for t in b]
        alpha = rr / pap
        x = [u + alpha * q for u, q in zip(x, p)]
        r = [u - alpha * a for u, a in zip(r, ap)]
        rr_new = float(dot(r, r))
        if rr_new <= stop:
            break
        beta = rr_new / rr
        p = [u + beta * q for u, q in zip(r, p)]
        rr = rr_new
    return x


def neumann(hvp: HVP, b: Sequence[torch.Tensor], iters: int, alpha: float) -> Tensors:
    """v = alpha sum_{k=0..iters} (I - alpha H)^k b, i.e. [I - (I - alpha H)^(iters+1)] H^-1 b with iters HVPs.

    Converges to H^-1 b when 0 < alpha < 2 / lambda_max(H) and H is positive definite.
    """
    if iters < 0:
        raise ValueError(f"neumann needs iters >= 0, got {iters}")
    term = [t.clone() for t in b]
    total = [t.clone() for t in b]
    for _ in range(iters):
        hp = hvp(term)
        term = [t - alpha * h for t, h in zip(term, hp)]
        total = [s + t for s, t in zip(total, term)]
    return [alpha * s for s in total]


def hvp_autograd(grads: Sequence[torch.Tensor], wrt: Sequence[torch.Tensor]) -> HVP:
    """v -> d(<grads, v>)/d(wrt) by double backward; grads must come from autograd.grad(..., create_graph=True).

    With wrt = y this is H v; with wrt = x it is the mixed term d2_xy G v. The graph is retained so the closure can
    be called repeatedly; it is freed when the closure and `grads` are dropped.
    """
    live = [i for i, g in enumerate(grads) if g.requires_grad]  # zero-filled unused grads carry no graph
    grads, wrt = [grads[i] for i in live], list(wrt)

    def hvp(v: Tensors) -> Tensors:
        if not grads:
            return [torch.zeros_like(w) for w in wrt]
        out = grads_or_zeros(grads, wrt, grad_outputs=[v[i] for i in live], retain_graph=True)
        return [g.detach() for g in out]

    return hvp


def hvp_finite_difference(
    grad_fn: GradFn,
    point: Sequence[torch.Tensor],
    eps: float = 1e-3,
    scheme: Literal["central", "forward"] = "central",
    base: Sequence[torch.Tensor] | None = None,
) -> HVP:
    """v -> [grad_fn(y + h v) - grad_fn(y - h v)] / 2h: needs first derivatives only (flash attention has none
    of second order). h = eps * max(1, ||y||) / ||v||, so the step is relative to the parameters' scale.

    grad_fn receives fresh leaf tensors with requires_grad set and may return gradients w.r.t. them (H v) or
    w.r.t. other variables (mixed term). 'forward' uses [grad_fn(y + h v) - base] / h: half the cost, O(h) error;
    base = grad_fn(y) is computed once if not given.
    """
    point = [t.detach() for t in point]
    scale = eps * max(1.0, norm(point))
    base_grads: list[Tensors] = [[t.detach() for t in base]] if base is not None else []

    def at(shift: float, v: Tensors) -> Tensors:
        with torch.no_grad():
            moved = [(p + shift * d).requires_grad_(True) for p, d in zip(point, v)]
        return [g.detach() for g in grad_fn(moved)]

    def hvp(v: Tensors) -> Tensors:
        vn = norm(v)
        if vn == 0.0:
            return [torch.zeros_like(t) for t in (base_grads[0] if base_grads else v)]
        h = scale / vn
        plus = at(h, v)
        if scheme == "central":
            minus = at(-h, v)
            return [(a - c) / (2 * h) for a, c in zip(plus, minus)]
        if not base_grads:
            base_grads.append(at(0.0, v))
        return [(a - c) / h for a, c in zip(plus, base_grads[0])]

    return hvp


def implicit_hypergrad(
    direct_x: Sequence[torch.Tensor],
    grad_y_upper: Sequence[torch.Tensor],
    hvp: HVP,
    cross: Callable[[Tensors], Tensors],
    solve: Callable[[HVP, Tensors], Tensors],
) -> Tensors:
    """IFT: d_x F - d2_xy G . H^-1 d_y F, with `solve(hvp, b)` approximating H^-1 b and `cross(v)` = d2_xy G v."""
    v = solve(hvp, list(grad_y_upper))
    mixed = cross(v)
    return [d - m for d, m in zip(direct_x, mixed)]


def unrolled_hypergrad(
    upper: Callable[[Tensors, Tensors], torch.Tensor],
    lower_grad: Callable[[Tensors, Tensors, bool], Tensors],
    x: Sequence[torch.Tensor],
    y0: Sequence[torch.Tensor],
    steps: int,
    lr: float,
    truncate: int | None = None,
) -> tuple[Tensors, Tensors, torch.Tensor]:
    """Differentiate F(x, y_K) through y_{k+1} = y_k - lr grad_y G(x, y_k), k < K = steps.

    Only the last `truncate` steps keep a graph (None: all), so memory is O(truncate) not O(steps); earlier steps
    run detached. lower_grad(x, y, create_graph) must return grad_y G. Returns (dF/dx, y_K detached, F detached);
    nothing returned holds a graph, so it is released when this function returns.
    """
    keep = steps if truncate is None else max(0, min(truncate, steps))
    y = [t.detach().requires_grad_(True) for t in y0]
    for k in range(steps):
        graph = k >= steps - keep
        g = lower_grad(list(x), y, graph)
        if graph:
            y = [t - lr * d for t, d in zip(y, g)]
        else:
            with torch.no_grad():
                y = [(t - lr * d).requires_grad_(True) for t, d in zip(y, g)]
    value = upper(list(x), y)
    grads = grads_or_zeros(value, list(x))
    return [g.detach() for g in grads], [t.detach() for t in y], value.detach()


def conflict_averse_weight(grad_f: Sequence[torch.Tensor], grad_q: Sequence[torch.Tensor], phi: float) -> float:
    """BOME's multiplier lambda = max(phi - <grad F, grad q>, 0) / ||grad q||^2 (0 when grad q = 0).

    The update -(grad F + lambda grad q) then decreases q at rate >= phi whenever F's gradient would not.
    """
    qq = float(dot(grad_q, grad_q))
    if qq == 0.0:
        return 0.0
    return max(phi - float(dot(grad_f, grad_q)), 0.0) / qq
