"""fp16 loss scaling in the shared optimiser step: a finite step equals the unscaled one, an overflow is skipped
and lowers the scale (torch's GradScaler; on the CPU here, the same logic the CUDA fp16 path uses)."""

from __future__ import annotations

import pytest
import torch

from bilevel.optim.steps import gradient_step
from bilevel.runtime.precision import attach_loss_scaler, loss_scaler


def _setup(scaled: bool):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=1e-2)  # not scale-invariant (Adam would hide a missing unscale)
    if scaled:
        attach_loss_scaler(opt, "cpu")
    return model, params, opt


def test_a_finite_scaled_step_equals_the_unscaled_one():
    x = torch.randn(8, 4)
    plain, p_params, p_opt = _setup(False)
    scaled, s_params, s_opt = _setup(True)
    for _ in range(3):
        gradient_step(plain(x).pow(2).mean(), p_params, p_opt)
        gradient_step(scaled(x).pow(2).mean(), s_params, s_opt)
    for name in p_params:
        torch.testing.assert_close(s_params[name], p_params[name], rtol=1e-5, atol=1e-6)
    assert loss_scaler(s_opt).get_scale() == 65536.0  # no overflow: the scale stays (grows only after 2000 steps)


def test_an_overflowing_step_is_skipped_and_the_scale_halves():
    model, params, opt = _setup(True)
    before = {k: v.detach().clone() for k, v in params.items()}
    loss = model(torch.full((2, 4), 1e30)).pow(2).mean()  # inf gradients
    gradient_step(loss, params, opt)
    for name, value in params.items():
        assert torch.equal(value, before[name])
    assert loss_scaler(opt).get_scale() == 32768.0
    assert all(p.grad is None for p in params.values())


# ------------------------------------------------------------------ every solver's steps go through the scaler
def _problem(split: bool, upper_factor: float = 1.0, scaled: bool = True):
    """A linear model; split: weight is the lower variable, bias the upper one; else both levels train both."""
    from bilevel.core.interfaces import BilevelProblem, Objective

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    params = dict(model.named_parameters())
    lower_p = {"weight": params["weight"]} if split else params
    upper_p = {"bias": params["bias"]} if split else params
    lower_opt = torch.optim.SGD(lower_p.values(), lr=1e-2)
    upper_opt = torch.optim.SGD(upper_p.values(), lr=1e-2)
    if scaled:
        attach_loss_scaler(lower_opt, "cpu")
        attach_loss_scaler(upper_opt, "cpu")
    problem = BilevelProblem(
        model=model,
        lower=Objective(draw=lambda: None, loss=lambda _: (model(x) - y).pow(2).mean()),
        upper=Objective(draw=lambda: None, loss=lambda _: upper_factor * model(x).sum(1).pow(2).mean()),
        lower_params=lower_p,
        upper_params=upper_p,
        lower_optimizer=lower_opt,
        upper_optimizer=upper_opt,
    )
    return problem, model


def _solvers():
    from bilevel.plugins.solvers.alternating import AlternatingSolver
    from bilevel.plugins.solvers.bome import BomeSolver
    from bilevel.plugins.solvers.implicit import ImplicitSolver
    from bilevel.plugins.solvers.unrolled import UnrolledSolver

    # (solver, split coupling?, the optimisers whose step the overflowing upper gradient reaches)
    return {
        "alternating": (lambda: AlternatingSolver(AlternatingSolver.Config(coupling="split", upper_every=1)), True,
                        {"upper"}),
        "bome-shared": (lambda: BomeSolver(BomeSolver.Config(coupling="shared")), False, {"lower"}),
        "bome-split": (lambda: BomeSolver(BomeSolver.Config(coupling="split")), True, {"lower", "upper"}),
        "unrolled": (lambda: UnrolledSolver(UnrolledSolver.Config(coupling="split", inner_steps=2, inner_lr=0.1)),
                     True, {"upper"}),
        "implicit": (lambda: ImplicitSolver(
            ImplicitSolver.Config(coupling="split", upper_every=1, hvp_batch_size=None, iters=3)), True, {"upper"}),
    }  # fmt: skip


SOLVERS = _solvers()


@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_solver_steps_through_the_loss_scaler(name):
    """An upper gradient that overflows only once scaled (1e35 * 65536 > fp32 max): the step is skipped and the
    scale halves. A step that bypassed the scaler would apply the huge gradient instead."""
    make, split, reached = SOLVERS[name]
    problem, model = _problem(split, upper_factor=1e35)
    upper_before = {k: v.detach().clone() for k, v in problem.upper_params.items()}
    solver = make()
    solver.setup(problem)
    solver.step(problem, 0)
    for k, v in problem.upper_params.items():
        assert torch.equal(v, upper_before[k]), k
    scales = {level: loss_scaler(getattr(problem, f"{level}_optimizer")).get_scale() for level in ("lower", "upper")}
    assert scales == {level: 32768.0 if level in reached else 65536.0 for level in scales}
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_solver_scaled_steps_equal_unscaled_ones(name):
    make, split, _ = SOLVERS[name]
    runs = []
    for scaled in (False, True):
        problem, model = _problem(split, scaled=scaled)
        solver = make()
        solver.setup(problem)
        for step in range(3):
            solver.step(problem, step)
        runs.append(model)
    for (name_, plain), scaled_p in zip(runs[0].named_parameters(), runs[1].parameters()):
        torch.testing.assert_close(scaled_p, plain, rtol=1e-6, atol=1e-7, msg=name_)


def test_loss_scale_round_trips_through_a_checkpoint(tmp_path):
    """A resumed fp16 run continues with the scale (and growth tracker) it had, not a fresh 65536."""
    from bilevel.core.errors import BilevelError
    from bilevel.diffusion.kd_objective import DrawCounter
    from bilevel.optim.baselines import LowerOnly
    from bilevel.optim.training import TrainState
    from bilevel.runtime.checkpoint import ArmState, load_checkpoint, save_checkpoint

    problem, _ = _problem(split=False, upper_factor=1e35)
    problem.lower.loss = problem.upper.loss  # an overflowing lower step: the lower scale drops to 32768
    LowerOnly().step(problem, 0)
    gradient_step(problem.upper.loss(None) * 0, problem.upper_params, problem.upper_optimizer)  # a finite step
    saved = {k: loss_scaler(getattr(problem, f"{k}_optimizer")).state_dict() for k in ("lower", "upper")}
    assert saved["lower"]["scale"] == 32768.0 and saved["upper"]["_growth_tracker"] == 1
    counters = {"lower": DrawCounter(0, 1), "upper": DrawCounter(0, 2)}
    save_checkpoint(tmp_path, ArmState(problem, LowerOnly(), None, counters), TrainState(step=1), steps=4)

    fresh, _ = _problem(split=False)
    assert load_checkpoint(tmp_path, ArmState(fresh, LowerOnly(), None, counters), steps=4).step == 1
    for k in ("lower", "upper"):
        assert loss_scaler(getattr(fresh, f"{k}_optimizer")).state_dict() == saved[k]
    plain, _ = _problem(split=False, scaled=False)
    with pytest.raises(BilevelError, match="written fp16 but this run is not fp16"):
        load_checkpoint(tmp_path, ArmState(plain, LowerOnly(), None, counters), steps=4)
