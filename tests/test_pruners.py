"""Pruners: BK-SDM block removal, Diff-Pruning (and its taylor/magnitude importances), magnitude.

Structure tests use the untrained tiny UNet (architecture only); the stopping-rule integration uses the shipped teacher.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from bilevel.compression.block_removal import (
    check_compatible,
    feature_pairs,
    remove_blocks,
    student_config,
    teacher_key,
)
from bilevel.compression.model_stats import count_macs, count_params, example_inputs
from bilevel.compression.student_io import load_student, make_manifest, save_student
from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import CalibrationBatch, PruneResult
from bilevel.diffusion.features import FeatureTap
from bilevel.plugins.pruners.diff_pruning import (
    DiffPruningConfig,
    LossThresholdStopper,
    accumulate_diffusion_gradients,
    accumulated_steps,
)
from bilevel.registry import get_registry
from bilevel.worlds.tiny.architecture import build_tiny_pipeline, tiny_unet_config

SD_V1 = {
    "sample_size": 64,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
}
SD_V1_PARAMS = 859_520_964
BK_SDM_PARAMS = {"base": 579_384_964, "small": 482_346_884, "tiny": 323_384_964}

FAST_DIFF = {"timestep_stride": 100, "max_samples": 4}
CASES = [
    ("bk-sdm", {"variant": "base"}),
    ("bk-sdm", {"variant": "small"}),
    ("bk-sdm", {"variant": "tiny"}),
    ("diff-pruning", FAST_DIFF),
    ("diff-pruning", {"importance": "taylor", "timestep_stride": 250, "max_samples": 4}),
    ("diff-pruning", {"importance": "magnitude"}),
    ("magnitude", {}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{v}' for v in o.values()) or 'default'}" for n, o in CASES]


@pytest.fixture(scope="module", autouse=True)
def _respect_omp_threads():
    """conftest pins 2 torch threads; on a shared machine run with OMP_NUM_THREADS=1 honour that (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", previous))))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_pipeline():
    return build_tiny_pipeline(0)


@pytest.fixture(scope="module")
def teacher(tiny_pipeline):
    return tiny_pipeline.unet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def calibration(tiny_pipeline):
    g = torch.Generator().manual_seed(0)
    return CalibrationBatch(
        x0=torch.rand(6, 3, 8, 8, generator=g) * 2 - 1,
        cond=torch.randn(6, 8, tiny_unet_config()["cross_attention_dim"], generator=g),
        alphas_cumprod=tiny_pipeline.scheduler.alphas_cumprod.float(),
    )


@pytest.fixture(scope="module")
def pruned(teacher, calibration) -> dict[str, PruneResult]:
    registry = get_registry()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    results = {
        cid: registry.create("pruner", name, opts).prune(teacher, calibration)
        for cid, (name, opts) in zip(CASE_IDS, CASES)
    }
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a pruner modified the teacher"
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    return results


def test_channel_pruners_default_to_bk_sdm_small_compute(pruned, teacher) -> None:
    """Pruners are compared at matched compute: by default a channel pruner keeps BK-SDM Small's share of the MACs
    (within 5%), though one uniform ratio cannot land there (GroupNorm steps)."""
    full = count_macs(teacher)
    small = count_macs(pruned["bk-sdm-small"].student) / full
    for case in ("magnitude-default", "diff-pruning-100-4"):
        share = count_macs(pruned[case].student) / full
        assert abs(share - small) <= 0.05 * small, (case, share, small)
        assert pruned[case].notes["target_macs"] == 0.64 and abs(pruned[case].notes["macs_share"] - 0.64) < 0.02


def test_ratio_replaces_the_mac_target_and_both_are_refused() -> None:
    from bilevel.plugins.pruners.magnitude import MagnitudeConfig

    assert MagnitudeConfig(ratio=0.3).target_macs is None and MagnitudeConfig().ratio is None
    with pytest.raises(ValueError, match="ratio or target_macs"):
        MagnitudeConfig(ratio=0.3, target_macs=0.5)


def test_head_pruning_and_round_to_shape_the_student(teacher) -> None:
    """prune_heads removes whole heads (diffusers' Attention.heads follows); round_to keeps channel multiples."""
    from diffusers.models.attention_processor import Attention

    registry = get_registry()
    heads = registry.create("pruner", "magnitude", {"ratio": 0.25, "prune_heads": True}).prune(teacher, None).student
    first = next(m for m in heads.modules() if isinstance(m, Attention))
    assert first.heads == 3 and first.to_q.out_features == 3 * 8  # 4 heads of 8 -> 3 heads of 8
    rounded = registry.create("pruner", "magnitude", {"ratio": 0.25, "round_to": 16}).prune(teacher, None).student
    convs = [m for m in rounded.modules() if isinstance(m, torch.nn.Conv2d) and m is not rounded.conv_out]
    assert all(m.out_channels % 16 == 0 for m in convs)
    for student in (heads, rounded):
        with torch.no_grad():
            out = student(**example_inputs(student, 2)).sample
        assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "ratio,outer,heads,round_to",
    [(0.3, None, False, None), pytest.param(0.25, 0.13, True, 8, marks=pytest.mark.slow)],  # 13 s each
    ids=["uniform", "outer-heads-round"],
)
def test_weightless_search_stand_in_prunes_the_same_channel_counts(teacher, ratio, outer, heads, round_to) -> None:
    """The MAC-target search of a large teacher prunes a meta-device copy with a data-free score: the student it
    measures must have every tensor shape, and so the MAC share, of the real pruned teacher."""
    from bilevel.compression.channel_pruning import prune_unet_channels, search_stand_in

    shape = {"outer_ratio": outer, "prune_heads": heads, "round_to": round_to}
    real_teacher, magnitude = search_stand_in(teacher, weightless=False)
    stand_in, data_free = search_stand_in(teacher, weightless=True)
    assert real_teacher is teacher and all(p.is_meta for p in stand_in.parameters())
    real, _ = prune_unet_channels(teacher, magnitude, ratio, **shape)
    weightless, _ = prune_unet_channels(stand_in, data_free, ratio, **shape)
    shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in weightless.state_dict().items()}
    assert count_macs(real) / count_macs(teacher) == count_macs(weightless) / count_macs(stand_in) < 0.9


