"""Attacks (is a suppressed concept really gone?): the plugin kind, the four built-ins on the tiny world, and
`bilevel attack`. Tiny settings throughout: 4 samples per group, 4 DDIM steps, a handful of training steps."""

from __future__ import annotations

import json

import pytest
import torch

import bilevel
from bilevel.cli import main
from bilevel.core.attack import Attack, AttackConfig, AttackResult
from bilevel.core.config import EvalConfig, build_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"samples": 4, "sampler_steps": 4}
EVAL = EvalConfig()
BUILTINS = {"paraphrase", "inversion", "relearn-benign", "relearn-fewshot"}


@pytest.fixture(scope="module")
def world():
    from bilevel.worlds.resolve import build_world

    config = build_config({"model": {"source": "tiny"}, "data": {"finetune_size": 64, "concept_size": 32}})
    return build_world(config, "run")


@pytest.fixture(scope="module")
def pruned(world):
    """A BK-SDM student before any training: it renders no purple (a concept-free model)."""
    from bilevel.registry import get_registry

    return get_registry().create("pruner", "bk-sdm").prune(world.teacher, None).student.eval()


def attack(name: str, **options):
    from bilevel.registry import get_registry

    return get_registry().create("attack", name, {**FAST, **options})


def test_registry_lists_the_four_builtin_attacks() -> None:
    from bilevel.registry import get_registry

    reg = get_registry()
    assert BUILTINS <= set(reg.names("attack"))
    for name in BUILTINS:
        info = reg.get("attack", name)
        assert info.source == "bilevel" and issubclass(info.cls, Attack) and "api_version" in vars(info.cls)


def test_relearn_fewshot_on_the_teacher_reaches_half_at_step_0(world) -> None:
    result = attack("relearn-fewshot", steps=10, every=5).run(world.teacher, world, "purple", EVAL)
    assert result.reached_at == 0 and result.concept_rate >= 0.5 and result.note is None
    assert [p.step for p in result.curve] == [0]  # stops at the first measurement that reaches the threshold


def test_relearn_fewshot_on_a_concept_free_student_needs_steps(world, pruned) -> None:
    result = attack("relearn-fewshot", steps=10, every=5).run(pruned, world, "purple", EVAL)
    assert result.curve[0].step == 0 and result.curve[0].concept_rate < 0.5
    assert result.reached_at is None or result.reached_at > 0
    if result.reached_at is None:
        assert "did not reach 0.5 within 10 steps" in result.note and [p.step for p in result.curve] == [0, 5, 10]


def test_relearn_benign_measures_a_curve_and_leaves_the_model_unchanged(world, pruned) -> None:
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    result = attack("relearn-benign", steps=4, curve_points=2, batch_size=4).run(pruned, world, "purple", EVAL)
    assert [p.step for p in result.curve] == [0, 2, 4]
    assert result.concept_rate == max(p.concept_rate for p in result.curve)
    lo, hi = result.interval
    assert lo <= result.concept_rate <= hi and result.samples == 4
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())


def test_inversion_recovers_the_concept_on_the_teacher(world) -> None:
    """Rendered without the concept word the teacher shows little purple; the learned embedding brings it back."""
    result = attack("inversion", steps=20, samples=8).run(world.teacher, world, "purple", EVAL)
    start, end = result.curve
    assert result.used["rendered_prompts"][0] == "a circle"
    assert start.concept_rate <= 0.25 and end.concept_rate >= 0.8 and result.concept_rate == end.concept_rate


def test_paraphrase_renders_the_prompt_file(world, tmp_path) -> None:
    """The file's prompts replace the concept prompts: the concept named another way shows, a neutral one not."""
    named = tmp_path / "named.csv"
    named.write_text('id,prompt,nsfw\n1,"a shape of purple",0\n2,purple,0\n')
    neutral = tmp_path / "neutral.txt"
    neutral.write_text("a green circle\n\na green square\n")
    shows = attack("paraphrase", prompts=str(named), aliases=False).run(world.teacher, world, "purple", EVAL)
    hides = attack("paraphrase", prompts=str(neutral), aliases=False).run(world.teacher, world, "purple", EVAL)
    assert shows.used["prompt_count"] == {"file:named.csv": 2}
    assert shows.concept_rate >= 0.5 and hides.concept_rate == 0.0


@pytest.mark.parametrize(
    "name, options",
    [("inversion", {"steps": 3}), ("relearn-benign", {"steps": 2, "curve_points": 1, "batch_size": 4}),
     ("relearn-fewshot", {"steps": 2, "every": 1})],
)  # fmt: skip
def test_attacks_are_deterministic_by_seed(world, pruned, name, options) -> None:
    first = attack(name, **options).run(pruned, world, "purple", EVAL).model_dump()
    again = attack(name, **options).run(pruned, world, "purple", EVAL).model_dump()
    assert first == again


