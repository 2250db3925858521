"""The alternating solver: lower every step, upper every k-th step, each level touching only its parameters."""

from __future__ import annotations

import torch

from bilevel.core.interfaces import BilevelProblem, Objective
from bilevel.plugins.solvers.alternating import AlternatingConfig, AlternatingSolver


def make_problem(calls: list[str]) -> tuple[BilevelProblem, torch.nn.Module]:
    model = torch.nn.Linear(2, 1, bias=True)

    def lower_loss(_):
        calls.append("lower")
        return (model(torch.ones(1, 2)) - 1).pow(2).sum()

    def upper_loss(_):
        calls.append("upper")
        return model.bias.pow(2).sum() + 0 * model.weight.sum()

    params = dict(model.named_parameters())
    return BilevelProblem(
        model=model,
        lower=Objective(draw=lambda: None, loss=lower_loss),
        upper=Objective(draw=lambda: None, loss=upper_loss),
        lower_params={"weight": params["weight"]},
        upper_params={"bias": params["bias"]},
        lower_optimizer=torch.optim.SGD([params["weight"]], lr=0.1),
        upper_optimizer=torch.optim.SGD([params["bias"]], lr=0.1),
    ), model


def test_upper_runs_every_k_steps():
    calls: list[str] = []
    problem, _ = make_problem(calls)
    solver = AlternatingSolver(AlternatingConfig(upper_every=3))
    metrics = [solver.step(problem, s) for s in range(9)]
    assert calls.count("lower") == 9 and calls.count("upper") == 3
    assert [("upper_loss" in m) for m in metrics] == [False, False, True] * 3


def test_each_level_updates_only_its_parameters():
    calls: list[str] = []
    problem, model = make_problem(calls)
    solver = AlternatingSolver(AlternatingConfig(upper_every=1))
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    problem.upper_optimizer.param_groups[0]["lr"] = 0.0  # upper frozen: the bias must not move
    solver.step(problem, 0)
    assert not torch.equal(model.weight, w0) and torch.equal(model.bias, b0)
    problem.upper_optimizer.param_groups[0]["lr"] = 0.1
    problem.lower_optimizer.param_groups[0]["lr"] = 0.0
    w1 = model.weight.detach().clone()
    solver.step(problem, 1)
    assert torch.equal(model.weight, w1) and not torch.equal(model.bias, b0)


def test_runner_partitions_parameters_by_coupling(tiny_pipe):
    """shared: both levels train the same tensors; split: the lower level trains exactly what the upper does not."""
    from bilevel.core.config import RunConfig
    from bilevel.optim.problem import build_problem
    from bilevel.plugins.unlearners.esd import ESD, ESDConfig
    from bilevel.worlds.tiny.world import TinyWorld

    world = TinyWorld.build(tiny_pipe, ["purple"], finetune_size=32, concept_size=8, seed=0)
    config = RunConfig()
    student = __import__("copy").deepcopy(tiny_pipe.unet).requires_grad_(True)
    esd = ESD(ESDConfig(variant="x", xt_source="data"))
    everything = set(dict(student.named_parameters()))
    shared = build_problem(student, world, config, config.training.weights, [], esd, "shared")
    assert set(shared.lower_params) == everything and all(".attn2." in k for k in shared.upper_params)
    split = build_problem(student, world, config, config.training.weights, [], esd, "split")
    assert set(split.upper_params) == set(shared.upper_params)
    assert set(split.lower_params) == everything - set(split.upper_params)


def test_upper_objective_reevaluates_one_drawn_batch(tiny_pipe):
    """Solvers evaluate the upper loss several times on one batch: the upper Objective's batch is data, not a
    generator the unlearner consumes, so a second evaluation sees the same batch."""
    import copy

    from bilevel.core.config import RunConfig
    from bilevel.optim.problem import build_problem
    from bilevel.plugins.unlearners.esd import ESD, ESDConfig
    from bilevel.worlds.tiny.world import TinyWorld

    world = TinyWorld.build(tiny_pipe, ["purple"], finetune_size=32, concept_size=8, seed=0)
    config = RunConfig()
    student = copy.deepcopy(tiny_pipe.unet).requires_grad_(True)
    esd = ESD(ESDConfig(variant="x", xt_source="data"))
    problem = build_problem(student, world, config, config.training.weights, [], esd, "shared")
    batch = problem.upper.draw()
    first = problem.upper.loss(batch)
    assert torch.equal(problem.upper.loss(batch), first)
    assert not torch.equal(problem.upper.loss(problem.upper.draw()), first)  # the next draw is a new batch
