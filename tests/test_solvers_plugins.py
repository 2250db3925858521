"""The solver plugins end to end on tiny float64 quadratic BilevelProblems built from nn.Module parameters."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import BilevelProblem, Objective
from bilevel.plugins.solvers.bome import BomeSolver
from bilevel.plugins.solvers.implicit import ImplicitSolver
from bilevel.plugins.solvers.unrolled import UnrolledSolver

D = torch.float64
NX, NY = 3, 5
PLAIN_IFT = {"upper_every": 1, "hvp_batch_size": None}  # the plain estimator: every step, H on the whole batch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    return q @ torch.diag(torch.linspace(0.5, 2.0, n, dtype=D)) @ q.T


class Vars(nn.Module):
    def __init__(self, **shapes: torch.Tensor) -> None:
        super().__init__()
        for k, v in shapes.items():
            setattr(self, k, nn.Parameter(v.clone()))


def split_problem(lr_low=0.1, lr_up=0.1, seed=0):
    """T1 with x and y as the module's two parameters: G = 1/2 y'Ay - y'(Bx + c), F = 1/2||y - y_t||^2 + rho/2||x||^2."""
    gen = torch.Generator().manual_seed(seed)
    A, B = _spd(NY, gen), torch.randn(NY, NX, generator=gen, dtype=D)
    c, yt = torch.randn(NY, generator=gen, dtype=D), torch.randn(NY, generator=gen, dtype=D)
    rho = 0.5
    m = Vars(x=torch.randn(NX, generator=gen, dtype=D), y=torch.randn(NY, generator=gen, dtype=D))
    lower = Objective(draw=lambda: None, loss=lambda _: 0.5 * m.y @ A @ m.y - m.y @ (B @ m.x + c))
    upper = Objective(draw=lambda: None, loss=lambda _: 0.5 * ((m.y - yt) ** 2).sum() + 0.5 * rho * (m.x**2).sum())
    problem = BilevelProblem(
        model=m, lower=lower, upper=upper, lower_params={"y": m.y}, upper_params={"x": m.x},
        lower_optimizer=torch.optim.SGD([m.y], lr=lr_low), upper_optimizer=torch.optim.SGD([m.x], lr=lr_up),
    )  # fmt: skip
    Ainv = torch.linalg.inv(A)
    # Phi(x) = 1/2 ||A^-1(Bx + c) - y_t||^2 + rho/2 ||x||^2
    xstar = torch.linalg.solve(B.T @ Ainv @ Ainv @ B + rho * torch.eye(NX, dtype=D), B.T @ Ainv @ (yt - Ainv @ c))
    return problem, {"A": A, "B": B, "c": c, "yt": yt, "rho": rho, "xstar": xstar}


def proximal_problem(lr_low=0.1, lr_up=0.2, mu=0.7, seed=1):
    """T3: lower 1/2 y'Ay - c'y (+ mu/2 ||y - x||^2 added by the solver), upper 1/2 ||y - y_t||^2, one tensor y."""
    gen = torch.Generator().manual_seed(seed)
    A, c, yt = _spd(NY, gen), torch.randn(NY, generator=gen, dtype=D), torch.randn(NY, generator=gen, dtype=D)
    m = Vars(y=torch.randn(NY, generator=gen, dtype=D))
    lower = Objective(draw=lambda: None, loss=lambda _: 0.5 * m.y @ A @ m.y - c @ m.y)
    upper = Objective(draw=lambda: None, loss=lambda _: 0.5 * ((m.y - yt) ** 2).sum())
    problem = BilevelProblem(
        model=m, lower=lower, upper=upper, lower_params={"y": m.y}, upper_params={"y": m.y},
        lower_optimizer=torch.optim.SGD([m.y], lr=lr_low), upper_optimizer=torch.optim.SGD([m.y], lr=lr_up),
    )  # fmt: skip
    xstar = ((A + mu * torch.eye(NY, dtype=D)) @ yt - c) / mu  # y*(x*) = y_t
    return problem, {"A": A, "c": c, "yt": yt, "mu": mu, "xstar": xstar}


