"""The real-digits world: a fixed stratified split, two names per class, a detector that meets its accuracy bar
and says `none` to blanks and noise, a resumable teacher trainer and a shipped teacher that loads offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the digits world needs the bilevel[digits] extra")

from bilevel.core.errors import BilevelError
from bilevel.plugins.worlds.digits import data
from bilevel.plugins.worlds.digits.data import (
    CLASS_NAMES,
    digit_of_prompt,
    load_real_digits,
    make_dataset,
    parse_digit,
    prompt_for,
    prompts_for,
    split_indices,
)
from bilevel.plugins.worlds.digits.detector import NONE, load_detector, shipped_detector

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ASSETS = Path(data.__file__).resolve().parents[3] / "assets"
TEACHER = ASSETS / "digits-teacher"


def test_real_digits_are_scaled_grey_images():
    images, labels = load_real_digits()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min() == -1 and images.max() == 1
    assert set(labels.tolist()) == set(range(10))


def test_split_is_deterministic_disjoint_complete_and_stratified():
    _, labels = load_real_digits()
    train, held = split_indices(labels, seed=0)
    again_train, again_held = split_indices(labels, seed=0)
    assert torch.equal(train, again_train) and torch.equal(held, again_held)
    assert not set(train.tolist()) & set(held.tolist())
    assert len(train) + len(held) == len(labels)
    for digit in range(10):
        share = (labels[held] == digit).sum() / (labels == digit).sum()
        assert abs(share - 0.25) < 0.01
    other_train, _ = split_indices(labels, seed=1)
    assert not torch.equal(train, other_train)
    assert torch.equal(make_dataset("held_out").images, load_real_digits()[0][held])


def test_excluded_classes_are_absent_and_included_ones_alone():
    clean = make_dataset("train", exclude=["seven", "3"])
    assert not {3, 7} & set(clean.labels.tolist()) and set(clean.labels.tolist()) == set(range(10)) - {3, 7}
    assert not any(p in clean.prompts for d in (3, 7) for p in prompts_for(d))
    only = make_dataset("train", include=[7])
    assert set(only.labels.tolist()) == {7} and set(only.prompts) == set(prompts_for(7))
    assert len(only) + len(make_dataset("train", exclude=[7])) == len(make_dataset("train"))
    with pytest.raises(BilevelError, match="no digits left"):
        make_dataset(include=[7], exclude=["seven"])
    with pytest.raises(BilevelError, match="unknown digit 'eleven'"):
        make_dataset(exclude=["eleven"])


def test_both_prompt_names_map_to_the_class():
    from bilevel.plugins.worlds.digits.text import build_tokenizer

    tokenizer = build_tokenizer()
    assert prompts_for(7) == ["a handwritten seven", "the digit 7"]
    for digit, word in enumerate(CLASS_NAMES):
        assert parse_digit(word) == parse_digit(str(digit)) == parse_digit(digit) == digit
        word_prompt, numeral_prompt = prompts_for(digit)
        assert digit_of_prompt(word_prompt) == digit_of_prompt(numeral_prompt) == digit
        ids = tokenizer(prompts_for(digit)).input_ids
        assert tokenizer.unk_token_id not in ids[0] + ids[1] and ids[0] != ids[1]
    assert len({tuple(tokenizer(p).input_ids) for d in range(10) for p in prompts_for(d)}) == 20
    with pytest.raises(BilevelError):
        digit_of_prompt("a purple circle")
    sample = make_dataset("train", seed=5)
    assert set(sample.names.tolist()) == {0, 1}  # both names are used
    assert [digit_of_prompt(p) for p in sample.prompts] == sample.labels.tolist()


def test_missing_scikit_learn_is_a_one_line_install_hint(monkeypatch):
    data._load.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(BilevelError, match=r"pip install 'bilevel\[digits\]'") as info:
            make_dataset()
        assert "\n" not in str(info.value)
    finally:
        data._load.cache_clear()


def test_shipped_detector_is_accurate_on_held_out_real_digits():
    held = make_dataset("held_out")
    det = shipped_detector().detect(held.images)
    accuracy = float((det.indices == held.labels).float().mean())  # a `none` counts as wrong
    assert accuracy >= 0.95
    assert (det.indices < 0).float().mean() <= 0.03  # real digits are rarely `none`
    card = json.loads((ASSETS / "digits-detector" / "config.json").read_text())
    assert abs(card["metrics"]["held_out_accuracy"] - accuracy) < 1e-6  # the model card states what ships
    assert det.probs.shape == (len(held), 10)


def test_detector_says_none_for_blank_and_noise():
    detector = shipped_detector()
    gen = torch.Generator().manual_seed(0)
    blanks = torch.linspace(-1, 1, 9).view(-1, 1, 1, 1).expand(9, 1, 8, 8)
    uniform = torch.rand(200, 1, 8, 8, generator=gen) * 2 - 1
    gaussian = torch.randn(200, 1, 8, 8, generator=gen).clamp(-1, 1)
    for images in (blanks, uniform, gaussian):
        assert set(detector.detect(images).labels) == {NONE}


def test_detector_features_and_rgb_input():
    detector = shipped_detector()
    images = make_dataset("held_out").images[:16]
    feats = detector.features(images)
    assert feats.shape == (16, detector.model.head.in_features) and torch.isfinite(feats).all()
    rgb = images.expand(-1, 3, -1, -1)
    assert detector.detect(rgb).labels == detector.detect(images).labels
    with pytest.raises(BilevelError, match="takes"):
        detector.detect(torch.zeros(2, 1, 16, 16))


def test_detector_folder_errors_are_one_line(tmp_path):
    with pytest.raises(BilevelError, match="no digits detector"):
        load_detector(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BilevelError, match="unsupported"):
        load_detector(tmp_path)


@pytest.mark.slow
def test_detector_training_reproduces_the_shipped_weights():
    from bilevel.core.io import load_tensors
    from bilevel.plugins.worlds.digits.detector_training import DetectorTrainConfig, train_detector

    info = json.loads((ASSETS / "digits-detector" / "config.json").read_text())
    detector, _ = train_detector(DetectorTrainConfig.model_validate(info["training"]))
    shipped = load_tensors(ASSETS / "digits-detector" / "model.safetensors")
    assert all(torch.equal(shipped[k], v) for k, v in detector.model.state_dict().items())


def test_teacher_training_resumes_exactly(tmp_path, monkeypatch):
    from bilevel.plugins.worlds.digits import teacher_training
    from bilevel.plugins.worlds.digits.teacher_training import DigitsTeacherConfig, train_digits_teacher

    config = DigitsTeacherConfig(steps=4, batch_size=8, warmup=2, checkpoint_every=2, channels=(8, 8, 8, 8))
    straight = train_digits_teacher(config, tmp_path / "straight")

    class Killed(Exception):
        pass

    save = teacher_training._save_checkpoint

    def save_then_die(ckpts, step, *args):
        save(ckpts, step, *args)
        if step == 2:
            raise Killed

    monkeypatch.setattr(teacher_training, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_digits_teacher(config, tmp_path / "resumed")
    monkeypatch.undo()
    resumed = train_digits_teacher(config, tmp_path / "resumed")
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sessions = json.loads((tmp_path / "resumed" / "training.json").read_text())["sessions"]
    assert [s["first_step"] for s in sessions] == [2]
    with pytest.raises(BilevelError, match="resume with the same options"):
        train_digits_teacher(config.model_copy(update={"steps": 8}), tmp_path / "resumed")


def test_shipped_teacher_loads_offline_and_samples_digits():
    from bilevel.core.models import load_tiny_pipeline

    assert sum(f.stat().st_size for f in TEACHER.rglob("*") if f.is_file()) <= 20 * 2**20
    assert not list(TEACHER.rglob("*.bin")) and not list(TEACHER.rglob("*.pt"))  # safetensors only
    pipe = load_tiny_pipeline(str(TEACHER))
    assert pipe.unet.config.in_channels == 1 and pipe.unet.config.sample_size == 8
    images = pipe(
        [prompt_for(7, 0), prompt_for(7, 1)], num_inference_steps=10, generator=torch.Generator().manual_seed(0)
    )
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert (TEACHER / "README.md").is_file()
