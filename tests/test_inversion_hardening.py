"""training.upper_inversion: the upper level also erases the concept under an embedding learned against the
student. The adversary really learns (its inversion loss falls), the hardened loss is the unlearner's loss plus
the same loss under that embedding, and a checkpoint keeps the embedding for an exact resume."""

from __future__ import annotations

import copy

import pytest
import torch

from bilevel.core.config import build_config
from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import Objective
from bilevel.diffusion.kd_objective import DrawCounter
from bilevel.optim.adversarial import harden
from bilevel.optim.problem import build_problem, unlearn_context
from bilevel.optim.training import TrainState
from bilevel.registry import get_registry
from bilevel.runtime.checkpoint import ArmState, load_checkpoint, save_checkpoint
from bilevel.worlds.resolve import build_world

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    config = build_config({
        "data": {"finetune_size": 64, "concept_size": 32},
        "training": {"batch_size": 4, "upper_batch_size": 4,
                     "upper_inversion": {"enabled": True, "every": 1, "steps": 6, "k": 8, "batch_size": 4, "lr": 0.05}},
        "unlearner": {"name": "esd", "options": {"pool_size": 8, "sample_steps": 2}},
    })  # fmt: skip
    world = build_world(config)
    return config, world


def _esd(world, student, tmp_path, config):
    esd = get_registry().create("unlearner", "esd", config.unlearner.options)
    ctx = unlearn_context(student, world.teacher, world, tmp_path, 0)
    esd.prepare(ctx)
    return esd, ctx


def test_hardened_loss_adds_the_loss_under_the_learned_embedding(setup, tmp_path) -> None:
    config, world = setup
    student = copy.deepcopy(world.teacher).requires_grad_(True)
    esd, ctx = _esd(world, student, tmp_path, config)
    counter = DrawCounter(0, salt=2)
    plain = Objective(draw=lambda: esd.draw(ctx, 4, counter.next()), loss=lambda b: esd.loss(ctx, b))
    hardened, adversary = harden(plain, ctx, esd.loss, world, config.training.upper_inversion, 0, counter)
    batch = hardened.draw()  # draw 0: the adversary is learned first
    assert adversary.refreshes == 1 and float(adversary.delta.norm()) > 0
    swapped = adversary.attacked(student)
    expected = esd.loss(ctx, batch) + esd.loss(type(ctx)(**{**vars(ctx), "student": swapped}), batch)
    assert float(hardened.loss(batch).detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert swapped.matched > 0  # ESD conditions the student on the concept prompts: the embedding stood in


def test_the_adversary_learns_an_embedding_that_fits_the_concept(setup) -> None:
    _, world = setup
    from bilevel.core.config import InversionHardening
    from bilevel.optim.adversarial import InversionAdversary

    cfg = InversionHardening(enabled=True, steps=10, k=8, batch_size=8, lr=0.05)
    adversary = InversionAdversary(world, cfg, seed=0)
    student = copy.deepcopy(world.teacher).requires_grad_(True)
    adversary.refresh(student, 0)
    first = adversary.last_loss
    for i in range(1, 3):
        adversary.refresh(student, i)  # warm-started: the fit keeps improving
    assert adversary.last_loss < first
    assert all(p.requires_grad for p in student.parameters())  # the student's flags are restored


def test_a_checkpoint_keeps_the_embedding(setup, tmp_path) -> None:
    config, world = setup
    student = copy.deepcopy(world.teacher).requires_grad_(True)
    esd = get_registry().create("unlearner", "esd", config.unlearner.options)
    counters = {"lower": DrawCounter(0, salt=1), "upper": DrawCounter(0, salt=2)}
    problem = build_problem(student, world, config, config.training.weights, [], esd, "shared", tmp_path, counters)
    problem.upper.loss(problem.upper.draw())
    adversary = problem.extra_state["inversion"]
    learned = adversary.delta.clone()
    arm = ArmState(problem, get_registry().create("solver", "alternating", {}), esd, counters)
    save_checkpoint(tmp_path / "ckpt", arm, TrainState(step=1), 10)
    adversary.delta.zero_()
    load_checkpoint(tmp_path / "ckpt", arm, 10)
    assert torch.equal(problem.extra_state["inversion"].delta, learned)


def test_an_unlearner_that_never_conditions_on_the_concept_prompts_is_refused(setup, tmp_path) -> None:
    config, world = setup
    student = copy.deepcopy(world.teacher).requires_grad_(True)
    ctx = unlearn_context(student, world.teacher, world, tmp_path, 0)
    counter = DrawCounter(0, salt=2)
    elsewhere = world.bank(["a red circle"])
    x = torch.zeros(1, *world.sample_shape)

    def loss(c, _batch):
        return c.student(x, torch.tensor([10]), encoder_hidden_states=elsewhere).sample.pow(2).mean()

    odd = Objective(draw=lambda: counter.next() and None, loss=lambda b: loss(ctx, b))
    hardened, _ = harden(odd, ctx, loss, world, config.training.upper_inversion, 0, counter)
    with pytest.raises(BilevelError, match="none of the concept prompts"):
        hardened.loss(hardened.draw())
