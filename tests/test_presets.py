"""Presets: shipped RunConfig files, listed by `bilevel presets`, validated (unknown keys refused), layered under
--config, flags and --set (later wins); `paper` holds the released setting and runs end to end on an SD-format
pipeline, saving exactly the preset plus the overrides; `tiny-default` is today's defaults."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml

from bilevel.cli import main
from bilevel.core import presets
from bilevel.core.config import RunConfig, apply_override, build_config
from bilevel.core.presets import available, layer, load_preset, read_header
from bilevel.registry import get_registry

SHIPPED = Path(__file__).resolve().parents[1] / "bilevel" / "presets"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def resolved_options(config: RunConfig) -> dict[str, dict]:
    """Each plugin's options as its own Config fills them in (what the run saves)."""
    reg = get_registry()
    return {
        kind: reg.create(kind, choice.name, choice.options).config.model_dump(mode="json")
        for kind, choice in (("pruner", config.pruner), ("unlearner", config.unlearner), ("solver", config.solver))
    }


# ------------------------------------------------------------------------------------------------ listing
def test_presets_command_lists_every_shipped_file_one_line_each(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = sorted(p.stem for p in SHIPPED.glob("*.yaml"))
    assert {"paper", "tiny-default"} <= set(names)
    assert [line.split()[0] for line in lines] == names
    for line, name in zip(lines, names):
        description = read_header((SHIPPED / f"{name}.yaml").read_text())["description"]
        assert line.endswith(description) and " r1 " in line


def test_presets_show_prints_the_file(capsys):
    assert main(["presets", "--show", "paper"]) == 0
    assert capsys.readouterr().out == (SHIPPED / "paper.yaml").read_text()


@pytest.mark.parametrize("argv", [["run", "--preset", "nope"], ["presets", "--show", "nope"]])
def test_unknown_preset_is_one_line_listing_the_available(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown preset 'nope'; available: paper, tiny-default\n"


def test_preset_files_are_package_data():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"presets/*.yaml"' in text


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("name", sorted(p.stem for p in SHIPPED.glob("*.yaml")))
def test_every_shipped_preset_validates_with_its_plugins(name):
    config = build_config(load_preset(name))
    resolved_options(config)  # each plugin's own Config refuses unknown or invalid options


def write_preset(folder: Path, name: str, text: str, monkeypatch) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    monkeypatch.setattr(presets, "PRESET_ROOT", folder)


def test_preset_with_unknown_key_is_refused(tmp_path, monkeypatch, capsys):
    write_preset(tmp_path / "p", "bad", "# description: typo\ntraining:\n  stepz: 3\n", monkeypatch)
    assert "bad" in available()
    assert main(["run", "--preset", "bad", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: preset 'bad': invalid config value at training.stepz") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_preset_without_description_is_refused(tmp_path, monkeypatch, capsys):
    write_preset(tmp_path / "p", "bare", "training:\n  steps: 3\n", monkeypatch)
    assert main(["presets"]) == 2
    assert "preset 'bare' has no '# description: ...' line" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ contents
def test_tiny_default_is_todays_defaults():
    tiny, default = build_config(load_preset("tiny-default")), RunConfig()
    assert resolved_options(tiny) == resolved_options(default)
    strip = {kind: {"options"} for kind in ("pruner", "unlearner", "solver")}
    assert tiny.model_dump(exclude=strip) == default.model_dump(exclude=strip)


def test_paper_holds_the_released_setting():
    config = build_config(load_preset("paper"))
    opts = resolved_options(config)
    tc = config.training
    assert config.model.source == "stabilityai/stable-diffusion-2-1" and config.data.resolution == 512
    assert config.unlearner.name == "esd" and config.solver.name == "alternating"
    assert opts["unlearner"] | {"variant": "full", "eta": 1.0, "xt_source": "data"} == opts["unlearner"]
    assert opts["solver"] == {"coupling": "shared", "upper_every": 10, "upper_steps": 1}
    assert (tc.lower_lr, tc.upper_lr, tc.warmup, tc.batch_size) == (1e-6, 5e-6, 250, 64)
    assert tc.weights.model_dump() == {"task": 1.0, "output": 2.0, "feature": 0.1, "snr_gamma": 5.0}


# ------------------------------------------------------------------------------------------------ layering
def test_layer_merges_sections_and_resets_a_replaced_plugin():
    base = {
        "training": {"steps": 5, "weights": {"task": 1.0, "output": 2.0}},
        "arms": ["kd", "bilevel"],
        "unlearner": {"name": "esd", "options": {"variant": "full"}},
        "solver": {"name": "alternating"},
    }
    before = copy.deepcopy(base)
    top = {
        "training": {"weights": {"output": 0.5}},
        "arms": ["kd"],
        "unlearner": {"name": "salun"},
        "solver": {"options": {"upper_every": 3}},
    }
    assert layer(base, top) == {
        "training": {"steps": 5, "weights": {"task": 1.0, "output": 0.5}},
        "arms": ["kd"],
        "unlearner": {"name": "salun"},  # esd's options do not follow a switch to salun
        "solver": {"name": "alternating", "options": {"upper_every": 3}},
    }
    assert base == before  # inputs untouched
    same = layer(base, {"unlearner": {"name": "esd", "options": {"eta": 2.0}}})
    assert same["unlearner"] == {"name": "esd", "options": {"variant": "full", "eta": 2.0}}


def captured_config(argv: list[str], monkeypatch) -> RunConfig:
    from bilevel.commands import run as runner

    seen: list[RunConfig] = []
    monkeypatch.setattr(runner, "run", lambda config, resume=False: seen.append(config))
    assert main(argv) == 0
    return seen[0]


def test_preset_then_config_then_flags_then_set(tmp_path, monkeypatch):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({"training": {"steps": 7, "upper_lr": 1e-5, "warmup": 3},
                                   "solver": {"options": {"upper_every": 5}}}))  # fmt: skip
    config = captured_config(
        ["run", "--preset", "paper", "--config", str(cfg), "--steps", "9", "--set", "training.upper_lr=2e-5",
         "--model", "tiny"],
        monkeypatch,
    )  # fmt: skip
    tc = config.training
    assert (tc.steps, tc.upper_lr, tc.warmup) == (9, 2e-5, 3)  # flag over config, --set over config
    assert (tc.lower_lr, tc.batch_size, tc.weights.snr_gamma) == (1e-6, 64, 5.0)  # from the preset
    assert config.model.source == "tiny"
    assert config.solver.options == {"coupling": "shared", "upper_every": 5, "upper_steps": 1}
    assert config.unlearner.options == {"variant": "full", "eta": 1.0, "xt_source": "data"}


def test_switching_the_preset_plugin_drops_its_options(monkeypatch):
    config = captured_config(["run", "--preset", "paper", "--unlearner", "salun"], monkeypatch)
    assert config.unlearner.name == "salun" and config.unlearner.options == {}
    resolved_options(config)


def test_schedule_builds_on_the_preset_arms(tmp_path, monkeypatch):
    write_preset(tmp_path / "p", "few", "# description: two arms\narms: [teacher, kd]\n", monkeypatch)
    config = captured_config(["run", "--preset", "few", "--schedule", "both"], monkeypatch)
    assert config.arms == ["teacher", "kd", "bilevel", "two-stage"]


def test_no_preset_is_unchanged(monkeypatch):
    assert captured_config(["run"], monkeypatch) == RunConfig()


# ------------------------------------------------------------------------------------------------ end to end
def test_paper_preset_runs_on_a_mini_sd_pipeline(tmp_path, capsys):
    """--preset paper with a v-prediction SD-format pipeline: the saved config is the preset plus the overrides."""
    from sd_fixtures import IMAGE_SIZE, build_tiny_clip, build_tiny_sd, write_random_pngs

    model = build_tiny_sd(tmp_path / "sd-v", prediction_type="v_prediction")
    clip = build_tiny_clip(tmp_path / "clip")
    data = tmp_path / "data"
    for i, image in enumerate(write_random_pngs(data, 4, seed=0)):
        image.with_suffix(".txt").write_text(["a red house", "a tree in a field"][i % 2])
    out = tmp_path / "run"
    overrides = [
        f"data.finetune_data={data}", f"data.resolution={IMAGE_SIZE}", "data.concept_size=4",
        f"evaluation.sd.clip_model={clip}", "evaluation.sd.nudity=false", "evaluation.samples_per_prompt=2",
        "evaluation.steps=2", "evaluation.latency_repeats=1", "training.steps=10", "training.batch_size=2",
        "training.upper_batch_size=2", "training.warmup=2", "training.log_every=1",
    ]  # fmt: skip
    argv = ["run", "--preset", "paper", "--model", str(model), "--concept", "van gogh style", "--arms", "ddpm,bilevel",
            "--out", str(out)]  # fmt: skip
    for o in overrides:
        argv += ["--set", o]
    code = main(argv)
    assert code == 0, capsys.readouterr().err

    saved = json.loads((out / "config.json").read_text())
    raw = load_preset("paper")
    expected = copy.deepcopy(raw)
    for o in [*overrides, f"model.source={model}", "concepts=[van gogh style]", "arms=[ddpm, bilevel]",
              f"output.dir={out}"]:  # fmt: skip
        apply_override(expected, o)
    expected = build_config(expected).model_dump(mode="json")
    expected.update({kind: {"name": expected[kind]["name"], "options": opts}
                     for kind, opts in resolved_options(build_config(saved)).items()})  # fmt: skip
    assert saved == expected

    def leaves(d: dict, prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in d.items():
            out.update(leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    flat, overridden = leaves(saved), {o.split("=")[0] for o in overrides} | {"model.source", "concepts"}
    for key, value in leaves(raw).items():  # every value the preset sets and nothing overrides is in the run
        if key not in overridden:
            assert flat[key] == value, key
    assert flat["training.steps"] == 10 and flat["data.resolution"] == IMAGE_SIZE

    metrics = json.loads((out / "metrics.json").read_text())
    bilevel = metrics["histories"]["bilevel"]
    assert sum("upper_loss" in e for e in bilevel) == 1  # one upper update in 10 steps (upper_every 10)
    for arm in ("ddpm", "bilevel"):
        assert all(math.isfinite(e["lower_loss"]) for e in metrics["histories"][arm] if "lower_loss" in e)
