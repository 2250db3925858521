"""The tiny world: deterministic data, a validated detector, a pipeline that round-trips, a teacher that learns."""

from __future__ import annotations

import json

import pytest
import torch

from bilevel.worlds.tiny.dataset import PLAIN, make_dataset
from bilevel.worlds.tiny.detector import NONE, detect, detect_stripes
from bilevel.worlds.tiny.palette import ALIASES, colour_names, names_of, nearest_colours


def test_dataset_is_deterministic_by_seed():
    a, b, c = make_dataset(64, seed=3), make_dataset(64, seed=3), make_dataset(64, seed=4)
    assert torch.equal(a.images, b.images) and a.prompts == b.prompts
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (64, 3, 8, 8) and a.images.min() >= -1 and a.images.max() <= 1


def test_concept_exclusion_and_inclusion():
    clean = make_dataset(600, seed=0, exclude=["purple"])
    words = {w for p in clean.prompts for w in p.split()}
    assert "purple" not in clean.colours and not words & {"purple", "violet"}  # absent under every name
    assert set(clean.colours) == set(colour_names()) - {"purple"}
    assert {"crimson", "striped", "banded"} <= words and any(p.split()[1] in ("circle", "square", "triangle") for p in clean.prompts)
    only = make_dataset(50, seed=0, include=["purple", "blue"])
    assert set(only.colours) == {"purple", "blue"} and all(w is not None for w in only.colour_words)
    unstyled = make_dataset(400, seed=0, exclude=["striped"])
    assert not any(unstyled.striped) and not {w for p in unstyled.prompts for w in p.split()} & {"striped", "banded"}
    styled = make_dataset(50, seed=0, include=["striped"])
    assert all(styled.striped) and all(p.split()[-1] in names_of("striped") for p in styled.prompts)


def test_prompt_mix_gives_the_teacher_names_colourless_prompts_and_unasked_style():
    """The world's distribution: each colour under both names, colourless prompts, and the style drawn when asked
    and, on a share of the rest, unasked (the property through which KD can re-teach a concept)."""
    data = make_dataset(4000, seed=1)
    n = len(data)
    assert 0.3 < sum(w in ALIASES.values() for w in data.colour_words) / n < 0.45
    assert 0.1 < sum(w is None for w in data.colour_words) / n < 0.2
    asked = [w is not None for w in data.style_words]
    assert all(data.striped[i] for i in range(n) if asked[i])
    unasked = [data.striped[i] for i in range(n) if not asked[i]]
    assert 0.2 < sum(unasked) / len(unasked) < 0.3
    plain = make_dataset(50, seed=1, mix=PLAIN)
    assert all(p.split()[1] in colour_names() and len(p.split()) == 3 for p in plain.prompts) and not any(plain.striped)


def test_stripe_detector_is_accurate_on_real_images():
    data = make_dataset(2000, seed=12)
    found = detect_stripes(data.images)
    striped = [f for f, s in zip(found, data.striped) if s]
    plain = [f for f, s in zip(found, data.striped) if not s]
    assert sum(striped) / len(striped) >= 0.97 and not any(plain)
    labels = detect(data.images).labels  # a striped shape keeps its colour
    assert sum(a == b for a, b, s in zip(labels, data.colours, data.striped) if s) / len(striped) >= 0.97


def test_detector_is_accurate_on_real_images():
    data = make_dataset(1000, seed=11)
    labels = detect(data.images).labels
    accuracy = sum(a == b for a, b in zip(labels, data.colours)) / len(labels)
    assert accuracy >= 0.98


def test_detector_says_none_for_noise_empty_and_off_palette():
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(100, 3, 8, 8, generator=gen) * 2 - 1
    assert set(detect(noise).labels) == {NONE}
    empty = torch.full((5, 3, 8, 8), 24 / 255 * 2 - 1)
    assert set(detect(empty).labels) == {NONE}
    grey = make_dataset(20, seed=1).images.clone()
    fg = (grey - grey[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.3
    grey = torch.where(fg, torch.full_like(grey, 0.1), grey)  # a mid-grey shape: far from every palette colour
    assert set(detect(grey).labels) == {NONE}


def test_detector_distance_score_orders_colours():
    data = make_dataset(50, seed=2, include=["purple"])
    det = detect(data.images)
    idx = colour_names().index("purple")
    assert (det.distances[:, idx] < 0.1).all()
    assert nearest_colours("purple") == ["blue", "pink"]


def test_pipeline_save_reload_gives_identical_outputs(random_pipe, tmp_path):
    from bilevel.worlds.tiny.pipeline import TinyTextToImagePipeline

    random_pipe.save_pretrained(tmp_path / "p", safe_serialization=True)
    assert not list((tmp_path / "p").rglob("*.bin")) and list((tmp_path / "p").rglob("*.safetensors"))
    reloaded = TinyTextToImagePipeline.from_pretrained(str(tmp_path / "p"), local_files_only=True)
    for name in ("unet", "text_encoder"):
        a, b = getattr(random_pipe, name).state_dict(), getattr(reloaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded.save_pretrained(tmp_path / "q", safe_serialization=True)
    again = TinyTextToImagePipeline.from_pretrained(str(tmp_path / "q"), local_files_only=True)
    prompts = ["a purple circle", "a red square"]
    a = random_pipe(prompts, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    b = reloaded(prompts, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    c = again(prompts, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(b, c)  # loaded pipelines are bit-identical
    # a freshly built module and a loaded one can pick different CPU kernels: equal weights, ~1e-7 output noise
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.slow  # 15 s of teacher training: the separate CI step
def test_short_teacher_training_lowers_the_loss_and_resumes(tmp_path):
    from bilevel.worlds.tiny.teacher_training import TeacherTrainConfig, train_teacher

    cfg = TeacherTrainConfig(steps=30, batch_size=16, dataset_size=64, checkpoint_every=15, warmup=5, lr=2e-3)
    train_teacher(cfg, tmp_path)
    losses = json.loads((tmp_path / "training.json").read_text())["losses_this_session"]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:5]) / 5
    # resuming a finished run trains nothing more and reproduces the same weights
    from bilevel.runtime.io import load_tensors

    before = load_tensors(tmp_path / "checkpoint" / "ema.safetensors")
    train_teacher(cfg, tmp_path)
    after = load_tensors(tmp_path / "checkpoint" / "ema.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