@pytest.mark.slow  # 30 s: one SD-v1-sized forward under the flop counter
def test_mac_count_includes_attention() -> None:
    """FlopCounterMode with the math attention backend sees the attention matmuls torch-pruning's counter omits:
    on the SD-v1 architecture 398.7 vs 337.5 GMACs (the figures the pruning benchmark reports)."""
    from bilevel.compression.model_stats import count_macs_with_attention

    sd = UNet2DConditionModel(**SD_V1).eval()
    assert round(count_macs_with_attention(sd) / 1e9, 1) == 398.7 and round(count_macs(sd) / 1e9, 1) == 337.5


def test_registered() -> None:
    names = get_registry().names("pruner")
    assert {"bk-sdm", "diff-pruning", "magnitude"} <= set(names)


@pytest.mark.parametrize("case", CASE_IDS)
def test_student_runs_and_is_smaller(case: str, pruned, teacher) -> None:
    student = pruned[case].student
    assert count_params(student) < count_params(teacher)
    inputs = example_inputs(student, 2)
    with torch.no_grad():
        out = student(**inputs).sample
    assert out.shape == inputs["sample"].shape and torch.isfinite(out).all()
    assert all(p.requires_grad and p.grad is None for p in student.parameters())


@pytest.mark.parametrize("case", CASE_IDS)
def test_feature_pairs_match_teacher(case: str, pruned, teacher) -> None:
    result = pruned[case]
    student, pairs = result.student, result.feature_pairs
    assert pairs
    inputs = example_inputs(teacher, 2)
    with (
        torch.no_grad(),
        FeatureTap(student, [p.student for p in pairs]) as s_tap,
        FeatureTap(teacher, [p.teacher for p in pairs]) as t_tap,
    ):
        student(**inputs)
        teacher(**inputs)
        s_out, t_out = dict(s_tap.outputs), dict(t_tap.outputs)
    for pair in pairs:
        s, t = s_out[pair.student], t_out[pair.teacher]
        if pair.teacher_channels is not None:
            t = t[:, list(pair.teacher_channels)]
        assert s.shape == t.shape, pair


@pytest.mark.parametrize("case", CASE_IDS)
def test_save_load_round_trip_without_pickle(case: str, pruned, tmp_path: Path, monkeypatch) -> None:
    result = pruned[case]
    save_student(tmp_path, result.student, make_manifest(result.student, result.feature_pairs, **result.manifest,
                                                         pruner=case))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.safetensors"]

    def no_pickle(*_a, **_k):
        raise AssertionError("pickle used while loading a student")

    monkeypatch.setattr(torch, "load", no_pickle)
    for name in ("load", "loads"):  # the pickle module's loaders must not run either
        monkeypatch.setattr(f"pickle.{name}", no_pickle)
    loaded, manifest = load_student(tmp_path)
    assert manifest["pruner"] == case
    inputs = example_inputs(result.student, 2)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, result.student.eval()(**inputs).sample)
    assert [tuple(p.values())[:2] for p in manifest["feature_pairs"]] == [
        (p.student, p.teacher) for p in result.feature_pairs
    ]


