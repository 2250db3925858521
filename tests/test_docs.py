"""The documentation site builds with `mkdocs build --strict`, and its generated reference pages cover every CLI
command/option, every RunConfig section/field and every registered plugin."""

from __future__ import annotations

import argparse
import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bilevel.cli import build_parser
from bilevel.core.config import RunConfig, build_config
from bilevel.registry import get_registry

ROOT = Path(__file__).resolve().parents[1]


def commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += [sub, *commands(sub)]
    return out


def text_of(page: Path) -> str:
    """The page's visible text, entities decoded (so `trust&#95;remote&#95;code` reads as trust_remote_code)."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.read_text())).split())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (it is in the `dev` extra: pip install -c constraints.txt -e '.[dev]')")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert not (ROOT / "docs" / "reference").exists(), "the reference pages are generated, not written into docs/"
    return out


def test_site_has_every_page(site):
    for page in ("index", "quick-start/index", "concepts/index", "plugin-api/index", "tiny-world/index",
                 "real-stable-diffusion/index", "reproduce-the-paper/index", "reference/cli/index",
                 "reference/config/index"):  # fmt: skip
        assert (site / f"{page}.html").is_file(), page


def test_cli_reference_lists_every_command_and_option(site):
    text = text_of(site / "reference" / "cli" / "index.html")
    subs = commands(build_parser())
    assert {p.prog for p in subs} >= {"bilevel run", "bilevel eval", "bilevel prune", "bilevel unlearn",
                                      "bilevel teacher train", "bilevel plugins"}  # fmt: skip
    for parser in subs:
        assert parser.prog in text, parser.prog
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in text, f"{parser.prog} {flag}"


def test_config_reference_lists_every_section_field_and_plugin(site):
    text = text_of(site / "reference" / "config" / "index.html")
    for name, field in RunConfig.model_fields.items():
        assert name in text, name
        sub = field.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            for child in sub.model_fields:
                assert f"{child}" in text, f"{name}.{child}"
    assert "training.weights" in text
    reg = get_registry()
    for kind in ("pruner", "unlearner", "solver", "world", "attack"):
        for name in reg.names(kind):
            assert f"{kind} {name}" in text, f"{kind} {name}"
            for option in reg.plugins[kind][name].cls.Config.model_fields:
                assert option in text, f"{kind} {name} option {option}"
    assert "unlearner uce" in text and "pruner random" in text  # the example package is documented too


def test_quick_start_config_example_is_valid():
    page = (ROOT / "docs" / "quick-start.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", page, re.DOTALL)
    assert block, "quick-start.md has no YAML config example"
    config = build_config(yaml.safe_load(block.group(1)))
    reg = get_registry()
    for kind, choice in (("pruner", config.pruner), ("unlearner", config.unlearner), ("solver", config.solver)):
        reg.create(kind, choice.name, choice.options)


def test_plugin_api_example_unlearner_runs(tmp_path, monkeypatch):
    """The complete unlearner shown in docs/plugin-api.md registers in-process and trains in a run, as written."""
    import json as _json

    import bilevel
    from bilevel.cli import main
    from bilevel.registry import manager

    text = (ROOT / "docs" / "plugin-api.md").read_text()
    start = text.index("# my_package/my_unlearner.py")
    source = tmp_path / "my_unlearner.py"
    source.write_text(text[start : text.index("```", start)])
    spec = importlib.util.spec_from_file_location("my_unlearner", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(manager, "_IN_PROCESS", [])
    monkeypatch.setattr(manager, "_REGISTRY", None)
    bilevel.register(module.MyUnlearner)
    out = tmp_path / "run"
    code = main(["run", "--unlearner", "my-unlearner", "--arms", "bilevel", "--steps", "2", "--out", str(out),
                 "--set", "training.batch_size=4", "--set", "training.upper_batch_size=2",
                 "--set", "solver.options.upper_every=1", "--set", "evaluation.samples_per_prompt=2",
                 "--set", "evaluation.steps=2", "--set", "evaluation.latency_repeats=1", "--set", "data.finetune_size=64"])  # fmt: skip
    assert code == 0
    history = _json.loads((out / "metrics.json").read_text())["histories"]["bilevel"]
    assert history[-1]["upper_updates"] == 2 and history[-1]["upper_loss"] > 0
