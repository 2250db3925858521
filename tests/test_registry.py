"""The plugin registry: built-ins through entry points, third-party discovery, isolation of broken plugins."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from bilevel.core.errors import BilevelError
from bilevel.registry import build_registry


def make_distribution(root: Path, dist: str, module: str, source: str, entry: str | None = None) -> None:
    """A real installed distribution on sys.path: dist-info with an entry point in the `bilevel` group."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[bilevel]\n{entry or dist} = {module}\n")


GOOD_PLUGIN = """
    from pydantic import ConfigDict
    from bilevel.core.interfaces import PluginConfig, Unlearner
    from bilevel.registry import hookimpl

    class NoiseConfig(PluginConfig):
        scale: float = 1.0

    class NoiseUnlearner(Unlearner):
        name = "noise-test"
        Config = NoiseConfig
        api_version = 2

        def draw(self, ctx, batch_size, generator):
            raise NotImplementedError

        def loss(self, ctx, batch):
            raise NotImplementedError

    @hookimpl
    def register_unlearners(register):
        register(NoiseUnlearner)
"""


@pytest.fixture()
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("fakeplug_")]:
        del sys.modules[name]


def test_builtins_are_registered_through_entry_points():
    reg = build_registry()
    assert "magnitude" in reg.names("pruner")
    assert "esd" in reg.names("unlearner")
    assert "alternating" in reg.names("solver")
    assert reg.get("pruner", "magnitude").source == "bilevel"


def test_third_party_entry_point_is_discovered(site):
    make_distribution(site, "fake-bilevel-plugin", "fakeplug_good", GOOD_PLUGIN)
    reg = build_registry()
    info = reg.get("unlearner", "noise-test")
    assert info.source == "fake-bilevel-plugin" and info.version == "0.3"
    plugin = reg.create("unlearner", "noise-test", {"scale": 2.5})
    assert plugin.config.scale == 2.5


def test_broken_plugin_is_reported_and_isolated(site, monkeypatch):
    make_distribution(site, "broken-plugin", "fakeplug_broken", "raise ImportError('missing dependency xyz')\n")
    make_distribution(site, "fake-bilevel-plugin", "fakeplug_good2", GOOD_PLUGIN)
    reg = build_registry()
    assert any("broken-plugin" in f.source and "missing dependency xyz" in f.error for f in reg.failures)
    assert "noise-test" in reg.names("unlearner") and "esd" in reg.names("unlearner")
    monkeypatch.setenv("BILEVEL_STRICT_PLUGINS", "1")
    with pytest.raises(ImportError, match="xyz"):
        build_registry()


def test_plugin_failing_to_register_is_isolated(site):
    bad = """
        from bilevel.registry import hookimpl

        @hookimpl
        def register_pruners(register):
            register(object)  # not a Pruner subclass
    """
    make_distribution(site, "bad-register", "fakeplug_badreg", bad)
    reg = build_registry()
    assert any("does not subclass Pruner" in f.error for f in reg.failures)
    assert "magnitude" in reg.names("pruner")


def test_duplicate_names_are_an_error_naming_both(site):
    make_distribution(site, "plugin-one", "fakeplug_one", GOOD_PLUGIN)
    make_distribution(site, "plugin-two", "fakeplug_two", GOOD_PLUGIN)
    reg = build_registry()
    with pytest.raises(BilevelError, match=r"plugin-one.*plugin-two|plugin-two.*plugin-one"):
        reg.get("unlearner", "noise-test")


def test_unknown_name_lists_available_and_closest():
    reg = build_registry()
    with pytest.raises(BilevelError) as err:
        reg.get("pruner", "magnitud")
    msg = str(err.value)
    assert "available: " in msg and "magnitude" in msg and "did you mean 'magnitude'" in msg


def test_invalid_plugin_option_is_one_line():
    reg = build_registry()
    with pytest.raises(BilevelError) as err:
        reg.create("pruner", "magnitude", {"ratio": 1.5})
    assert "ratio" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BilevelError, match="options: target_macs, ratio"):
        reg.create("pruner", "magnitude", {"ratoi": 0.2})


def test_unknown_option_is_refused_even_if_the_plugin_config_would_ignore_it(site):
    lax = GOOD_PLUGIN.replace(
        "scale: float = 1.0", 'model_config = ConfigDict(extra="ignore")\n        scale: float = 1.0'
    )
    make_distribution(site, "lax-plugin", "fakeplug_lax", lax)
    reg = build_registry()
    assert reg.create("unlearner", "noise-test", {"scale": 3.0}).config.scale == 3.0
    with pytest.raises(BilevelError, match=r"has no option 'sacle'; options: scale"):
        reg.create("unlearner", "noise-test", {"sacle": 3.0})


def test_plugin_without_its_own_api_version_is_refused_naming_it(site):
    """api_version is never inherited from the framework's bases: a plugin must say which API it targets."""
    undeclared = GOOD_PLUGIN.replace("        api_version = 2\n", "")
    assert undeclared != GOOD_PLUGIN
    make_distribution(site, "undeclared-plugin", "fakeplug_undeclared", undeclared)
    reg = build_registry()
    assert "noise-test" not in reg.names("unlearner") and "esd" in reg.names("unlearner")
    errors = [f.error for f in reg.failures if "undeclared-plugin" in f.source]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "unlearner 'noise-test'" in errors[0] and "NoiseUnlearner" in errors[0]
    assert "declares no api_version" in errors[0] and "api_version = 2" in errors[0]


def test_plugin_for_another_api_version_is_refused(site):
    make_distribution(site, "old-plugin", "fakeplug_old", GOOD_PLUGIN.replace("api_version = 2", "api_version = 1"))
    reg = build_registry()
    assert any("targets plugin API 1, this bilevel provides 2" in f.error for f in reg.failures)
    assert "noise-test" not in reg.names("unlearner")


def test_every_builtin_plugin_declares_the_current_api_version():
    from bilevel import PLUGIN_API_VERSION

    reg = build_registry()
    assert not reg.failures
    for kind, plugins in reg.plugins.items():
        for info in plugins.values():
            assert vars(info.cls).get("api_version") == PLUGIN_API_VERSION, (kind, info.name)


def test_solver_config_must_carry_the_coupling(site):
    plugin = """
        from bilevel.core.interfaces import BilevelSolver, PluginConfig
        from bilevel.registry import hookimpl

        class Loose(PluginConfig):
            steps: int = 1

        class LooseSolver(BilevelSolver):
            name = "loose"
            Config = Loose
            api_version = 2

            def step(self, problem, step):
                return {}

        @hookimpl
        def register_solvers(register):
            register(LooseSolver)
    """
    make_distribution(site, "loose-solver", "fakeplug_loose", plugin)
    reg = build_registry()
    assert any("Config must subclass bilevel.core.interfaces.SolverConfig" in f.error for f in reg.failures)
