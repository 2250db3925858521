"""Hypergradient math against closed forms (shared notes solvers.md, T1-T4), float64, on plain tensors."""

from __future__ import annotations

import pytest
import torch

from bilevel.optim.hypergrad import (
    conflict_averse_weight,
    conjugate_gradient,
    grads_or_zeros,
    hvp_autograd,
    hvp_finite_difference,
    implicit_hypergrad,
    neumann,
    unrolled_hypergrad,
)

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


NX, NY = 3, 6


def spd(n: int, gen: torch.Generator, lo: float = 0.5, hi: float = 3.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    return q @ torch.diag(torch.linspace(lo, hi, n, dtype=D)) @ q.T


@pytest.fixture()
def t1():
    """G = 1/2 y'Ay - y'(Bx + c), F = 1/2 ||y - y_t||^2 + rho/2 ||x||^2."""
    gen = torch.Generator().manual_seed(0)
    A = spd(NY, gen)
    B = torch.randn(NY, NX, generator=gen, dtype=D)
    c, yt = torch.randn(NY, generator=gen, dtype=D), torch.randn(NY, generator=gen, dtype=D)
    x = torch.randn(NX, generator=gen, dtype=D)
    rho = 0.3

    def G(xs, ys):
        (x_,), (y_,) = xs, ys
        return 0.5 * y_ @ A @ y_ - y_ @ (B @ x_ + c)

    def F(xs, ys):
        (x_,), (y_,) = xs, ys
        return 0.5 * ((y_ - yt) ** 2).sum() + 0.5 * rho * (x_**2).sum()

    ystar = torch.linalg.solve(A, B @ x + c)
    exact = rho * x + B.T @ torch.linalg.solve(A, ystar - yt)
    return {"A": A, "B": B, "c": c, "yt": yt, "x": x, "rho": rho, "G": G, "F": F, "ystar": ystar, "exact": exact}


def _ift_pieces(p, y):
    """Autograd closures for T1 at (x, y): direct d_x F, d_y F, H v and d2_xy G v."""
    x = p["x"].clone().requires_grad_(True)
    y = y.clone().requires_grad_(True)
    direct, b = grads_or_zeros(p["F"]([x], [y]), [x, y])
    gy = grads_or_zeros(p["G"]([x], [y]), [y], create_graph=True)
    return [direct.detach()], [b.detach()], hvp_autograd(gy, [y]), hvp_autograd(gy, [x])


def test_t1_cg_at_full_iterations_is_exact(t1):
    direct, b, hvp, cross = _ift_pieces(t1, t1["ystar"])
    hg = implicit_hypergrad(direct, b, hvp, cross, lambda h, r: conjugate_gradient(h, r, NY))
    torch.testing.assert_close(hg[0], t1["exact"], rtol=0, atol=1e-8)
    # two iterations are not enough: the check can fail
    few = implicit_hypergrad(direct, b, hvp, cross, lambda h, r: conjugate_gradient(h, r, 2))
    assert (few[0] - t1["exact"]).abs().max() > 1e-4


def test_t1_cg_solves_damped_system(t1):
    b = [torch.randn(NY, dtype=D, generator=torch.Generator().manual_seed(3))]
    v = conjugate_gradient(lambda u: [t1["A"] @ u[0]], b, NY, damping=0.7)
    torch.testing.assert_close(
        v[0], torch.linalg.solve(t1["A"] + 0.7 * torch.eye(NY, dtype=D), b[0]), rtol=0, atol=1e-10
    )


def test_cg_edge_cases():
    with pytest.raises(ValueError):
        conjugate_gradient(lambda v: v, [torch.ones(1, dtype=D)], 0)
    # scalar (1-element) system: one iteration solves it, not a zero gradient
    torch.testing.assert_close(
        conjugate_gradient(lambda v: [4.0 * v[0]], [torch.ones(1, dtype=D)], 1)[0], torch.full((1,), 0.25, dtype=D)
    )
    # negative curvature at the first iteration: falls back to b instead of returning zero
    b = [torch.tensor([1.0, 2.0], dtype=D)]
    torch.testing.assert_close(conjugate_gradient(lambda v: [-v[0]], b, 5)[0], b[0])
    assert conjugate_gradient(lambda v: v, [torch.zeros(3, dtype=D)], 3)[0].abs().sum() == 0


@pytest.mark.parametrize("K,truncate", [(1, None), (4, None), (7, 3), (5, 1)])
def test_t1_unrolled_matches_closed_form(t1, K, truncate):
    A, B, eta = t1["A"], t1["B"], 0.2
    y0 = torch.randn(NY, dtype=D, generator=torch.Generator().manual_seed(1))

    def lower_grad(xs, ys, graph):
        return grads_or_zeros(t1["G"](xs, ys), ys, create_graph=graph)

    x = t1["x"].clone().requires_grad_(True)
    hg, y_k, _ = unrolled_hypergrad(t1["F"], lower_grad, [x], [y0], K, eta, truncate)
    y = y0.clone()
    for _ in range(K):
        y = y - eta * (A @ y - B @ t1["x"] - t1["c"])
    torch.testing.assert_close(y_k[0], y, rtol=0, atol=1e-12)
    k = K if truncate is None else truncate
    eye = torch.eye(NY, dtype=D)
    expected = t1["rho"] * t1["x"] + B.T @ (eye - torch.linalg.matrix_power(eye - eta * A, k)) @ torch.linalg.solve(
        A, y - t1["yt"]
    )
    torch.testing.assert_close(hg[0], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("K", [0, 1, 5, 30])
def test_t1_neumann_matches_truncated_closed_form(t1, K):
    A, alpha = t1["A"], 0.25
    direct, b, hvp, cross = _ift_pieces(t1, t1["ystar"])
    hg = implicit_hypergrad(direct, b, hvp, cross, lambda h, r: neumann(h, r, K, alpha))
    eye = torch.eye(NY, dtype=D)
    trunc = eye - torch.linalg.matrix_power(eye - alpha * A, K + 1)
    expected = t1["rho"] * t1["x"] + t1["B"].T @ trunc @ torch.linalg.solve(A, t1["ystar"] - t1["yt"])
    torch.testing.assert_close(hg[0], expected, rtol=0, atol=1e-10)


def test_t2_ridge_hyperparameter_gradient():
    gen = torch.Generator().manual_seed(2)
    n, d = 20, 5
    X, y = torch.randn(n, d, generator=gen, dtype=D), torch.randn(n, generator=gen, dtype=D)
    Xv, yv = torch.randn(8, d, generator=gen, dtype=D), torch.randn(8, generator=gen, dtype=D)
    lam = torch.rand(d, generator=gen, dtype=D) + 0.1

    def wstar(l):
        return torch.linalg.solve(X.T @ X + torch.diag(l), X.T @ y)

    w = wstar(lam).requires_grad_(True)
    lam_ = lam.clone().requires_grad_(True)
    G = 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (lam_ * w**2).sum()
    gw = grads_or_zeros(G, [w], create_graph=True)
    F = 0.5 * ((Xv @ w - yv) ** 2).sum()
    b = [g.detach() for g in grads_or_zeros(F, [w])]
    hg = implicit_hypergrad([torch.zeros(d, dtype=D)], b, hvp_autograd(gw, [w]), hvp_autograd(gw, [lam_]),
                            lambda h, r: conjugate_gradient(h, r, d))  # fmt: skip
    wd = w.detach()
    H = X.T @ X + torch.diag(lam)
    expected = -wd * torch.linalg.solve(H, Xv.T @ (Xv @ wd - yv))
    torch.testing.assert_close(hg[0], expected, rtol=0, atol=1e-8)
    # and against differentiating the closed-form w*(lam) directly
    direct = torch.autograd.functional.jacobian(lambda l: 0.5 * ((Xv @ wstar(l) - yv) ** 2).sum(), lam)
    torch.testing.assert_close(hg[0], direct, rtol=0, atol=1e-8)


def test_t3_proximal_jacobian():
    gen = torch.Generator().manual_seed(4)
    A, mu, n = spd(NY, gen), 0.8, NY
    c, x = torch.randn(n, generator=gen, dtype=D), torch.randn(n, generator=gen, dtype=D)
    eye = torch.eye(n, dtype=D)
    exact = mu * torch.linalg.inv(A + mu * eye)
    autodiff = torch.autograd.functional.jacobian(lambda x_: torch.linalg.solve(A + mu * eye, c + mu * x_), x)
    torch.testing.assert_close(autodiff, exact, rtol=0, atol=1e-12)
    # IFT with d2_xy G = -mu I: the hypergradient for b = e_i is row i of dy*/dx (symmetric here)
    rows = []
    for i in range(n):
        hg = implicit_hypergrad([torch.zeros(n, dtype=D)], [eye[i]], lambda v: [(A + mu * eye) @ v[0]],
                                lambda v: [-mu * v[0]], lambda h, r: conjugate_gradient(h, r, n))  # fmt: skip
        rows.append(hg[0])
    torch.testing.assert_close(torch.stack(rows), exact, rtol=0, atol=1e-9)
    # unrolled K steps of the proximal lower problem: [I - (I - eta (A + mu I))^K] (A + mu I)^-1 mu
    K, eta = 40, 0.2
    ys0 = torch.zeros(n, dtype=D)
    cols = []
    for i in range(n):
        x_ = x.clone().requires_grad_(True)

        def lower_grad(xs, ys, graph):
            return [A @ ys[0] - c + mu * (ys[0] - xs[0])]

        hg, _, _ = unrolled_hypergrad(lambda xs, ys, i=i: ys[0][i], lower_grad, [x_], [ys0], K, eta)
        cols.append(hg[0])
    unrolled_exact = (
        (eye - torch.linalg.matrix_power(eye - eta * (A + mu * eye), K)) @ torch.linalg.inv(A + mu * eye) * mu
    )
    torch.testing.assert_close(torch.stack(cols), unrolled_exact, rtol=0, atol=1e-10)


def _t4(seed: int):
    gen = torch.Generator().manual_seed(seed)
    m, n = 3, 7
    M, b = torch.randn(m, n, generator=gen, dtype=D), torch.randn(m, generator=gen, dtype=D)
    theta0 = torch.randn(n, generator=gen, dtype=D)
    return (
        M,
        b,
        theta0,
        theta0 - torch.linalg.pinv(M) @ (M @ theta0 - b),
        theta0 + 0.3 * torch.randn(n, generator=gen, dtype=D),
    )


def _conflict_averse_descent(M, b, theta0, theta, steps, rate):
    for k in range(steps):
        gq = M.T @ (M @ theta - b)
        gf = theta - theta0
        lam = conflict_averse_weight([gf], [gq], 0.5 * float(gq @ gq))
        theta = theta - rate(k) * (gf + lam * gq)
    return theta


@pytest.mark.parametrize("seed", [5, 6])
def test_t4_conflict_averse_iteration_reaches_projection(seed):
    """A fixed step leaves an O(step) oscillation around the projection; a 1/k step removes it."""
    M, b, theta0, target, start = _t4(seed)
    theta = _conflict_averse_descent(M, b, theta0, start, 3000, lambda k: 0.05 / (1 + k / 100))
    assert (theta - target).norm() < 2e-2 < 0.1 * (start - target).norm()
    assert (M @ theta - b).norm() < 2e-2
    errs = [
        (_conflict_averse_descent(M, b, theta0, start, 3000, lambda k, s=s: s) - target).norm() for s in (0.01, 0.005)
    ]
    assert errs[1] < 0.7 * errs[0]  # the bias shrinks with the step


def test_conflict_averse_weight_formula():
    gf, gq = [torch.tensor([1.0, 0.0], dtype=D)], [torch.tensor([0.0, 2.0], dtype=D)]
    assert conflict_averse_weight(gf, gq, 2.0) == pytest.approx(0.5)  # (2 - 0) / 4
    assert conflict_averse_weight([torch.tensor([0.0, 5.0], dtype=D)], gq, 2.0) == 0.0  # F already decreases q
    assert conflict_averse_weight(gf, [torch.zeros(2, dtype=D)], 1.0) == 0.0


@pytest.mark.parametrize("scheme,tol", [("central", 1e-6), ("forward", 1e-3)])
def test_finite_difference_hvp_matches_autograd(scheme, tol):
    gen = torch.Generator().manual_seed(6)
    W = torch.randn(9, 5, generator=gen, dtype=D)
    y1, y2 = torch.randn(5, generator=gen, dtype=D), torch.randn(3, 2, generator=gen, dtype=D)

    def f(ys):  # not quadratic, so the difference quotient has real truncation error
        a, m = ys
        return torch.log(torch.cosh(W @ a)).sum() + 0.1 * (a**4).sum() + (torch.sin(m) * m.sum()).sum()

    leaves = [y1.clone().requires_grad_(True), y2.clone().requires_grad_(True)]
    auto = hvp_autograd(grads_or_zeros(f(leaves), leaves, create_graph=True), leaves)
    fd = hvp_finite_difference(
        lambda pts: grads_or_zeros(f(pts), pts), [y1, y2], eps=1e-5 if scheme == "central" else 1e-7, scheme=scheme
    )
    for seed in range(3):
        g = torch.Generator().manual_seed(10 + seed)
        v = [torch.randn(5, generator=g, dtype=D), torch.randn(3, 2, generator=g, dtype=D)]
        a, b = auto(v), fd(v)
        scale = max(t.abs().max() for t in a)
        for u, w in zip(a, b):
            assert (u - w).abs().max() <= tol * scale
    assert all(t.abs().sum() == 0 for t in fd([torch.zeros(5, dtype=D), torch.zeros(3, 2, dtype=D)]))


def test_t1_warm_started_cg_converges_to_the_same_solution(t1):
    """From any start, dim(y) iterations solve the system exactly (as from zero); a start at the solution costs
    only the residual's HVP; the stopping tolerance stays relative to ||b||."""
    A = t1["A"]
    b = [torch.randn(NY, dtype=D, generator=torch.Generator().manual_seed(7))]
    exact = torch.linalg.solve(A, b[0])
    calls: list[int] = []

    def hvp(v):
        calls.append(1)
        return [A @ v[0]]

    x0 = [torch.randn(NY, dtype=D, generator=torch.Generator().manual_seed(8))]
    torch.testing.assert_close(conjugate_gradient(hvp, b, NY, x0=x0)[0], exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(conjugate_gradient(hvp, b, NY)[0], exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        conjugate_gradient(hvp, b, NY, damping=0.4, x0=x0)[0],
        torch.linalg.solve(A + 0.4 * torch.eye(NY, dtype=D), b[0]), rtol=0, atol=1e-10,
    )  # fmt: skip
    calls.clear()
    torch.testing.assert_close(conjugate_gradient(hvp, b, NY, tol=1e-10, x0=[exact])[0], exact, rtol=0, atol=1e-12)
    assert len(calls) == 1  # only the residual's HVP
    assert x0[0].data_ptr() != conjugate_gradient(hvp, b, 1, x0=x0)[0].data_ptr()  # the start is not modified


def test_t1_warm_start_accumulates_across_solves(t1):
    """Re-solving one system with 2 iterations per solve: warm-started, the error shrinks solve after solve;
    cold, it stays at the 2-iteration error (why warm starts help when successive systems are close)."""
    A = t1["A"]
    b = [torch.randn(NY, dtype=D, generator=torch.Generator().manual_seed(9))]
    exact = torch.linalg.solve(A, b[0])
    cold = float((conjugate_gradient(lambda v: [A @ v[0]], b, 2)[0] - exact).norm())
    v = None
    for _ in range(6):
        v = conjugate_gradient(lambda u: [A @ u[0]], b, 2, x0=v)
    warm = float((v[0] - exact).norm())
    assert cold > 1e-2 and warm < 1e-2 * cold