# ------------------------------------------------------------------------------------------------------ BK-SDM
@pytest.mark.parametrize("variant", ["base", "small", "tiny"])
def test_bk_sdm_weights_are_the_teachers_mapped_weights(variant: str, teacher) -> None:
    student, _, key_map = remove_blocks(teacher, variant)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert set(key_map) == set(s_state)
    for key, tensor in s_state.items():
        assert torch.equal(tensor, t_state[key_map[key]]), key
    # BK-SDM's mapping spelled out
    shift = 1 if variant == "tiny" else 0
    assert key_map["down_blocks.0.resnets.0.conv1.weight"] == "down_blocks.0.resnets.0.conv1.weight"
    assert key_map["up_blocks.1.resnets.0.conv1.weight"] == f"up_blocks.{1 + shift}.resnets.0.conv1.weight"
    assert key_map["up_blocks.1.resnets.1.conv1.weight"] == f"up_blocks.{1 + shift}.resnets.2.conv1.weight"
    assert key_map["up_blocks.1.attentions.1.proj_out.weight"] == f"up_blocks.{1 + shift}.attentions.2.proj_out.weight"
    assert key_map["up_blocks.1.upsamplers.0.conv.weight"] == f"up_blocks.{1 + shift}.upsamplers.0.conv.weight"
    assert (student.mid_block is not None) == (variant == "base")
    assert len(student.down_blocks) == (3 if variant == "tiny" else 4)
    assert all(len(b.resnets) == 1 for b in student.down_blocks) and all(len(b.resnets) == 2 for b in student.up_blocks)
    if variant == "tiny":
        assert student.down_blocks[-1].downsamplers is None


def test_bk_sdm_tiny_feature_pairs_follow_bk_sdm() -> None:
    pairs = [(p.student, p.teacher) for p in feature_pairs(tiny_unet_config(), "tiny")]
    assert pairs == [
        ("down_blocks.0", "down_blocks.0"),
        ("down_blocks.1", "down_blocks.1"),
        ("down_blocks.2.attentions.0.proj_out", "down_blocks.2.attentions.1.proj_out"),
        ("up_blocks.0", "up_blocks.1"),
        ("up_blocks.1", "up_blocks.2"),
        ("up_blocks.2", "up_blocks.3"),
    ]
    assert (
        teacher_key("up_blocks.0.resnets.1.norm1.weight", "tiny", [2, 2, 2, 2]) == "up_blocks.1.resnets.2.norm1.weight"
    )


def _meta_params(config: dict) -> int:
    with torch.device("meta"):
        return count_params(UNet2DConditionModel(**config))


def test_bk_sdm_sd_v1_param_counts_from_config() -> None:
    """The student configs give BK-SDM's exact sizes on SD-v1 (meta tensors: no 3.4 GB allocation)."""
    with torch.device("meta"):
        sd = UNet2DConditionModel(**SD_V1)
    assert count_params(sd) == SD_V1_PARAMS
    for variant, expected in BK_SDM_PARAMS.items():
        assert _meta_params(student_config(dict(sd.config), variant)) == expected, variant


@pytest.mark.slow
def test_bk_sdm_sd_v1_exact_param_counts() -> None:
    """Full-size SD-v1 teacher with weights copied (about 6 GB RSS, ~25 s on one CPU thread)."""
    torch.manual_seed(0)
    sd = UNet2DConditionModel(**SD_V1).eval().requires_grad_(False)
    assert count_params(sd) == SD_V1_PARAMS
    for variant, expected in BK_SDM_PARAMS.items():
        student, _, key_map = remove_blocks(sd, variant)
        assert count_params(student) == expected, variant
        key = "up_blocks.1.resnets.1.conv2.weight"
        assert torch.equal(student.get_submodule(key.rsplit(".", 1)[0]).weight, sd.state_dict()[key_map[key]])
        del student


def _unet(**overrides) -> UNet2DConditionModel:
    return UNet2DConditionModel(**(tiny_unet_config() | overrides))


@pytest.mark.parametrize(
    ("overrides", "variant", "message"),
    [
        ({"layers_per_block": 1}, "small", "at least 2 layers per down stage"),
        ({"block_out_channels": (16, 32, 32, 64)}, "tiny", "innermost stages to have equal widths"),
        (
            {
                "down_block_types": ("DownBlock2D",),
                "up_block_types": ("UpBlock2D",),
                "block_out_channels": (16,),
                "mid_block_type": None,
            },
            "tiny",
            "at least 2 stages",
        ),
        (
            {
                "down_block_types": (
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "ResnetDownsampleBlock2D",
                )
            },
            "base",
            "accepted block types",
        ),
    ],
)
def test_bk_sdm_rejects_incompatible_unets(overrides: dict, variant: str, message: str) -> None:
    config = tiny_unet_config() | overrides
    with pytest.raises(BilevelError, match=message) as info:
        check_compatible(config, variant)
    assert "\n" not in str(info.value)
    if "ResnetDownsampleBlock2D" not in str(overrides):
        with pytest.raises(BilevelError, match=message):
            get_registry().create("pruner", "bk-sdm", {"variant": variant}).prune(_unet(**overrides), None)