def test_paraphrase_finds_the_concept_on_the_teacher_under_its_second_name(world) -> None:
    """The teacher learned 'violet' for purple; unlearners are only given 'purple', so the alias is the attack."""
    assert world.concept_aliases("purple") == ["violet"] and world.concept_aliases("striped") == ["banded"]
    found = attack("paraphrase", samples=16).run(world.teacher, world, "purple", EVAL)
    assert "violet" in json.dumps(found.used) and found.concept_rate >= 0.8


@pytest.mark.slow  # about 1 minute: a run, every arm attacked, then resumed: the separate CI step
def test_run_with_robustness_attacks_the_teacher_and_every_trained_arm(tmp_path) -> None:
    out = tmp_path / "run"
    sets = ["evaluation.samples_per_prompt=2", "evaluation.concept_samples=2", "evaluation.steps=2",
            "evaluation.latency_repeats=1", "data.finetune_size=64", "data.concept_size=16", "training.batch_size=4",
            "training.upper_batch_size=4", "robustness.attacks=[paraphrase, relearn-benign]",
            "robustness.options=[samples=2, sampler_steps=2, relearn-benign.steps=2, relearn-benign.curve_points=1]"]  # fmt: skip
    argv = ["run", "--steps", "2", "--robustness", "--out", str(out)]
    code = main(argv + [a for s in sets for a in ("--set", s)])
    assert code == 0
    report = json.loads((out / "robustness.json").read_text())
    assert [r["arm"] for r in report["rows"]] == ["teacher", "kd", "bilevel"]  # the untrained pruned arm is skipped
    for row in report["rows"]:
        assert row["paraphrase"].count("[") == 1 and row["relearn-benign"].count("[") == 1 and row["none"] != "-"
    assert (out / "robustness" / "bilevel" / "attacks.json").is_file() and "| arm |" in (out / "robustness.md").read_text()
    # a run killed after DONE but before its attacks finished: --resume attacks it (reusing finished attacks)
    (out / "robustness.json").unlink()
    assert main(["run", "--resume", "--out", str(out)]) == 0
    assert json.loads((out / "robustness.json").read_text()) == report


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--attack", "inversoin"], "unknown attack 'inversoin'"),
        (["--attack", "inversion", "--set", "bogus=1"], "no selected attack has this option"),
        (["--attack", "inversion", "--set", "relearn-benign.steps=1"], "'relearn-benign' is not selected"),
        (["--attack", "inversion", "--set", "inversion.steps=-1"], "option steps"),
        (["--attack", "paraphrase", "--set", "prompts=/nonexistent.txt"], "prompt file not found"),
    ],
)
def test_bad_input_is_one_line(args, fragment, capsys) -> None:
    code = main(["attack", "tiny", *args, "--set", "samples=2", "--set", "sampler_steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and err.count("\n") == 1 and err.startswith("error: ")


@pytest.fixture()
def in_process(monkeypatch):
    from bilevel.registry import manager

    monkeypatch.setattr(manager, "_IN_PROCESS", [])
    monkeypatch.setattr(manager, "_REGISTRY", None)
    return manager


def test_a_third_party_attack_runs_through_the_command(in_process, tmp_path, capsys) -> None:
    from bilevel.toolkit import measure_concept_rate

    seen = {}

    class ProbeConfig(AttackConfig):
        boost: float = 0.0

    @bilevel.register
    class Probe(Attack):
        """What a notebook would define: the plain concept rate, measured by the world's own evaluator."""

        name = "probe"
        Config = ProbeConfig
        api_version = bilevel.PLUGIN_API_VERSION

        def run(self, unet, world, concept, evaluation) -> AttackResult:
            seen.update(world=world.name, concept=concept, boost=self.config.boost)
            m = measure_concept_rate(world, unet, concept, evaluation, self.config.samples, self.config.sampler_steps)
            return AttackResult(attack=self.name, concept=concept, concept_rate=m.rate, interval=m.interval,
                                samples=m.samples, used={"boost": self.config.boost})  # fmt: skip

    out = tmp_path / "att"
    code = main(["attack", "tiny", "--concept", "purple", "--attack", "probe", "--set", "probe.boost=2",
                 "--set", "samples=2", "--set", "sampler_steps=2", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert seen == {"world": "tiny", "concept": "purple", "boost": 2.0}
    report = json.loads((out / "attacks.json").read_text())
    (result,) = report["results"]
    assert result["attack"] == "probe" and result["samples"] == 2 and result["used"] == {"boost": 2.0}
    assert report["no_attack"][0]["concept"] == "purple" and "probe" in capsys.readouterr().out


def test_upper_aliases_add_the_second_names_to_the_upper_level(world) -> None:
    """training.upper_aliases: the unlearner also sees the concept under the names an attacker would try."""
    from bilevel.optim.problem import unlearn_context

    plain = unlearn_context(world.teacher, world.teacher, world, None, 0)
    hardened = unlearn_context(world.teacher, world.teacher, world, None, 0, aliases=True)
    assert not any("violet" in p for p in plain.concept_prompts)
    assert hardened.concept_prompts == plain.concept_prompts + [p.replace("purple", "violet") for p in plain.concept_prompts]
