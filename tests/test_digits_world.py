"""The digits world plugin: resolution (name, shipped folder, marked folders; never a tiny folder), concept checks,
evaluation counting (the detector's `none` is not the concept), and every command end to end on a 2-step run."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from bilevel.cli import main
from bilevel.core.config import RunConfig, build_config
from bilevel.core.errors import BilevelError
from bilevel.plugins.worlds.digits import evaluation as digits_evaluation
from bilevel.plugins.worlds.digits.data import CLASS_NAMES, digit_of_prompt, load_real_digits, split_indices
from bilevel.plugins.worlds.digits.plugin import MARKER, SHIPPED_TEACHER, DigitsWorldPlugin
from bilevel.worlds.models import TINY_TEACHER
from bilevel.worlds.resolve import build_world, world_plugin

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_EVAL = ["--set", "evaluation.samples_per_prompt=2", "--set", "evaluation.concept_samples=4",
              "--set", "evaluation.steps=2", "--set", "evaluation.latency_repeats=1"]  # fmt: skip


def config(source: str = "digits", concepts: list[str] | None = None, **extra) -> RunConfig:
    data: dict = {"model": {"source": source}, **extra}
    if concepts is not None:
        data["concepts"] = concepts
    return build_config(data)


@pytest.fixture(scope="module")
def world():
    return build_world(config(concepts=["seven"]), "eval")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "run"
    code = main(["run", "--model", "digits", "--steps", "2", "--out", str(out), *SMALL_EVAL])
    assert code == 0
    return out


def test_resolution_by_name_shipped_folder_and_marker_but_never_a_tiny_folder(tmp_path):
    assert world_plugin(config("digits", ["seven"])).name == "digits"
    assert world_plugin(config(str(SHIPPED_TEACHER), ["seven"])).name == "digits"
    assert world_plugin(config("tiny")).name == "tiny"
    assert world_plugin(config(str(TINY_TEACHER))).name == "tiny"
    unmarked = tmp_path / "unmarked"
    shutil.copytree(SHIPPED_TEACHER, unmarked, ignore=shutil.ignore_patterns(MARKER))
    assert world_plugin(config(str(unmarked))).name == "tiny"  # a tiny-pipeline folder without the marker
    assert not DigitsWorldPlugin().accepts(str(TINY_TEACHER))
    assert not DigitsWorldPlugin().accepts(str(tmp_path / "missing"))


def test_check_refuses_unknown_and_duplicate_concepts_in_one_line():
    plugin = DigitsWorldPlugin()
    for concepts, says in (
        (["purple"], "accepted: zero (0)"),
        (["seven", "7"], "one digit twice"),
        (["ten"], "nine (9)"),
    ):
        with pytest.raises(BilevelError, match=r"^[^\n]*$") as err:
            plugin.check(config(concepts=concepts), "run")
        assert says in str(err.value)
    untouched = config()  # the global default concept (a tiny colour) becomes this world's default digit
    plugin.check(untouched, "run")
    assert untouched.concepts == ["seven"]
    numeral = config(concepts=["3"])
    plugin.check(numeral, "eval")
    assert numeral.concepts == ["3"]


def test_mapping_unlearners_need_digit_prompts_and_are_told_which():
    with pytest.raises(BilevelError, match=r"unlearner.options.anchor=\['a handwritten six', 'the digit 6'\]"):
        DigitsWorldPlugin().check(config(concepts=["seven"], unlearner={"name": "concept-ablation"}), "run")
    given = config(concepts=["seven"], unlearner={"name": "salun", "options": {"relabel": ["a", "b"]}})
    DigitsWorldPlugin().check(given, "run")


def test_without_scikit_learn_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(BilevelError, match=r"pip install 'bilevel\[digits\]'"):
        DigitsWorldPlugin().check(config(concepts=["seven"]), "run")


def test_world_data_excludes_the_concept_and_prompts_use_both_names(world):
    labels = [digit_of_prompt(p) for p in world.finetune.prompts]
    assert 7 not in labels and set(labels) == set(range(10)) - {7}
    assert {digit_of_prompt(p) for p in world.concept_data.prompts} == {7}
    assert world.concept_prompts() == ["a handwritten seven", "the digit 7"]
    assert world.concept_aliases("seven") == ["7"] and world.concept_aliases("7") == ["seven"]
    train, _ = split_indices(load_real_digits()[1])
    assert len(world.finetune) + len(world.concept_data) == len(train)  # all of the train split, no repeats
    assert world.finetune.images.shape[1:] == (1, 8, 8) and world.finetune.images.abs().max() <= 1


def _fake_sampler(images_for):
    """sample_images stand-in: an image per prompt from `images_for(digit, n)` (the UNet is never called)."""

    def sample(unet, scheduler_config, cond, uncond, **kwargs):
        prompts = sample.prompts
        digits = [digit_of_prompt(p) for p in prompts]
        return torch.cat([images_for(d, 1) for d in digits])

    return sample


def _evaluate(world, monkeypatch, images_for, samples=4, concept_samples=8):
    sampler = _fake_sampler(images_for)
    bank = world.bank

    class Recording:
        def __call__(self, prompts):
            sampler.prompts = list(prompts)
            return bank(prompts)

        def empty(self, n):
            return bank.empty(n)

    monkeypatch.setattr(digits_evaluation, "sample_images", sampler)
    monkeypatch.setattr(world, "bank", Recording())
    try:
        return digits_evaluation.evaluate_digits(
            torch.nn.Identity(), world, samples_per_class=samples, concept_samples=concept_samples, steps=1
        ).evaluation
    finally:
        monkeypatch.setattr(world, "bank", bank)


def test_real_digits_score_as_asked_and_blanks_count_as_not_the_concept(world, monkeypatch):
    images, labels = load_real_digits()
    _, held = split_indices(labels)

    def real(digit: int, n: int) -> torch.Tensor:
        return images[held[labels[held] == digit][:n]]

    ev = _evaluate(world, monkeypatch, real)
    assert ev.concept_rate == 1.0 and ev.retained_accuracy >= 0.9 and ev.concept_samples == 8 and ev.samples == 4
    assert ev.quality_metric == "fid-digits" and ev.quality_distance is not None
    blank = _evaluate(world, monkeypatch, lambda d, n: -torch.ones(n, 1, 8, 8))
    assert blank.concept_rate == 0.0 and blank.retained_accuracy == 0.0  # `none` is never the concept
    assert blank.extra["concept_none/seven"] == 1.0
    low, high = blank.intervals["concept_rate"]
    assert low == 0.0 and 0.2 < high < 0.4  # Wilson, 0 of 8


def test_collateral_is_measured_on_the_teachers_nearest_classes(world):
    from bilevel.plugins.worlds.digits.neighbours import nearest_digits

    matrix = world.confusability()
    assert len(matrix) == 10 and all(abs(matrix[i][j] - matrix[j][i]) < 1e-9 for i in range(10) for j in range(10))
    near = nearest_digits(matrix, 7, {7})
    assert len(near) == 2 and 7 not in near


def test_short_run_writes_rows_with_intervals_for_every_arm(short_run):
    cfg = json.loads((short_run / "config.json").read_text())
    assert cfg["concepts"] == ["seven"] and cfg["model"]["source"] == "digits"
    rows = {r["model"]: r for r in json.loads((short_run / "metrics.json").read_text())["rows"]}
    assert {"teacher", "pruned", "kd", "bilevel"} <= set(rows)
    for row in rows.values():
        assert row["quality_metric"] == "fid-digits" and row["concept_samples"] == 4
        for key in ("concept_rate", "concept_rate/seven", "retained_accuracy", "collateral"):
            low, high = row[f"{key}_ci"]
            assert low <= row[key] <= high
    assert rows["pruned"]["params"] < rows["teacher"]["params"]


def test_eval_export_unlearn_and_attack_on_a_digits_student(short_run, tmp_path, capsys):
    assert main(["eval", "digits", "--concept", "7", "--out", str(tmp_path / "ev"), *SMALL_EVAL]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["world"] == "digits" and set(report["per_group"]) == set(CLASS_NAMES)
    assert {"concept_rate/7_ci", "retained_accuracy_ci", "collateral_ci", "quality_distance"} <= set(report)
    exported = tmp_path / "exported"
    assert main(["export", str(short_run), "--out", str(exported)]) == 0
    assert (exported / MARKER).is_file()
    assert main(["eval", str(exported), "--concept", "seven", *SMALL_EVAL]) == 0  # the folder is a digits world
    assert "digits world" in capsys.readouterr().out
    erased = tmp_path / "erased"
    assert main(["unlearn", str(short_run / "students" / "kd"), "--concept", "seven", "--steps", "2",
                 "--out", str(erased), *SMALL_EVAL]) == 0  # fmt: skip
    assert json.loads((erased / "unlearn.json").read_text())["world"] == "digits"
    code = main(["attack", str(erased), "--concept", "seven", "--attack", "paraphrase", "--out", str(tmp_path / "at"),
                 *SMALL_EVAL, "--set", "samples=2", "--set", "sampler_steps=2"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    attacks = json.loads((tmp_path / "at" / "attacks.json").read_text())
    assert attacks["results"][0]["used"]["best"] == "alias:7"


def test_unknown_concept_on_the_command_line_is_one_line(capsys):
    assert main(["run", "--model", "digits", "--concept", "purple", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown digit 'purple'" in err
