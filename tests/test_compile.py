"""model.compile: the student and teacher run compiled for training only, with unchanged parameter names and the
same results as eager; solvers that need double backward are refused."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bilevel.cli import main
from bilevel.compression.student_io import load_student
from bilevel.core.config import ModelConfig
from bilevel.runtime.compilation import compiled_for_training, eager


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 3, 1))


def test_models_run_compiled_inside_the_block_and_eager_after() -> None:
    net, shared = small_net(), small_net()
    shared.compile(backend="eager")  # e.g. the teacher, compiled by an earlier arm: left as it was
    x = torch.randn(2, 3, 8, 8)
    eager_out = net(x)
    keys = list(net.state_dict())
    with compiled_for_training(ModelConfig(compile=True, compile_backend="eager"), net, shared):
        assert net._compiled_call_impl is not None
        assert torch.allclose(net(x), eager_out)
        assert list(net.state_dict()) == keys  # in place: checkpoints and saved students keep their names
        with eager(net):  # a curve point in the middle of training samples eagerly
            assert net._compiled_call_impl is None
        assert net._compiled_call_impl is not None
    assert net._compiled_call_impl is None and shared._compiled_call_impl is not None
    with compiled_for_training(ModelConfig(), net):  # off by default: nothing compiled
        assert net._compiled_call_impl is None


@pytest.mark.slow  # compiling the training step (student and teacher) takes about 30 s on a CPU
def test_compiled_kd_arm_trains_the_same_student_as_eager(tmp_path) -> None:
    common = [
        "run", "--arms", "kd", "--steps", "2", "--set", "training.batch_size=4", "--set", "evaluation.samples_per_prompt=1",
        "--set", "evaluation.concept_samples=1", "--set", "evaluation.steps=1", "--set", "evaluation.latency_repeats=1",
        "--set", "evaluation.secondary=false", "--set", "data.finetune_size=16", "--set", "training.log_every=1",
    ]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "eager")]) == 0
    assert main([*common, "--out", str(tmp_path / "compiled"), "--compile", "--set", "model.compile_backend=aot_eager"]) == 0
    assert json.loads((tmp_path / "compiled" / "config.json").read_text())["model"]["compile"] is True
    eager, _ = load_student(tmp_path / "eager" / "students" / "kd")
    compiled, _ = load_student(tmp_path / "compiled" / "students" / "kd")
    a, b = eager.state_dict(), compiled.state_dict()
    assert list(a) == list(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    losses = [
        [h["lower_loss"] for h in json.loads((tmp_path / run / "metrics.json").read_text())["histories"]["kd"]]
        for run in ("eager", "compiled")
    ]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
