"""Evaluators for real images: CLIP score, zero-shot CLIP concept detection, Fréchet distance, NudeNet glue.

Everything runs offline on a tiny random CLIPModel written by tests/sd_fixtures.py; where it matters the results
are checked against transformers' own CLIPModel forward and CLIPImageProcessor, not against this package.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sd_fixtures import build_tiny_clip  # tests/ is on sys.path (rootdir conftest, no package)

from bilevel.core.errors import BilevelError
from bilevel.evaluators import (
    ClipConceptDetector,
    ClipScorer,
    EvaluatorConfig,
    NudityDetector,
    frechet_distance,
    frechet_distance_from_moments,
    frechet_distance_to_folder,
)
from bilevel.evaluators.clip import ClipPreprocessing

CONCEPTS = ["a painting by van gogh", "van gogh style"]
NEUTRAL = ["a photo of a cat", "a photo of a house", "a blue sky"]


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def quantised(images: torch.Tensor) -> torch.Tensor:
    """Images exactly representable as uint8, so PIL-based references see the same pixels."""
    return (images * 255).round() / 255


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())


def smooth_images(n: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Random but spatially smooth images (closer to photos than white noise), uint8-exact."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(height // 4, 2), max(width // 4, 2), generator=gen)
    return quantised(torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear"))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("evaluators") / "clip")


@pytest.fixture(scope="module")
def scorer(clip_folder) -> ClipScorer:
    return ClipScorer.load(str(clip_folder), "cpu")


@pytest.fixture(scope="module")
def hf_clip(clip_folder):
    """transformers' own model and processor for the same folder: the reference the evaluators must agree with."""
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(str(clip_folder)).eval(), CLIPProcessor.from_pretrained(str(clip_folder))


# --- CLIP score --------------------------------------------------------------------------------------------------


def test_clip_score_shape_range_formula_and_determinism(clip_folder, scorer):
    images = smooth_images(5, 24, 20, seed=1)
    prompts = ["a photo of a cat", "a red house", "van gogh", "a dog in a field", "Blue Sky!"]
    scores = scorer.score(images, prompts)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 100)).all())
    assert torch.equal(scores, scorer.score(images, prompts))  # deterministic
    cosine = (scorer.image_features(images) * scorer.text_features(prompts)).sum(-1)
    torch.testing.assert_close(scores, (100 * cosine).clamp(min=0))
    # batching must not change anything: one image / one prompt at a time gives the same numbers
    small = ClipScorer.load(str(clip_folder), "cpu", batch_size=2)
    torch.testing.assert_close(small.score(images, prompts), scores, atol=1e-5, rtol=0)
    features = scorer.image_features(images)
    assert features.shape == (5, 32)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(5))


def test_clip_score_is_positive_where_image_and_text_align(scorer, monkeypatch):
    """The clamp at 0 only removes negative cosines: an image whose features are the prompt's scores 100."""
    text = scorer.text_features(["a photo of a cat", "a blue sky"])
    monkeypatch.setattr(scorer, "image_features", lambda images: torch.stack([text[0], -text[1]]))
    scores = scorer.score(torch.zeros(2, 3, 16, 16), ["a photo of a cat", "a blue sky"])
    torch.testing.assert_close(scores, torch.tensor([100.0, 0.0]))


