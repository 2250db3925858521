"""Feature-KD taps exist only while a forward pass needs them: no arm leaves hooks on the shared teacher/student."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bilevel.diffusion.features import FeatureTap

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_tap_hooks_live_only_inside_the_block():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    tap = FeatureTap(model, ["0", "2"])
    assert forward_hooks(model) == 0  # building a tap registers nothing
    with tap:
        assert forward_hooks(model) == 2
        model(torch.randn(5, 3))
        kept = dict(tap.outputs)
    assert forward_hooks(model) == 0 and tap.outputs == {}  # removed, and no features pinned
    assert kept["0"].shape == (5, 4) and kept["2"].shape == (5, 2)
    with pytest.raises(ValueError), tap:  # an error inside the block removes the hooks too
        raise ValueError("boom")
    assert forward_hooks(model) == 0
    with pytest.raises(ValueError, match="not found"):
        FeatureTap(model, ["9"])


def test_kd_arms_leave_no_hooks_on_teacher_or_student(tiny_pipe):
    """The KD lower level (feature KD on) and a bilevel arm over it, stepped like the runner does."""
    from bilevel.core.config import RunConfig
    from bilevel.optim.baselines import LowerOnly
    from bilevel.optim.problem import build_problem
    from bilevel.plugins.solvers.alternating import AlternatingSolver
    from bilevel.plugins.unlearners.esd import ESD, ESDConfig
    from bilevel.registry import get_registry
    from bilevel.worlds.tiny.world import TinyWorld

    world = TinyWorld.build(tiny_pipe, ["purple"], finetune_size=16, concept_size=8, seed=0)
    pruned = get_registry().create("pruner", "bk-sdm", {}).prune(world.teacher, None)
    assert pruned.feature_pairs
    config = RunConfig.model_validate({"training": {"batch_size": 4, "upper_batch_size": 4}})
    weights = config.training.weights
    assert weights.feature > 0 and weights.output > 0
    arms = {"kd": (LowerOnly(), None), "bilevel": (AlternatingSolver(), ESD(ESDConfig(xt_source="data")))}
    for arm, (solver, unlearner) in arms.items():
        student = copy.deepcopy(pruned.student).train().requires_grad_(True)
        problem = build_problem(student, world, config, weights, pruned.feature_pairs, unlearner, solver.coupling)
        solver.setup(problem)
        for step in range(4):
            metrics = solver.step(problem, step)
        assert problem.lower.loss.last_parts["feat_kd"] > 0, arm  # feature KD really ran through the taps
        assert "upper_loss" in metrics or unlearner is None
        assert forward_hooks(world.teacher) == 0 and forward_hooks(student) == 0, arm