def test_bk_sdm_rejects_non_unet_and_bad_variant() -> None:
    with pytest.raises(BilevelError, match="UNet2DConditionModel"):
        remove_blocks(torch.nn.Linear(2, 2), "small")
    with pytest.raises(BilevelError, match="variant"):
        get_registry().create("pruner", "bk-sdm", {"variant": "huge"})


# ------------------------------------------------------------------------------------------------- Diff-Pruning
def test_stopping_rule_on_hand_made_losses() -> None:
    # running max 4.0 -> stop at the first loss below 0.05 * 4.0 = 0.2 (that step's gradient is included)
    assert accumulated_steps([1.0, 2.0, 4.0, 3.0, 0.5, 0.19, 0.01], 0.05) == 6
    assert accumulated_steps([1.0, 0.5, 0.3], 0.05) == 3  # never below: every timestep counts
    assert accumulated_steps([1.0, 0.04, 2.0], 0.05) == 2  # the max so far, not the global max
    assert accumulated_steps([1.0, 0.5, 0.3], 0.6) == 2
    stopper = LossThresholdStopper(0.1)
    assert [stopper.update(x) for x in (2.0, 5.0, 0.6, 0.4)] == [False, False, False, True]


def test_diff_pruning_accumulates_until_the_loss_drops(tiny_pipe) -> None:
    """On the trained shipped teacher the loss falls with t, so accumulation stops early; gradients are summed."""
    from bilevel.core.world import calibration_batch
    from bilevel.worlds.tiny.world import TinyWorld

    calib = calibration_batch(TinyWorld.build(tiny_pipe, ["purple"], 16, 8, seed=0), 4)
    unet = copy.deepcopy(tiny_pipe.unet).train()
    record = accumulate_diffusion_gradients(unet, calib, DiffPruningConfig(timestep_stride=20), stop=True)
    assert record.stopped_early and record.timesteps[0] == 0 and len(record.timesteps) < 50
    assert record.timesteps == [20 * i for i in range(len(record.timesteps))]
    assert accumulated_steps(record.losses, 0.05) == len(record.losses)
    assert record.losses[-1] < 0.05 * max(record.losses)
    assert all(p.grad is not None for p in unet.parameters())
    full = accumulate_diffusion_gradients(
        copy.deepcopy(tiny_pipe.unet).train(), calib, DiffPruningConfig(timestep_stride=250), stop=False
    )
    assert full.timesteps == [0, 250, 500, 750] and not full.stopped_early


def test_diff_pruning_needs_calibration(teacher) -> None:
    with pytest.raises(BilevelError, match="calibration"):
        get_registry().create("pruner", "diff-pruning", {}).prune(teacher, None)
    with pytest.raises(BilevelError, match="importance"):
        get_registry().create("pruner", "diff-pruning", {"importance": "random"})


def test_diff_pruning_importances_differ(pruned) -> None:
    """Taylor scores choose other channels than weight magnitude (the data matters)."""
    diff = {p.student: p.teacher_channels for p in pruned[CASE_IDS[3]].feature_pairs}
    mag = {p.student: p.teacher_channels for p in pruned[CASE_IDS[5]].feature_pairs}
    assert diff.keys() == mag.keys() and diff != mag
    assert pruned[CASE_IDS[3]].notes["timesteps"][0] == 0


# --------------------------------------------------------------------------------------------------- prune command
def test_prune_to_folder(tmp_path: Path, tiny_pipe) -> None:
    from bilevel.commands.prune import REPORT, prune_to_folder

    out = tmp_path / "student"
    report = prune_to_folder(
        "tiny", "bk-sdm", {"variant": "tiny"}, out, latency_batch=4, latency_repeats=2, calibration_size=4
    )
    assert report["ratios"]["params"] < 1 and report["ratios"]["macs"] < 1
    on_disk = json.loads((out / REPORT).read_text())
    assert on_disk["student_stats"]["params"] == report["student_stats"]["params"]
    student, manifest = load_student(out)
    assert count_params(student) == report["student_stats"]["params"] and manifest["pruner"] == "bk-sdm"
    with pytest.raises(BilevelError, match="already holds a student"):
        prune_to_folder("tiny", "bk-sdm", {}, out)
    with pytest.raises(BilevelError, match="unknown pruner"):
        prune_to_folder("tiny", "nope", {}, tmp_path / "other")
