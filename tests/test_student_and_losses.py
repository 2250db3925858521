"""Pruned students round-trip without pickle; the KD and ESD losses equal hand-computed values."""

from __future__ import annotations

import pytest
import torch

from bilevel.compression.model_stats import example_inputs
from bilevel.compression.student_io import load_student, make_manifest, save_student
from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import FeaturePair
from bilevel.diffusion.losses import KDTargets, kd_loss
from bilevel.plugins.pruners.magnitude import MagnitudeConfig, MagnitudePruner
from bilevel.plugins.unlearners.esd import ESD, ESDConfig, esd_target, select_parameters


@pytest.fixture(scope="module")
def pruned(request):
    from bilevel.worlds.tiny.architecture import build_tiny_pipeline

    teacher = build_tiny_pipeline(0).unet
    return teacher, MagnitudePruner(MagnitudeConfig(ratio=0.3)).prune(teacher, None)


def test_magnitude_pruner_shrinks_and_leaves_teacher_alone(pruned):
    teacher, result = pruned
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in result.student.parameters())
    assert n_s < 0.6 * n_t and n_t == 3_277_411
    assert all(p.teacher_channels is not None for p in result.feature_pairs)


def test_pruned_student_reloads_identically_without_pickle(pruned, tmp_path, monkeypatch):
    _, result = pruned
    save_student(tmp_path / "s", result.student, make_manifest(result.student, result.feature_pairs))

    def no_pickle(*a, **k):
        raise AssertionError("pickle-based loading used")

    monkeypatch.setattr(torch, "load", no_pickle)
    reloaded, manifest = load_student(tmp_path / "s")
    inputs = example_inputs(result.student, 3)
    with torch.no_grad():
        assert torch.equal(result.student(**inputs).sample, reloaded(**inputs).sample)
    assert [FeaturePair.from_json(p) for p in manifest["feature_pairs"]] == result.feature_pairs


def test_corrupt_or_missing_student_files_are_clear(pruned, tmp_path):
    _, result = pruned
    save_student(tmp_path / "s", result.student, make_manifest(result.student, []))
    (tmp_path / "s" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BilevelError, match="corrupt weights file"):
        load_student(tmp_path / "s")
    with pytest.raises(BilevelError, match="no student manifest"):
        load_student(tmp_path / "nowhere")


def test_kd_loss_matches_hand_computation():
    eps_s = torch.tensor([[1.0, 2.0]])
    noise = torch.tensor([[0.0, 0.0]])
    eps_t = torch.tensor([[1.0, 0.0]])
    f_s = {"b": torch.tensor([[[3.0]], [[1.0]]]).view(1, 2, 1, 1)}
    f_t = {"b": torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)}
    pair = [FeaturePair("b", "b", (0, 2))]  # the student kept teacher channels 0 and 2: compare 3 vs 5, 1 vs 1
    total, parts = kd_loss(eps_s, noise, KDTargets(eps_t, f_t), f_s, pair, 1.0, 2.0, 0.1)
    assert parts == {"task": pytest.approx(2.5), "out_kd": pytest.approx(2.0), "feat_kd": pytest.approx(2.0)}
    assert float(total) == pytest.approx(2.5 + 2 * 2.0 + 0.1 * 2.0)


class _FixedUNet(torch.nn.Module):
    """Returns a fixed output per prompt embedding's first value: 0 for the empty prompt, else by value."""

    def __init__(self, table: dict[float, float]) -> None:
        super().__init__()
        self.table = table
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, encoder_hidden_states):
        keys = encoder_hidden_states[:, 0, 0].tolist()
        out = torch.stack([torch.full_like(x[0], self.table[k]) for k in keys])
        return type("Out", (), {"sample": out * self.w})()


def test_esd_loss_matches_hand_computed_target():
    from bilevel.core.interfaces import UnlearnContext

    teacher = _FixedUNet({0.0: 1.0, 1.0: 3.0})  # e(x, empty) = 1, e(x, concept) = 3
    student = _FixedUNet({1.0: 0.5})
    enc = lambda prompts: torch.tensor([[[0.0 if p == "" else 1.0]] for p in prompts])
    ctx = UnlearnContext(
        student=student, teacher=teacher, concepts=["purple"], concept_prompts=["a purple circle"], retain_prompts=[],
        encode=enc, concept_images=torch.zeros(4, 3, 2, 2), concept_image_prompts=["a purple circle"] * 4,
        retain_images=None, retain_image_prompts=None, alphas_cumprod=torch.linspace(0.99, 0.01, 10),
        scheduler_config={}, sample_shape=(3, 2, 2), run_dir=None, device=torch.device("cpu"),
    )  # fmt: skip
    esd = ESD(ESDConfig(eta=1.0, xt_source="data"))
    esd.prepare(ctx)
    loss = esd.loss(ctx, esd.draw(ctx, 2, torch.Generator().manual_seed(0)))
    # target = 1 - 1 * (3 - 1) = -1; prediction 0.5; squared error 2.25
    assert float(loss) == pytest.approx(2.25)
    assert torch.equal(esd_target(torch.tensor(1.0), torch.tensor(3.0), 2.0), torch.tensor(-3.0))


def test_esd_variants_select_the_documented_subsets(pruned):
    _, result = pruned
    names = {k for k, _ in result.student.named_parameters()}
    x = set(select_parameters(result.student, "x"))
    u = set(select_parameters(result.student, "u"))
    assert x and all(".attn2." in k for k in x)
    assert x | u == names and not x & u
    assert set(select_parameters(result.student, "full")) == names
