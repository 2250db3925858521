"""Run config: validation errors are one line naming the field; files and overrides load as documented."""

from __future__ import annotations

import pytest

from bilevel import CONFIG_VERSION
from bilevel.core.config import RunConfig, apply_override, build_config, read_config_file
from bilevel.core.errors import BilevelError


def test_defaults_are_the_documented_slice():
    cfg = RunConfig()
    assert (cfg.pruner.name, cfg.unlearner.name, cfg.solver.name) == ("bk-sdm", "esd", "alternating")
    assert cfg.concepts == ["purple"]
    assert (cfg.training.weights.task, cfg.training.weights.output, cfg.training.weights.feature) == (1.0, 2.0, 0.1)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"training": {"steps": 0}}, "training.steps"),
        ({"training": {"stpes": 10}}, "training.stpes"),
        ({"concepts": []}, "at least one concept"),
        ({"concepts": ["  "]}, "empty concept"),
        ({"version": CONFIG_VERSION + 1}, "newer than this bilevel supports"),
        ({"arms": ["teacher", "magic"]}, "arms.1"),
        ({"training": {"upper_lr": "fast"}}, "training.upper_lr"),
    ],
)
def test_invalid_values_are_one_line_errors(data, fragment):
    with pytest.raises(BilevelError) as err:
        build_config(data)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_yaml_and_toml_files_load_the_same(tmp_path):
    (tmp_path / "a.yaml").write_text("concepts: [blue]\ntraining:\n  steps: 7\npruner:\n  name: magnitude\n  options: {ratio: 0.4}\n")
    (tmp_path / "a.toml").write_text('concepts = ["blue"]\n[training]\nsteps = 7\n[pruner]\nname = "magnitude"\noptions = {ratio = 0.4}\n')
    a = build_config(read_config_file(tmp_path / "a.yaml"))
    b = build_config(read_config_file(tmp_path / "a.toml"))
    assert a == b and a.training.steps == 7 and a.pruner.options == {"ratio": 0.4}


def test_bad_files_are_clear(tmp_path):
    with pytest.raises(BilevelError, match="not found"):
        read_config_file(tmp_path / "missing.yaml")
    (tmp_path / "x.ini").write_text("a=1")
    with pytest.raises(BilevelError, match="accepted: .yaml"):
        read_config_file(tmp_path / "x.ini")
    (tmp_path / "bad.yaml").write_text("training: [unclosed")
    with pytest.raises(BilevelError, match="cannot parse"):
        read_config_file(tmp_path / "bad.yaml")


def test_overrides_parse_values_as_yaml():
    data: dict = {}
    apply_override(data, "training.upper_lr=1e-3")
    apply_override(data, "pruner.options.ratio=0.25")
    apply_override(data, "concepts=[red, blue]")
    cfg = build_config(data)
    assert cfg.training.upper_lr == 1e-3 and cfg.pruner.options["ratio"] == 0.25 and cfg.concepts == ["red", "blue"]
    with pytest.raises(BilevelError, match="key.path=value"):
        apply_override(data, "training.steps")