def test_preprocessing_matches_transformers_clip_image_processor():
    """Resize (shortest edge, bicubic) + centre crop + normalise agree with the PIL-based processor to uint8 rounding."""
    from transformers import CLIPImageProcessor

    current = {"size": {"shortest_edge": 20}, "crop_size": {"height": 16, "width": 12}, "image_mean": [0.5, 0.4, 0.3]}
    legacy = {"size": 20, "crop_size": 16, "feature_extractor_type": "CLIPFeatureExtractor"}  # openai's own files
    for config, crop in [(current, (16, 12)), (legacy, (16, 16))]:
        reference = CLIPImageProcessor(**config)
        ours = ClipPreprocessing.from_config(config)
        assert ours.shortest_edge == 20 and ours.crop_hw == crop
        for height, width in [(30, 24), (24, 31), (64, 64), (16, 16), (19, 40)]:
            images = smooth_images(2, height, width, seed=height * width)
            expected = reference(images=[to_pil(i) for i in images], return_tensors="pt")["pixel_values"]
            got = ours(images)
            assert got.shape == expected.shape == (2, 3, *crop)
            # one uint8 level is 1/255/std ~ 0.015 in normalised units: PIL rounds after resizing, torch does not
            assert (got - expected).abs().max() < 0.03, (config, height, width, (got - expected).abs().max())
    serialised = ClipPreprocessing.from_config(
        {"size": {"shortest_edge": 224, "height": None, "width": None}, "crop_size": {"height": 224, "width": 224}}
    )
    assert serialised.shortest_edge == 224 and serialised.resize_hw is None


def test_scorer_reads_preprocessing_from_the_model_folder(clip_folder, tmp_path):
    copy = Path(shutil.copytree(clip_folder, tmp_path / "clip-copy"))
    config_path = copy / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"].update(size={"shortest_edge": 24}, image_std=[0.5, 0.25, 0.125])
    config_path.write_text(json.dumps(config))
    loaded = ClipScorer.load(str(copy))
    assert loaded.preprocessing.shortest_edge == 24
    assert loaded.preprocessing.std == (0.5, 0.25, 0.125)
    assert loaded.preprocessing.crop_hw == (16, 16)


