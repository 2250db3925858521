"""The house plan: contracts import no engine, plugins use only the public API, and notebooks register in-process."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import bilevel
from bilevel.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bilevel"
PUBLIC = ("bilevel.core", "bilevel.registry", "bilevel.toolkit")  # and the top-level `bilevel` module itself


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def bilevel_imports(path: Path) -> set[str]:
    """Every bilevel module `path` imports, at any depth (function-level too), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base == "bilevel" or base.startswith("bilevel."):
                found.add(base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "bilevel"}
    return found


def under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_contracts_and_registry_import_no_engine_or_command_module() -> None:
    offenders = {}
    for room in ("core", "registry"):
        for path in (PACKAGE / room).rglob("*.py"):
            bad = sorted(m for m in bilevel_imports(path) if m != "bilevel" and not under(m, PUBLIC[:2]))
            if bad:
                offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, offenders


def test_builtin_plugins_and_the_example_use_only_the_public_api() -> None:
    offenders = {}
    for path in (PACKAGE / "plugins").rglob("*.py"):
        own = ".".join(module_name(path).split(".")[:3])  # e.g. bilevel.plugins.unlearners: its own siblings
        allowed = (*PUBLIC, own)
        if own == "bilevel.plugins.worlds":
            allowed += ("bilevel.worlds",)  # a world plugin wraps its world's implementation
        bad = sorted(m for m in bilevel_imports(path) if not under(m, allowed) and m != "bilevel")
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    for path in (ROOT / "examples").rglob("*.py"):
        bad = sorted(m for m in bilevel_imports(path) if m not in ("bilevel", "bilevel.toolkit"))
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, offenders


def test_public_names_resolve() -> None:
    for name in bilevel.__all__:
        assert getattr(bilevel, name) is not None, name
    assert set(bilevel.toolkit.__all__) >= {"add_noise", "get_velocity", "noised", "gradient_step",
                                            "prune_unet_channels", "generate_or_load", "PromptMapping"}  # fmt: skip
    with pytest.raises(AttributeError):
        _ = bilevel.no_such_name


@pytest.fixture()
def in_process(monkeypatch):
    from bilevel.registry import manager

    monkeypatch.setattr(manager, "_IN_PROCESS", [])
    monkeypatch.setattr(manager, "_REGISTRY", None)
    return manager


def test_in_process_registration_is_used_by_a_run(in_process, tmp_path, capsys) -> None:
    from bilevel.plugins.unlearners.esd import ESD

    calls = {"loss": 0}

    @bilevel.register
    class NotebookESD(ESD):
        """What a notebook cell would define: a variant of a built-in, registered without packaging."""

        name = "notebook-esd"
        api_version = bilevel.PLUGIN_API_VERSION

        def loss(self, ctx, batch):
            calls["loss"] += 1
            return super().loss(ctx, batch)

    from bilevel.registry import get_registry

    assert get_registry().get("unlearner", "notebook-esd").source == "in-process"
    out = tmp_path / "run"
    code = main(["run", "--unlearner", "notebook-esd", "--arms", "bilevel", "--steps", "4", "--out", str(out),
                 "--set", "training.batch_size=4", "--set", "training.upper_batch_size=2",
                 "--set", "solver.options.upper_every=1", "--set", "unlearner.options.pool_size=2",
                 "--set", "unlearner.options.sample_steps=2", "--set", "evaluation.samples_per_prompt=2",
                 "--set", "evaluation.steps=2", "--set", "evaluation.latency_repeats=1"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert calls["loss"] == 4  # one upper step per outer step
    assert json.loads((out / "config.json").read_text())["unlearner"]["name"] == "notebook-esd"


def test_registering_something_that_is_not_a_plugin_is_one_line(in_process) -> None:
    from bilevel.core.errors import BilevelError

    with pytest.raises(BilevelError, match="is not a plugin class"):
        bilevel.register(dict)

    class NoVersion(bilevel.Unlearner):
        name = "no-version"

        def draw(self, ctx, batch_size, generator):
            return None

        def loss(self, ctx, batch):
            return None

    with pytest.raises(BilevelError, match="declares no api_version"):
        bilevel.register(NoVersion)
