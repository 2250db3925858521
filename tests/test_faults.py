"""Faults through `bilevel run`: a non-finite loss stops with one line and keeps the last good checkpoint; bad
teachers, configs and pruner/architecture mismatches are one line with exit code 2 and write nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bilevel import CONFIG_VERSION
from bilevel.cli import main
from bilevel.runtime.io import load_tensors
from bilevel.worlds.models import TINY_TEACHER

SMALL = [
    "--arms", "bilevel", "--set", "evaluation.samples_per_prompt=2", "--set", "evaluation.steps=3",
    "--set", "unlearner.options.pool_size=16", "--set", "data.finetune_size=256", "--set", "data.concept_size=32",
    "--set", "training.batch_size=8",
]  # fmt: skip
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


def one_line_error(args: list[str], capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    args = ["run", *SMALL, "--steps", "10", "--out", str(out), "--set", "training.checkpoint_every=1",
            "--set", "training.lower_lr=1e30", "--set", "training.warmup=0"]  # fmt: skip
    err = one_line_error(args, capsys)
    assert "became nan" in err or "became inf" in err
    assert "lower the learning rates" in err and "last good checkpoint kept" in err
    ckpt = out / "checkpoints" / "bilevel"
    state = json.loads((ckpt / "state.json").read_text())
    assert f"(step {state['step']})" in err and f"at step {state['step'] + 1}/10" in err  # nothing after the bad step
    weights = load_tensors(ckpt / state["folder"] / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    optim = torch.load(ckpt / state["folder"] / "optim.pt", weights_only=True)
    assert optim["lower_scheduler"]["last_epoch"] == state["step"]
    assert not (out / "students" / "bilevel").exists() and not (out / "DONE").exists()


@pytest.fixture()
def teacher_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "teacher"
    shutil.copytree(TINY_TEACHER, folder)
    return folder


def test_missing_teacher_weights_through_run(teacher_copy: Path, tmp_path: Path, capsys) -> None:
    (teacher_copy / UNET_WEIGHTS).unlink()
    err = one_line_error(["run", "--model", str(teacher_copy), "--out", str(tmp_path / "o")], capsys)
    assert "cannot load pipeline" in err
    assert not (tmp_path / "o").exists()


def test_corrupt_teacher_weights_through_run(teacher_copy: Path, tmp_path: Path, capsys) -> None:
    (teacher_copy / UNET_WEIGHTS).write_bytes(b"\x00garbage")
    err = one_line_error(["run", "--model", str(teacher_copy), "--out", str(tmp_path / "o")], capsys)
    assert "cannot load pipeline" in err
    assert not (tmp_path / "o").exists()


def test_config_file_from_a_newer_version(tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"version: {CONFIG_VERSION + 1}\nconcepts: [purple]\n")
    err = one_line_error(["run", "--config", str(config), "--out", str(tmp_path / "o")], capsys)
    assert "newer than this bilevel supports" in err
    assert not (tmp_path / "o").exists()


def test_pruner_that_does_not_fit_the_architecture(tmp_path: Path, capsys) -> None:
    """BK-SDM tiny drops the innermost stage, so it needs the two innermost stages equally wide."""
    from diffusers import UNet2DConditionModel

    from bilevel.worlds.tiny.architecture import build_tiny_pipeline, tiny_unet_config

    pipe = build_tiny_pipeline(0)
    pipe.register_modules(unet=UNet2DConditionModel(**tiny_unet_config((16, 32, 32, 64))))
    pipe.save_pretrained(tmp_path / "teacher", safe_serialization=True)
    args = ["run", "--model", str(tmp_path / "teacher"), "--pruner", "bk-sdm", "--set", "pruner.options.variant=tiny",
            "--set", "data.finetune_size=64", "--out", str(tmp_path / "o")]  # fmt: skip
    err = one_line_error(args, capsys)
    assert "bk-sdm tiny needs the two innermost stages to have equal widths" in err
    assert not (tmp_path / "o").exists()


def test_another_run_is_kept_and_resume_is_offered(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    (out / "checkpoints" / "bilevel").mkdir(parents=True)
    (out / "config.json").write_text('{"old": true}')
    err = one_line_error(["run", "--out", str(out)], capsys)
    assert "--resume" in err and "--overwrite" in err
    assert (out / "config.json").read_text() == '{"old": true}' and (out / "checkpoints" / "bilevel").is_dir()


def test_no_pickle_loading_in_the_package() -> None:
    """User files are read with safetensors/JSON; torch.load only with weights_only=True."""
    import re

    package = Path(__file__).resolve().parent.parent / "bilevel"
    for path in package.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bimport\s+pickle\b|\bpickle\.loads?\(|\bdill\b", text), path
        for call in re.findall(r"torch\.load\([^\n]*", text):
            assert "weights_only=True" in call, f"{path}: {call}"