# ------------------------------------------------------------------ one step against the closed form
@pytest.mark.parametrize("hvp", ["autograd", "finite-difference"])
def test_implicit_split_step_is_exact_hypergradient(hvp):
    problem, k = split_problem()
    m, A, B = problem.model, k["A"], k["B"]
    x0, y0 = m.x.detach().clone(), m.y.detach().clone()
    solver = ImplicitSolver(ImplicitSolver.Config(coupling="split", iters=NY, hvp=hvp, **PLAIN_IFT))
    solver.setup(problem)
    metrics = solver.step(problem, 0)
    y1 = y0 - 0.1 * (A @ y0 - B @ x0 - k["c"])
    hg = k["rho"] * x0 + B.T @ torch.linalg.solve(A, y1 - k["yt"])
    torch.testing.assert_close(m.y.detach(), y1, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.x.detach(), x0 - 0.1 * hg, rtol=0, atol=1e-8)
    assert set(metrics) >= {"lower_loss", "upper_loss"}


def test_implicit_proximal_neumann_step_matches_closed_form():
    problem, k = proximal_problem()
    A, mu, y0 = k["A"], k["mu"], problem.model.y.detach().clone()
    K, alpha = 4, 0.3
    solver = ImplicitSolver(
        ImplicitSolver.Config(
            coupling="proximal", mu=mu, linear_solver="neumann", iters=K, neumann_alpha=alpha, **PLAIN_IFT
        )
    )
    solver.setup(problem)
    solver.step(problem, 0)
    y1 = y0 - 0.1 * (A @ y0 - k["c"])  # anchor = y0, so the proximal term vanishes at the first step
    H = A + mu * torch.eye(NY, dtype=D)
    eye = torch.eye(NY, dtype=D)
    hg = mu * (eye - torch.linalg.matrix_power(eye - alpha * H, K + 1)) @ torch.linalg.solve(H, y1 - k["yt"])
    torch.testing.assert_close(problem.model.y.detach(), y1, rtol=0, atol=1e-12)
    torch.testing.assert_close(solver.state_dict()["anchors"]["y"], y0 - 0.2 * hg, rtol=0, atol=1e-10)


@pytest.mark.parametrize("K,truncate", [(3, None), (4, 2)])
def test_unrolled_split_step_matches_closed_form(K, truncate):
    problem, k = split_problem()
    m, A, B, eta = problem.model, k["A"], k["B"], 0.15
    x0, y = m.x.detach().clone(), m.y.detach().clone()
    solver = UnrolledSolver(UnrolledSolver.Config(coupling="split", inner_steps=K, inner_lr=eta, truncate=truncate))
    solver.step(problem, 0)
    for _ in range(K):
        y = y - eta * (A @ y - B @ x0 - k["c"])
    eye = torch.eye(NY, dtype=D)
    kk = K if truncate is None else truncate
    hg = k["rho"] * x0 + B.T @ (eye - torch.linalg.matrix_power(eye - eta * A, kk)) @ torch.linalg.solve(A, y - k["yt"])
    torch.testing.assert_close(m.y.detach(), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.x.detach(), x0 - 0.1 * hg, rtol=0, atol=1e-10)