def test_features_and_logits_match_clipmodel_forward(scorer, hf_clip):
    model, processor = hf_clip
    images = smooth_images(3, 16, 16, seed=2)  # model resolution: preprocessing is the identity resize
    prompts = ["a photo of a cat", "van gogh painting", "a tree by a house"]
    inputs = processor(text=prompts, images=[to_pil(i) for i in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(scorer.text_features(prompts), torch.nn.functional.normalize(out.text_embeds, dim=-1))
    torch.testing.assert_close(
        scorer.image_features(images), torch.nn.functional.normalize(out.image_embeds, dim=-1), atol=1e-5, rtol=1e-4
    )
    logits = scorer.logit_scale * scorer.image_features(images) @ scorer.text_features(prompts).T
    torch.testing.assert_close(logits, out.logits_per_image, atol=1e-4, rtol=1e-4)


# --- zero-shot concept detector ----------------------------------------------------------------------------------


def test_detector_agrees_with_softmax_of_clipmodel_logits(scorer, hf_clip):
    """End to end through the real tiny CLIPModel: probabilities = softmax(logits_per_image)[:, concepts].sum()."""
    model, processor = hf_clip
    images = smooth_images(6, 16, 16, seed=3)
    detector = ClipConceptDetector(scorer, CONCEPTS, NEUTRAL)
    inputs = processor(text=CONCEPTS + NEUTRAL, images=[to_pil(i) for i in images], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.softmax(-1)[:, : len(CONCEPTS)].sum(-1)
    probability = detector.concept_probability(images)
    torch.testing.assert_close(probability, expected, atol=1e-5, rtol=1e-4)
    detected = detector.detect(images)
    assert detected.dtype == torch.bool and detected.shape == (6,)
    assert torch.equal(detected, expected > 0.5)


def test_detector_flags_images_whose_features_are_the_concepts(scorer, monkeypatch):
    """Constructed case: image features set to (noisy) text features; only concept-like ones are detected."""
    text = scorer.text_features(CONCEPTS + NEUTRAL)
    gen = torch.Generator().manual_seed(0)
    rows = [text[0], text[3], text[1], text[4], text[2], (text[0] + text[1]) / 2]
    features = torch.nn.functional.normalize(torch.stack(rows) + 0.01 * torch.randn(6, 32, generator=gen), dim=-1)
    detector = ClipConceptDetector(scorer, CONCEPTS, NEUTRAL)
    monkeypatch.setattr(scorer, "image_features", lambda images: features)
    stored = scorer.model.logit_scale.detach().clone()
    try:
        with torch.no_grad():
            scorer.model.logit_scale.fill_(math.log(100.0))  # OpenAI CLIP's temperature: a confident softmax
        assert scorer.logit_scale == pytest.approx(100.0)
        assert detector.detect(torch.zeros(6, 3, 16, 16)).tolist() == [True, False, True, False, False, True]
    finally:
        with torch.no_grad():
            scorer.model.logit_scale.copy_(stored)


def test_detector_and_scorer_refuse_bad_input(scorer):
    with pytest.raises(BilevelError) as exc:
        ClipConceptDetector(scorer, CONCEPTS, [])
    assert "neutral" in one_line(exc)
    with pytest.raises(BilevelError) as exc:
        scorer.score(torch.rand(2, 3, 16, 16) * 2 - 1, ["a", "b"])  # [-1, 1] decoder output, not mapped
    assert "[0, 1]" in one_line(exc)
    with pytest.raises(BilevelError) as exc:
        scorer.image_features(torch.rand(2, 3, 16, 16) * 255)
    assert "[0, 1]" in one_line(exc)
    # a VAE's slight overshoot is clamped, not refused
    images = smooth_images(2, 16, 16, seed=8)
    overshoot = images * 1.1 - 0.05
    torch.testing.assert_close(scorer.image_features(overshoot), scorer.image_features(overshoot.clamp(0, 1)))
    with pytest.raises(BilevelError) as exc:
        scorer.score(torch.rand(2, 3, 16, 16), ["only one prompt"])
    assert "one prompt per image" in one_line(exc)
    with pytest.raises(BilevelError) as exc:
        scorer.image_features(torch.rand(2, 4, 16, 16))
    assert "[N, 3, H, W]" in one_line(exc)


# --- model loading errors ----------------------------------------------------------------------------------------


def test_missing_clip_model_offline_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))  # nothing cached: must not find it anywhere
    with pytest.raises(BilevelError) as exc:
        ClipScorer.load("nobody-here/no-such-clip-model")
    message = one_line(exc)
    assert "nobody-here/no-such-clip-model" in message and "offline" in message and "download" in message
    with pytest.raises(BilevelError) as exc:
        ClipScorer.load(str(tmp_path / "missing-folder"))
    assert "not found" in one_line(exc)


def test_non_clip_or_broken_folder_is_refused(clip_folder, tmp_path):
    from transformers import CLIPTextConfig

    CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(
        tmp_path / "text-only"
    )
    with pytest.raises(BilevelError) as exc:
        ClipScorer.load(str(tmp_path / "text-only"))
    assert "clip_text_model" in one_line(exc) and "CLIP model" in str(exc.value)
    broken = Path(shutil.copytree(clip_folder, tmp_path / "no-weights"))
    (broken / "model.safetensors").unlink()
    with pytest.raises(BilevelError) as exc:
        ClipScorer.load(str(broken))
    assert str(broken) in one_line(exc)


# --- Fréchet distance --------------------------------------------------------------------------------------------


def diagonal_gaussian_samples(mu: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """2D points whose sample mean is exactly mu and unbiased sample covariance exactly diag(variances)."""
    dim, n = len(mu), 2 * len(mu)
    points = torch.zeros(n, dim, dtype=torch.float64)
    for i, var in enumerate(variances):
        a = math.sqrt(float(var) * (n - 1) / 2)
        points[2 * i, i], points[2 * i + 1, i] = a, -a
    return points + mu


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    s1 = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    s2 = torch.rand(6, generator=gen, dtype=torch.float64) + 0.1
    expected = float((mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    got = frechet_distance(diagonal_gaussian_samples(mu1, s1), diagonal_gaussian_samples(mu2, s2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert frechet_distance_from_moments(mu1, s1.diag(), mu2, s2.diag()) == pytest.approx(expected, rel=1e-9)
    # only the covariances differ: the mean term vanishes and the rest is still the closed form
    same_mean = frechet_distance(diagonal_gaussian_samples(mu1, s1), diagonal_gaussian_samples(mu1, s2))
    assert same_mean == pytest.approx(float((s1 + s2 - 2 * (s1 * s2).sqrt()).sum()), rel=1e-9)


def test_frechet_distance_identical_sets_and_general_covariances():
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(40, 8, generator=gen)
    assert frechet_distance(feats, feats.clone()) == pytest.approx(0.0, abs=1e-9)
    few = torch.randn(5, 16, generator=gen)  # fewer samples than dimensions: singular covariance
    assert frechet_distance(few, few.clone()) == pytest.approx(0.0, abs=1e-9)
    # non-commuting full covariances: tr sqrt(S1 S2) from the (real, >= 0) eigenvalues of the plain product
    a, b = torch.randn(8, 8, generator=gen, dtype=torch.float64), torch.randn(8, 8, generator=gen, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(8), b @ b.T + 0.1 * torch.eye(8)
    mu1, mu2 = torch.randn(8, generator=gen, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    trace_sqrt = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    expected = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * trace_sqrt)
    assert frechet_distance_from_moments(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # a shift of one set by d adds exactly ||d||^2
    shift = torch.full((8,), 0.5)
    other = torch.randn(30, 8, generator=gen)
    assert frechet_distance(feats + shift, other) - frechet_distance(feats, other - shift) == pytest.approx(0, abs=1e-6)
    with pytest.raises(BilevelError) as exc:
        frechet_distance(feats[:1], feats)
    assert "at least 2" in one_line(exc)


def write_images(folder: Path, images: torch.Tensor, suffix: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        to_pil(image).save(folder / f"ref-{i:02d}{suffix}")


def test_frechet_distance_to_a_folder_of_pngs(scorer, tmp_path):
    reference = smooth_images(6, 20, 16, seed=4)
    folder = tmp_path / "reference"
    write_images(folder, reference[:5])
    to_pil(reference[5]).convert("RGBA").save(folder / "extra.webp", lossless=True)  # webp + alpha: read as RGB
    (folder / "notes.txt").write_text("not an image")  # ignored
    (folder / "sub").mkdir()
    write_images(folder / "sub", smooth_images(3, 20, 16, seed=9))  # subfolders are not read
    generated = smooth_images(4, 32, 32, seed=5)
    got = frechet_distance_to_folder(generated, folder, scorer)
    expected = frechet_distance(scorer.image_features(generated), scorer.image_features(reference))
    assert got == pytest.approx(expected, rel=1e-5)
    assert got > 0
    # the same pixels on both sides: distance ~ 0; and the cached reference features give the same answer
    assert frechet_distance_to_folder(reference, folder, scorer) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance_to_folder(generated, folder, scorer) == got
    # a changed folder is re-read, not served from the cache
    write_images(folder, smooth_images(2, 20, 16, seed=6), suffix=".jpg")
    assert frechet_distance_to_folder(reference, folder, scorer) > 0


def test_frechet_distance_to_folder_errors(scorer, tmp_path):
    images = smooth_images(3, 16, 16, seed=7)
    with pytest.raises(BilevelError) as exc:
        frechet_distance_to_folder(images, tmp_path / "nope", scorer)
    assert "does not exist" in one_line(exc) and ".png" in str(exc.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(BilevelError) as exc:
        frechet_distance_to_folder(images, empty, scorer)
    assert "holds no" in one_line(exc)
    single = tmp_path / "single"
    write_images(single, images[:1])
    with pytest.raises(BilevelError) as exc:
        frechet_distance_to_folder(images, single, scorer)
    assert "at least 2" in one_line(exc)
    with pytest.raises(BilevelError) as exc:
        frechet_distance_to_folder(images[:1], tmp_path / "single", scorer)
    assert "at least 2" in one_line(exc)
    corrupt = tmp_path / "corrupt"
    write_images(corrupt, images)
    (corrupt / "bad.png").write_bytes(b"not a png")
    with pytest.raises(BilevelError) as exc:
        frechet_distance_to_folder(images, corrupt, scorer)
    assert "bad.png" in one_line(exc)


# --- NudeNet -----------------------------------------------------------------------------------------------------


def test_nudity_detector_without_nudenet_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # import fails exactly as when it is not installed
    with pytest.raises(BilevelError) as exc:
        NudityDetector.load()
    message = one_line(exc)
    assert "pip install nudenet" in message and "nudity: false" in message


def fake_nudenet(calls: list) -> types.ModuleType:
    """Stands in for nudenet: reports a class by the image's dominant colour, as NudeNet would report body parts."""

    class NudeDetector:
        def detect(self, image: np.ndarray) -> list[dict]:
            calls.append(image)
            blue, green, red = image.reshape(-1, 3).mean(0)  # NudeNet gets BGR, like cv2.imread
            if red > 200:
                return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 4, 4]}]
            if green > 200:
                return [{"class": "FEET_EXPOSED", "score": 0.9, "box": [0, 0, 4, 4]}]
            if blue > 200:
                return [{"class": "BUTTOCKS_EXPOSED", "score": 0.3, "box": [0, 0, 4, 4]}]
            return [{"class": "FACE_FEMALE", "score": 0.99, "box": [0, 0, 4, 4]}]

    module = types.ModuleType("nudenet")
    module.NudeDetector = NudeDetector
    return module


def test_nudity_detector_classes_threshold_and_bgr_layout(monkeypatch):
    from bilevel.evaluators import NUDENET_EXPOSED_CLASSES

    calls: list = []
    monkeypatch.setitem(sys.modules, "nudenet", fake_nudenet(calls))
    images = torch.zeros(4, 3, 10, 12)
    images[0, 0], images[1, 1], images[2, 2] = 1.0, 1.0, 1.0  # red, green, blue, black
    assert NudityDetector.load().detect(images).tolist() == [True, False, False, False]
    image = calls[0]
    assert (
        image.dtype == np.uint8
        and image.shape == (10, 12, 3)
        and image[..., 2].min() == 255
        and image[..., :2].max() == 0
    )
    assert NudityDetector.load(threshold=0.2).detect(images).tolist() == [True, False, True, False]
    every = NudityDetector.load(threshold=0.2, classes=NUDENET_EXPOSED_CLASSES)
    assert every.detect(images).tolist() == [True, True, True, False]
    assert [len(d) for d in every.detections(images)] == [1, 1, 1, 0]
    with pytest.raises(BilevelError) as exc:
        NudityDetector.load(classes=["NAKED"])
    assert "NAKED" in one_line(exc) and "FEMALE_BREAST_EXPOSED" in str(exc.value)
    with pytest.raises(BilevelError) as exc:
        NudityDetector.load(threshold=1.5)
    assert "[0, 1]" in one_line(exc)


def test_real_nudenet_on_plain_images_if_installed():
    pytest.importorskip("nudenet")
    detector = NudityDetector.load()
    flags = detector.detect(torch.full((2, 3, 64, 64), 0.5))
    assert flags.tolist() == [False, False]


# --- config and import cost --------------------------------------------------------------------------------------


def test_evaluator_config_defaults_and_validation():
    config = EvaluatorConfig()
    assert config.clip_model == "openai/clip-vit-large-patch14" and config.reference_images is None
    assert config.nudity is False and config.nudity_threshold == 0.5
    assert EvaluatorConfig(reference_images="refs").reference_images == Path("refs")
    with pytest.raises(ValueError):
        EvaluatorConfig(clip_modle="x")
    with pytest.raises(ValueError):
        EvaluatorConfig(nudity_threshold=2)


def test_importing_the_package_and_config_stays_light():
    code = (
        "import sys; from bilevel.evaluators import EvaluatorConfig; EvaluatorConfig(); "
        "heavy = [m for m in ('torch', 'transformers', 'nudenet') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
