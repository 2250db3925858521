"""The example third-party package (examples/bilevel-extra-plugins) installed the way a user would install it,
into a throw-away location, then driven through the real `bilevel` command line in a subprocess.

It is built with the project venv's own setuptools (`--no-build-isolation --no-index --no-deps`: offline, nothing
downloaded) into a temporary `--target` folder that only the subprocesses see (PYTHONPATH), so the project venv
is never modified.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "bilevel-extra-plugins"
DIST = "bilevel-extra-plugins"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed in this environment; the example cannot be built offline")
    tmp = tmp_path_factory.mktemp("example-plugin")
    source = tmp / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--target", str(target), str(source)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(target.glob("bilevel_extra_plugins-*.dist-info/entry_points.txt"))
    env = dict(os.environ)
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               BILEVEL_STRICT_PLUGINS="1")  # fmt: skip
    return env, tmp


def bilevel(env, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bilevel.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def _installed_here() -> bool:
    """Whether the example is installed in the environment running the tests (the project venv)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(DIST)
    except PackageNotFoundError:
        return False
    return True


INSTALLED_BEFORE = _installed_here()


def test_plugins_are_listed_with_the_example_as_source(plugin_env):
    env, tmp = plugin_env
    done = bilevel(env, "plugins", "--json", cwd=tmp)
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    found = {(p["kind"], p["name"]): p for p in listing["plugins"]}
    assert found[("unlearner", "uce")]["source"] == DIST
    assert found[("pruner", "random")]["source"] == DIST
    assert found[("unlearner", "uce")]["version"] == "0.1.0"
    assert found[("unlearner", "esd")]["source"] == "bilevel"  # the built-ins are still there
    assert listing["failures"] == [] and listing["conflicts"] == []
    schema = bilevel(env, "plugins", "--schema", "uce", cwd=tmp)
    assert schema.returncode == 0 and "preserve_weight" in json.loads(schema.stdout)["properties"]
    bad = bilevel(env, "prune", "--pruner", "random", "--set", "ratoi=0.2", "--out", str(tmp / "bad"), cwd=tmp)
    assert bad.returncode == 2 and "options: target_macs, ratio" in bad.stderr  # the plugin's Config is enforced


def test_run_with_the_example_unlearner_end_to_end(plugin_env):
    env, tmp = plugin_env
    out = tmp / "run"
    done = bilevel(
        env, "run", "--unlearner", "uce", "--arms", "bilevel", "--steps", "10", "--out", str(out),
        "--set", "evaluation.samples_per_prompt=2", "--set", "evaluation.steps=3",
        "--set", "data.finetune_size=256", "--set", "evaluation.latency_repeats=1",
        cwd=tmp,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["model"] for r in metrics["rows"]] == ["bilevel"]
    history = metrics["histories"]["bilevel"]
    assert any("upper_loss" in h for h in history)
    config = json.loads((out / "config.json").read_text())
    assert config["unlearner"]["name"] == "uce" and config["unlearner"]["options"]["anchor"]["mode"] == "farthest"


def test_prune_with_the_example_pruner(plugin_env):
    env, tmp = plugin_env
    out = tmp / "student"
    done = bilevel(env, "prune", "--pruner", "random", "--set", "ratio=0.25", "--out", str(out), cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").stat().st_size > 0 and (out / "manifest.json").is_file()
    report = json.loads((out / "prune_report.json").read_text())
    assert report["pruner"] == "random" and report["options"] == {
        "ratio": 0.25, "seed": 0, "keep_time_embedding": True, "target_macs": None, "prune_heads": False, "round_to": None
    }
    assert report["ratios"]["params"] < 1.0


def test_the_project_env_is_left_as_it_was():
    """The example went into a temporary --target folder, never into the project venv."""
    import importlib

    importlib.invalidate_caches()
    assert _installed_here() == INSTALLED_BEFORE
    if not INSTALLED_BEFORE:
        assert importlib.util.find_spec("bilevel_extra") is None