def test_unrolled_proximal_step_matches_closed_form():
    problem, k = proximal_problem()
    A, mu, eta, K = k["A"], k["mu"], 0.2, 3
    x0 = problem.model.y.detach().clone()
    y = x0.clone()
    solver = UnrolledSolver(UnrolledSolver.Config(coupling="proximal", mu=mu, inner_steps=K, inner_lr=eta))
    solver.step(problem, 0)
    H, eye = A + mu * torch.eye(NY, dtype=D), torch.eye(NY, dtype=D)
    for _ in range(K):
        y = y - eta * (H @ y - k["c"] - mu * x0)
    jac = mu * (eye - torch.linalg.matrix_power(eye - eta * H, K)) @ torch.linalg.inv(H)  # dy_K/dx, symmetric
    torch.testing.assert_close(problem.model.y.detach(), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(solver.state_dict()["anchors"]["y"], x0 - 0.2 * jac @ (y - k["yt"]), rtol=0, atol=1e-10)


# ------------------------------------------------------------------ implicit's cost options
def _clone_split(problem):
    """A second split problem (same closed form) holding the same current x and y."""
    twin, _ = split_problem()
    with torch.no_grad():
        twin.model.x.copy_(problem.model.x)
        twin.model.y.copy_(problem.model.y)
    return twin


def test_implicit_warm_start_converges_to_the_same_steps_and_resumes():
    (cold_p, _), (warm_p, _) = split_problem(), split_problem()
    cold = ImplicitSolver(ImplicitSolver.Config(coupling="split", iters=NY, **PLAIN_IFT))
    warm = ImplicitSolver(ImplicitSolver.Config(coupling="split", iters=NY + 1, warm_start=True, **PLAIN_IFT))
    for s in range(3):  # with enough iterations the warm start reaches the same (exact) solution
        cold.step(cold_p, s)
        warm.step(warm_p, s)
        torch.testing.assert_close(warm_p.model.x.detach(), cold_p.model.x.detach(), rtol=0, atol=1e-8)
    # with 2 HVPs the warm start matters, and a resumed solver must carry it
    config = ImplicitSolver.Config(coupling="split", iters=2, warm_start=True, **PLAIN_IFT)
    problem, _ = split_problem()
    first = ImplicitSolver(config)
    for s in range(3):
        first.step(problem, s)
    state = first.state_dict()
    assert set(state["cg_start"]) == {"y"}
    resumed, fresh = ImplicitSolver(config), ImplicitSolver(config)
    resumed.load_state_dict(state)  # before setup, as the runner does
    twin_resumed, twin_fresh = _clone_split(problem), _clone_split(problem)
    first.step(problem, 3)
    resumed.step(twin_resumed, 3)
    fresh.step(twin_fresh, 3)
    torch.testing.assert_close(twin_resumed.model.x.detach(), problem.model.x.detach(), rtol=0, atol=0)
    assert (twin_fresh.model.x.detach() - problem.model.x.detach()).abs().max() > 1e-6


def test_implicit_upper_every_is_respected():
    problem, _ = split_problem()
    solver = ImplicitSolver(ImplicitSolver.Config(coupling="split", iters=2, upper_every=3))
    xs, ran = [], []
    for s in range(6):
        ran.append("upper_loss" in solver.step(problem, s))
        xs.append(problem.model.x.detach().clone())
    assert ran == [False, False, True] * 2
    assert torch.equal(xs[0], xs[1]) and not torch.equal(xs[1], xs[2]) and torch.equal(xs[2], xs[4])
    from bilevel.plugins.solvers.alternating import AlternatingConfig

    assert ImplicitSolver.Config().upper_every == AlternatingConfig().upper_every  # as many upper updates


@pytest.mark.parametrize("hvp", ["autograd", "finite-difference"])
@pytest.mark.parametrize("n", [8, None])
def test_implicit_hvp_batch_size_draws_the_requested_batch(hvp, n):
    sizes: list[int] = []
    problem = mlp_problem("proximal")
    loss = problem.lower.loss
    problem.lower.loss = lambda batch: sizes.append(len(batch[0])) or loss(batch)
    solver = ImplicitSolver(
        ImplicitSolver.Config(coupling="proximal", iters=2, upper_every=1, hvp_batch_size=n, hvp=hvp)
    )
    solver.step(problem, 0)
    assert sizes[0] == 32  # the lower step itself
    assert sizes[1:] and set(sizes[1:]) == {32 if n is None else n}


def test_batch_head_slices_per_sample_tensors_only():
    from dataclasses import dataclass

    from bilevel.optim.functional import batch_head

    @dataclass
    class Inner:
        eps: torch.Tensor
        feats: dict

    @dataclass
    class Batch:
        x: torch.Tensor
        scale: torch.Tensor  # not per-sample: kept
        pair: tuple
        inner: Inner
        note: str

    b = Batch(
        torch.arange(10.0), torch.ones(3), (torch.zeros(10, 2), 5), Inner(torch.ones(10, 4), {"a": torch.ones(10)}), "n"
    )
    h = batch_head(b, 4)
    assert torch.equal(h.x, torch.arange(4.0)) and h.scale.shape == (3,) and h.pair[0].shape == (4, 2)
    assert h.pair[1] == 5 and h.inner.eps.shape == (4, 4) and h.inner.feats["a"].shape == (4,) and h.note == "n"
    assert batch_head(b, 10) is b and batch_head(None, 4) is None


def _block_problem(mu: float, lr_low: float = 0.1, lr_up: float = 0.2):
    """Proximal problem whose lower level has y (anchored, 5) and z (3): G = 1/2 w'Aw - c'w (+ mu/2||y - x||^2),
    w = [y; z]; F = 1/2 ||w - t||^2. The upper level trains y only."""
    gen = torch.Generator().manual_seed(11)
    n = NY + 3
    A, c, t = _spd(n, gen), torch.randn(n, generator=gen, dtype=D), torch.randn(n, generator=gen, dtype=D)
    m = Vars(y=torch.randn(NY, generator=gen, dtype=D), z=torch.randn(3, generator=gen, dtype=D))

    def w():
        return torch.cat([m.y, m.z])

    problem = BilevelProblem(
        model=m, lower=Objective(draw=lambda: None, loss=lambda _: 0.5 * w() @ A @ w() - c @ w()),
        upper=Objective(draw=lambda: None, loss=lambda _: 0.5 * ((w() - t) ** 2).sum()),
        lower_params={"y": m.y, "z": m.z}, upper_params={"y": m.y},
        lower_optimizer=torch.optim.SGD([m.y, m.z], lr=lr_low), upper_optimizer=torch.optim.SGD([m.y], lr=lr_up),
    )  # fmt: skip
    return problem, A, c, t


@pytest.mark.parametrize("block", ["full", "upper"])
def test_implicit_hessian_block_matches_closed_form(block):
    mu = 0.7
    problem, A, c, t = _block_problem(mu)
    w0 = torch.cat([problem.model.y, problem.model.z]).detach()
    dim = NY if block == "upper" else NY + 3
    solver = ImplicitSolver(
        ImplicitSolver.Config(coupling="proximal", mu=mu, iters=dim, hessian_block=block, **PLAIN_IFT)
    )
    solver.step(problem, 0)
    w1 = w0 - 0.1 * (A @ w0 - c)  # anchor = y0: no proximal pull at the first step
    # upper: the other lower parameters held fixed, mu (A_yy + mu I)^-1 d_y F; full: mu P_U (A + mu P_U)^-1 d_w F
    upper = mu * torch.linalg.solve(A[:NY, :NY] + mu * torch.eye(NY, dtype=D), (w1 - t)[:NY])
    P = torch.diag(torch.cat([torch.ones(NY, dtype=D), torch.zeros(3, dtype=D)]))
    full = mu * torch.linalg.solve(A + mu * P, w1 - t)[:NY]
    assert (upper - full).abs().max() > 1e-2  # the two estimators differ here, so the check can tell them apart
    hg = upper if block == "upper" else full
    torch.testing.assert_close(solver.state_dict()["anchors"]["y"], w0[:NY] - 0.2 * hg, rtol=0, atol=1e-10)


def test_hessian_block_upper_needs_proximal():
    problem, _ = split_problem()
    with pytest.raises(BilevelError, match="hessian_block 'upper' needs the proximal coupling"):
        ImplicitSolver(ImplicitSolver.Config(coupling="split", hessian_block="upper")).setup(problem)


# ------------------------------------------------------------------ runs move toward the known solution
def _split_distance(problem, k):
    return float((problem.model.x.detach() - k["xstar"]).norm())


@pytest.mark.parametrize(
    "make",
    [
        lambda: ImplicitSolver(ImplicitSolver.Config(coupling="split", iters=NY, **PLAIN_IFT)),
        lambda: ImplicitSolver(
            ImplicitSolver.Config(coupling="split", iters=3, hvp="finite-difference", fd_scheme="forward", **PLAIN_IFT)
        ),
        lambda: UnrolledSolver(UnrolledSolver.Config(coupling="split", inner_steps=5, inner_lr=0.3)),
        lambda: BomeSolver(BomeSolver.Config(coupling="split", inner_steps=10, inner_lr=0.3)),
    ],
    ids=["implicit-cg", "implicit-fd-forward", "unrolled", "bome"],
)
def test_split_runs_converge_toward_bilevel_solution(make):
    problem, k = split_problem(lr_low=0.3, lr_up=0.03)  # Phi's Hessian has eigenvalues 1.9 .. 47
    solver = make()
    solver.setup(problem)
    start = _split_distance(problem, k)
    for step in range(300):
        solver.step(problem, step)
    assert _split_distance(problem, k) < 0.05 * start


@pytest.mark.parametrize("name", ["implicit", "unrolled"])
def test_proximal_runs_converge_toward_bilevel_solution(name):
    problem, k = proximal_problem(lr_low=0.3, lr_up=0.5)
    if name == "implicit":
        solver = ImplicitSolver(ImplicitSolver.Config(coupling="proximal", mu=k["mu"], iters=NY, **PLAIN_IFT))
    else:
        solver = UnrolledSolver(UnrolledSolver.Config(coupling="proximal", mu=k["mu"], inner_steps=5, inner_lr=0.3))
    solver.setup(problem)
    start_y = float((problem.model.y.detach() - k["yt"]).norm())
    start_x = float((solver.state_dict()["anchors"]["y"] - k["xstar"]).norm())
    for step in range(300):
        solver.step(problem, step)
    assert float((problem.model.y.detach() - k["yt"]).norm()) < 0.05 * start_y
    assert float((solver.state_dict()["anchors"]["y"] - k["xstar"]).norm()) < 0.05 * start_x


def test_bome_shared_reaches_t4_projection():
    """T4 through the plugin: theta in argmin 1/2||M theta - b||^2 closest to theta0."""
    gen = torch.Generator().manual_seed(5)
    M, b = torch.randn(3, 7, generator=gen, dtype=D), torch.randn(3, generator=gen, dtype=D)
    theta0 = torch.randn(7, generator=gen, dtype=D)
    target = theta0 - torch.linalg.pinv(M) @ (M @ theta0 - b)
    m = Vars(theta=theta0 + 0.3 * torch.randn(7, generator=gen, dtype=D))
    opt = torch.optim.SGD([m.theta], lr=0.05)
    problem = BilevelProblem(
        model=m,
        lower=Objective(draw=lambda: None, loss=lambda _: 0.5 * ((M @ m.theta - b) ** 2).sum()),
        upper=Objective(draw=lambda: None, loss=lambda _: 0.5 * ((m.theta - theta0) ** 2).sum()),
        lower_params={"theta": m.theta}, upper_params={"theta": m.theta},
        lower_optimizer=opt, upper_optimizer=torch.optim.SGD([m.theta], lr=0.05),
        lower_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 / (1 + k / 100)),
    )  # fmt: skip
    solver = BomeSolver(BomeSolver.Config(coupling="shared", eta=0.5))
    solver.setup(problem)
    start = float((m.theta.detach() - target).norm())
    for step in range(3000):
        metrics = solver.step(problem, step)
    assert float((m.theta.detach() - target).norm()) < min(2e-2, 0.1 * start)
    assert metrics["lambda"] > 0


