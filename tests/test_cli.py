"""The CLI: bad input is one line on stderr with exit code 2 and nothing is written over."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bilevel.cli import main


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["run", "--pruner", "magnitud"], "did you mean 'magnitude'"),
        (["run", "--unlearner", "nope"], "available: "),
        (["run", "--steps", "0"], "training.steps"),
        (["run", "--concept", "mauve"], "unknown concept 'mauve'"),
        (["run", "--concept", ""], "empty concept"),
        (["run", "--set", "pruner.options.ratio=2"], "ratio"),
        (["run", "--set", "training.nonsense=1"], "training.nonsense"),
        (["run", "--model", "/nonexistent/model"], "not found"),
        (["run", "--bogus-flag"], "unrecognized arguments"),
        (["run", "--compile", "--solver", "implicit-gradient"], "double backward"),
        (["run", "--set", "model.compile_backend=nope"], "unknown torch.compile backend 'nope'; accepted: "),
        (["plugins", "--schema", "nope"], "unknown plugin 'nope'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragment, capsys, tmp_path):
    code, _, err = run_cli([*args, "--out", str(tmp_path / "o")] if args[0] == "run" else args, capsys)
    assert code == 2
    assert fragment in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "o" / "config.json").exists()


def test_output_folder_of_another_run_is_refused(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, _, err = run_cli(["run", "--out", str(out)], capsys)
    assert code == 2 and "holds another run" in err and "--overwrite" in err
    assert (out / "config.json").read_text() == "{}"


def test_corrupt_teacher_weights_are_one_line(capsys, tmp_path):
    import shutil

    from bilevel.worlds.models import TINY_TEACHER

    bad = tmp_path / "teacher"
    shutil.copytree(TINY_TEACHER, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    code, _, err = run_cli(["eval", str(bad), "--samples", "1", "--steps", "1"], capsys)
    assert code == 2 and "cannot load pipeline" in err and err.count("\n") == 1


def test_plugins_json_and_schema(capsys):
    code, out, _ = run_cli(["plugins", "--json"], capsys)
    listing = json.loads(out)
    names = {(p["kind"], p["name"]) for p in listing["plugins"]}
    assert {("pruner", "magnitude"), ("unlearner", "esd"), ("solver", "alternating")} <= names
    code, out, _ = run_cli(["plugins", "--schema", "esd"], capsys)
    schema = json.loads(out)
    assert code == 0 and "eta" in schema["properties"] and schema["additionalProperties"] is False


def test_console_script_help_is_fast_and_lazy():
    """--help must not import torch (keeps the CLI snappy)."""
    code = "import sys; from bilevel.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
