"""Runs that prune the same teacher the same way share one pruned student (config.cache_dir): the second run
prunes nothing, and what it trains from it is bit-identical to training from a fresh pruning."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from bilevel.commands.run import run
from bilevel.core.config import build_config
from bilevel.plugins.pruners.magnitude import MagnitudePruner


def _config(out: Path, cache: Path | None, **pruner_options) -> object:
    return build_config({
        "pruner": {"name": "magnitude", "options": {"ratio": 0.3, **pruner_options}},
        "arms": ["pruned", "kd"],
        "training": {"steps": 4, "batch_size": 4},
        "evaluation": {"samples_per_prompt": 1, "concept_samples": 1, "steps": 2, "latency_repeats": 1, "secondary": False},
        "data": {"finetune_size": 64, "concept_size": 8},
        "output": {"dir": str(out)},
        "cache_dir": str(cache) if cache else None,
    })  # fmt: skip


def _weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


@pytest.mark.slow  # about 25 s: two runs: the separate CI step
def test_a_cached_pruning_is_reused_and_trains_identically(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    run(_config(tmp_path / "first", cache))
    assert len(list((cache / "pruned").iterdir())) == 1

    def no_pruning(*_a, **_k):
        raise AssertionError("pruned again although the same pruning is cached")

    monkeypatch.setattr(MagnitudePruner, "prune", no_pruning)
    run(_config(tmp_path / "second", cache))
    for arm in ("pruned", "kd"):
        a, b = _weights(tmp_path / "first" / "students" / arm), _weights(tmp_path / "second" / "students" / arm)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), arm
    assert not [p for p in (tmp_path / "first").rglob("*") if p.name == "cache"]  # only where cache_dir points


@pytest.mark.parametrize("field", ["pruner", "options", "teacher"])
def test_the_fingerprint_sees_what_pruning_reads(field: str) -> None:
    import torch

    from bilevel.compression.pruned_cache import pruning_fingerprint

    teacher = torch.nn.Linear(3, 2)
    base = pruning_fingerprint("magnitude", {"ratio": 0.3}, teacher, None)
    assert base == pruning_fingerprint("magnitude", {"ratio": 0.3}, teacher, None)
    if field == "pruner":
        assert base != pruning_fingerprint("diff-pruning", {"ratio": 0.3}, teacher, None)
    elif field == "options":
        assert base != pruning_fingerprint("magnitude", {"ratio": 0.2}, teacher, None)
    else:
        with torch.no_grad():
            teacher.weight[0, 0] += 1e-6
        assert base != pruning_fingerprint("magnitude", {"ratio": 0.3}, teacher, None)