# ------------------------------------------------------------------ couplings and config errors
@pytest.mark.parametrize(
    "cls,coupling", [(UnrolledSolver, "shared"), (ImplicitSolver, "shared"), (BomeSolver, "proximal")]
)
def test_unsupported_coupling_is_rejected(cls, coupling):
    """The coupling is validated with the solver's config, before any model is built: one line naming the value."""
    from pydantic import ValidationError

    from bilevel.commands.run import resolve_plugins
    from bilevel.core.config import RunConfig

    assert coupling not in cls.couplings
    with pytest.raises(ValidationError):
        cls.Config(coupling=coupling)
    config = RunConfig.model_validate({"solver": {"name": cls.name, "options": {"coupling": coupling}}})
    with pytest.raises(BilevelError) as err:
        resolve_plugins(config)
    msg = str(err.value)
    assert "\n" not in msg and "option coupling" in msg and repr(coupling) in msg
    assert all(repr(c) in msg for c in cls.couplings)


def test_couplings_are_read_from_the_config_literal():
    from bilevel.optim.baselines import LowerOnly, UpperOnly
    from bilevel.plugins.solvers.alternating import AlternatingSolver

    assert AlternatingSolver.couplings == {"shared", "split"} and BomeSolver.couplings == {"shared", "split"}
    assert UnrolledSolver.couplings == ImplicitSolver.couplings == {"proximal", "split"}
    assert LowerOnly().coupling == UpperOnly().coupling == "shared"
    assert ImplicitSolver().coupling == "proximal"
    assert BomeSolver(BomeSolver.Config(coupling="split")).coupling == "split"


