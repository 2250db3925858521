"""Data-parallel `bilevel run` over two CPU processes (gloo), launched the way users launch it.

Launcher: `accelerate launch --multi_gpu --num_processes 2 ...` (`--cpu` would silently start ONE process);
the collective unit test uses torchrun, which starts faster. Ports are picked free so parallel runs do not clash.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bilevel.runtime import distributed

ARGS = [
    "--arms", "kd,bilevel", "--steps", "4",
    "--set", "training.batch_size=8", "--set", "training.upper_batch_size=8",
    "--set", "evaluation.samples_per_prompt=2", "--set", "evaluation.steps=3", "--set", "evaluation.latency_repeats=1",
    "--set", "unlearner.options.pool_size=16", "--set", "data.finetune_size=256", "--set", "data.concept_size=32",
]  # fmt: skip
TABLE_TITLE = "concept(s) purple"


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "bilevel", "run", *args,
    ]  # fmt: skip


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as sink:  # a file, not a pipe: an unread pipe could stall the child
        return subprocess.Popen(cmd, env=_env(), stdout=sink, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path) -> str:
    rc = proc.wait(timeout=300)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    return text


def _student(out: Path, arm: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / "students" / arm / "model.safetensors"))


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5)


def _rows(out: Path) -> dict[str, dict]:
    return {r["model"]: r for r in json.loads((out / "metrics.json").read_text())["rows"]}


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def test_one_process_helpers_are_the_identity() -> None:
    assert not distributed.processes().multi and distributed.processes().is_main
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, -2.0, 3.5])
    before = p.grad.clone()
    distributed.average_gradients([p])
    assert torch.equal(p.grad, before)
    assert distributed.mean_metrics({"lower_loss": 0.25}) == {"lower_loss": 0.25}
    assert distributed.shard(7, "training.batch_size") is None
    assert distributed.on_main(lambda: 42) == 42
    assert distributed.check_in_sync(torch.nn.Linear(2, 2), "x") is None


COLLECTIVES = textwrap.dedent(
    """
    import sys

    import torch
    from bilevel.runtime import distributed as d
    from bilevel.core.errors import BilevelError

    d.BUCKET = 3  # a and b land in different buckets
    p = d.processes()
    a, b, c = (torch.nn.Parameter(torch.zeros(s)) for s in ((3,), (2, 2), (1,)))
    a.grad = torch.full((3,), float(p.rank + 1))
    b.grad = torch.arange(4.0).view(2, 2) * (p.rank + 1)
    d.average_gradients([a, b, c])  # c has no gradient: left alone
    m = d.mean_metrics({"loss": float(p.rank)})
    s = d.shard(8, "training.batch_size")
    try:
        d.shard(7, "training.batch_size")
        odd = "accepted"
    except BilevelError as exc:
        odd = str(exc)
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(p.rank)
    try:
        d.check_in_sync(model, "test arm")
        diverged = "passed"
    except BilevelError as exc:
        diverged = str(exc)
    d.broadcast_module(model)
    fields = [p.rank, p.world_size, a.grad.tolist(), b.grad.flatten().tolist(), c.grad, m["loss"], s.start, s.stop,
              repr(odd), repr(diverged), d.check_in_sync(model, "after broadcast") is not None]
    # one file per rank: two processes printing to one pipe interleave their lines
    with open(f"{sys.argv[1]}/result-{p.rank}.txt", "w") as f:
        f.write("RESULT " + " ".join(map(str, fields)))
    """
)


def test_two_processes_average_gradients_to_their_mean(tmp_path: Path) -> None:
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(script), str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = sorted(f.read_text().split(" ", 2)[1:] for f in tmp_path.glob("result-*.txt"))
    assert [rank for rank, _ in lines] == ["0", "1"]
    for rank, rest in lines:
        assert rest.startswith("2 [1.5, 1.5, 1.5] [0.0, 1.5, 3.0, 4.5] None 0.5 "), rest
        assert (f"{4 * int(rank)} {4 * int(rank) + 4} " in rest) and "does not split over 2 processes" in rest
        assert "test arm: the 2 processes' weights diverged (ranks [1] differ from rank 0)" in rest
        assert rest.endswith("True")  # after broadcast_module the replicas agree


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, str]:
    """The same tiny config run in one process and data-parallel in two (at the same time: 2 cores)."""
    tmp = tmp_path_factory.mktemp("mp")
    one, two = tmp / "one", tmp / "two"
    single = _start([sys.executable, "-m", "bilevel", "run", *ARGS, "--out", str(one)], tmp / "one.log")
    parallel = _start(_accelerate([*ARGS, "--out", str(two)]), tmp / "two.log")
    _finish(single, tmp / "one.log")
    return one, two, _finish(parallel, tmp / "two.log")


def test_rank_zero_alone_writes_and_prints(runs) -> None:
    one, two, log = runs
    assert log.count(TABLE_TITLE) == 1 and log.count("bilevel run ->") == 1
    assert log.count("data-parallel over 2 processes") == 1
    assert log.count("kd fine-tuning: step 4/4") == 1
    assert _files(two) == _files(one)  # the same outputs, none duplicated or rank-suffixed
    rows, single_rows = _rows(two), _rows(one)
    for arm in ("kd", "bilevel"):
        assert rows[arm]["world_size"] == 2 and rows[arm]["in_sync"] is True
        assert single_rows[arm]["world_size"] == 1 and "in_sync" not in single_rows[arm]


def test_both_processes_contribute_to_every_step(runs) -> None:
    one, two, _ = runs
    start = _student(one, "pruned")
    # KD: each process takes half of the same global batch and the gradients are averaged, so two processes train
    # the student one process does (up to float rounding). Without rank 1's half the gap would be of the order of
    # the training itself.
    moved = _distance(_student(one, "kd"), start)
    assert moved > 0.05
    assert _distance(_student(two, "kd"), _student(one, "kd")) < 1e-4 * moved
    single_loss = json.loads((one / "metrics.json").read_text())["histories"]["kd"][-1]["lower_loss"]
    parallel_loss = json.loads((two / "metrics.json").read_text())["histories"]["kd"][-1]["lower_loss"]
    assert parallel_loss == pytest.approx(single_loss, rel=1e-5)  # logged: the mean over both halves
    # Bilevel: each process samples its own share of the upper batch, so the student differs from one process's.
    assert _distance(_student(two, "bilevel"), _student(one, "bilevel")) > 1e-4 * moved


def test_every_process_resumes_from_rank_zeros_checkpoint(runs, tmp_path: Path) -> None:
    _, two, _ = runs
    again = tmp_path / "again"
    shutil.copytree(two, again)
    for path in ("rows/bilevel.json", "rows/bilevel.images.safetensors", "DONE", "metrics.json"):
        (again / path).unlink()
    shutil.rmtree(again / "students" / "bilevel")
    proc = _start(_accelerate(["--resume", "--out", str(again)]), tmp_path / "resume.log")
    log = _finish(proc, tmp_path / "resume.log")
    assert log.count("bilevel: resuming from step 4/4") == 1 and log.count("kd: finished before") == 1
    # rank 1 must have loaded the checkpoint too, or the end-of-arm sync check would have failed
    assert _rows(again)["bilevel"]["in_sync"] is True
    a, b = _student(two, "bilevel"), _student(again, "bilevel")
    assert all(torch.equal(a[k], b[k]) for k in a)