def test_coupling_parameter_checks():
    problem, _ = proximal_problem()  # upper and lower share y: not a split
    with pytest.raises(BilevelError, match="disjoint"):
        ImplicitSolver(ImplicitSolver.Config(coupling="split")).setup(problem)
    problem, _ = split_problem()  # x is not a lower parameter: no proximal anchor
    with pytest.raises(BilevelError, match="proximal coupling needs"):
        UnrolledSolver(UnrolledSolver.Config(coupling="proximal")).setup(problem)


def test_registered_with_validated_options():
    from bilevel.registry import get_registry

    reg = get_registry()
    assert {"unrolled", "implicit-gradient", "bome"} <= set(reg.names("solver"))
    with pytest.raises(BilevelError, match="iters"):
        reg.create("solver", "implicit-gradient", {"iters": 0})
    with pytest.raises(BilevelError, match="hvp"):
        reg.create("solver", "implicit-gradient", {"hvp": "double"})


# ------------------------------------------------------------------ memory stays flat over a run
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 128), nn.Linear(128, 16)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def mlp_problem(coupling: str, leak: list | None = None) -> BilevelProblem:
    torch.manual_seed(0)
    m = MLP().double()
    gen = torch.Generator().manual_seed(0)

    def draw():
        return torch.randn(32, 64, generator=gen, dtype=D), torch.randn(32, 16, generator=gen, dtype=D)

    def upper_loss(batch):
        loss = (m(batch[0]) ** 2).mean()
        if leak is not None:
            leak.append(loss)  # keeps this step's graph alive: the control the check must catch
        return loss

    lower = Objective(draw=draw, loss=lambda batch: ((m(batch[0]) - batch[1]) ** 2).mean())
    upper = Objective(draw=draw, loss=upper_loss)
    lower_p = dict(m.b.named_parameters()) if coupling == "split" else dict(m.named_parameters())
    upper_p = dict(m.a.named_parameters()) if coupling == "split" else dict(m.named_parameters())
    return BilevelProblem(
        model=m, lower=lower, upper=upper, lower_params=lower_p, upper_params=upper_p,
        lower_optimizer=torch.optim.Adam(lower_p.values(), lr=1e-3), upper_optimizer=torch.optim.Adam(upper_p.values(), lr=1e-3),
    )  # fmt: skip


def _live_tensors() -> tuple[int, int]:
    """(live tensors, live tensors carrying a graph) that Python can see."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on deprecated torch.distributed aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.grad_fn is not None for t in tensors)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _growth(solver, problem, steps: int = 200) -> tuple[int, int, float]:
    solver.setup(problem)
    for s in range(20):
        solver.step(problem, s)
    n0, _ = _live_tensors()
    rss0 = _rss_mb()
    for s in range(20, steps):
        solver.step(problem, s)
    n1, graphs = _live_tensors()
    return n1 - n0, graphs, _rss_mb() - rss0


@pytest.mark.parametrize(
    "make,coupling",
    [
        (lambda: UnrolledSolver(UnrolledSolver.Config(coupling="proximal", inner_steps=3, truncate=2)), "proximal"),
        (lambda: ImplicitSolver(ImplicitSolver.Config(coupling="proximal", iters=3)), "proximal"),
        (lambda: ImplicitSolver(ImplicitSolver.Config(coupling="split", iters=3, hvp="finite-difference")), "split"),
    ],
    ids=["unrolled-proximal", "implicit-proximal", "implicit-split-fd"],
)
def test_memory_flat_over_200_steps(make, coupling):
    grown, graphs, rss = _growth(make(), mlp_problem(coupling))
    assert grown == 0 and graphs == 0
    assert rss < 20.0  # a leaked graph here costs ~1 MB per step


def test_memory_check_catches_a_leak():
    leak: list = []
    grown, graphs, _ = _growth(
        ImplicitSolver(ImplicitSolver.Config(coupling="proximal", iters=3, upper_every=1)),
        mlp_problem("proximal", leak),
        40,
    )
    assert grown >= 20 and graphs >= 20
