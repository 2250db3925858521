"""Run a run's independent arms side by side, one worker process each, on a CPU with more than one core.

Why processes and not threads: see bilevel.runtime.workers (two 1-thread processes beat one 2-thread process).

How: the parent has already pruned and claimed the output folder (config.json, students/pruned). Each worker is
`python -m bilevel.commands.arm_workers OUT ARM`: it continues that run as `--resume` does (the saved config, the
saved pruned student, the arm's own checkpoint), trains and evaluates its one arm and leaves `rows/<arm>.json`.
The parent then picks the rows up like a resumed run and runs what depends on them (two-stage arms, the report).
So a parallel run is resumable in the same way, and each arm is the same computation as in a sequential run at
the same thread count (tested bit for bit).
"""

from __future__ import annotations

import sys
from pathlib import Path

from bilevel.core.errors import BilevelError
from bilevel.runtime.workers import (
    Echo,
    Job,
    last_line,
    run_jobs,
    threads_per_worker,
    usable_cores,
    worker_main,
    workers_from_env,
)

#: Arms that need nothing but the pruned student (two-stage arms need the kd student and bilevel's update count).
INDEPENDENT_ARMS = ("bilevel", "kd", "ddpm", "teacher", "pruned")  # longest first: the last to start are short
TRAINED_ARMS = ("bilevel", "kd", "ddpm")


def worker_count(setting: int | str, device: str, arms: list[str], data_parallel: bool) -> int:
    """How many arms run at once: an explicit number (capped by the arms there are), or for "auto" one per core
    on a CPU when at least two trained arms can go side by side, else 1 (GPUs and data-parallel runs: in turn)."""
    side_by_side = [a for a in arms if a in INDEPENDENT_ARMS]
    if data_parallel or len(side_by_side) < 2:
        return 1
    if setting == "auto":
        setting = workers_from_env()
    if setting == "auto" or setting is None:
        if not device.startswith("cpu") or sum(a in TRAINED_ARMS for a in side_by_side) < 2:
            return 1
        setting = usable_cores()
    return max(1, min(int(setting), len(side_by_side)))


def run_side_by_side(out: Path, arms: list[str], workers: int, echo: Echo) -> None:
    """Run `arms` (a subset of INDEPENDENT_ARMS) in `workers` processes at a time, each with an equal share of the
    cores; their log lines are echoed prefixed with the arm and kept in <out>/logs/<arm>.log. A failed arm stops
    the others and raises (the finished arms' rows stay, so `bilevel run --resume` continues from there)."""
    order = sorted(arms, key=INDEPENDENT_ARMS.index)
    threads = threads_per_worker(workers)
    echo(f"arms {', '.join(order)}: {workers} at a time, one process each with {threads} thread(s); logs in {out / 'logs'}")
    jobs = [Job(arm, "bilevel.commands.arm_workers", (str(out), arm), out / "logs" / f"{arm}.log") for arm in order]

    def stop_on_failure(job: Job, returncode: int | None, seconds: float) -> None:
        if returncode != 0:
            raise BilevelError(f"arm {job.name} failed: {last_line(job.log_path)} (full log: {job.log_path})")

    run_jobs(jobs, workers, echo, stop_on_failure)


def run_one_arm(out: Path, arm: str) -> None:
    """The worker: continue the run in `out` with this one arm (as `--resume` would) and leave its row."""
    from bilevel.commands.run import Run, arms_of, load_saved_config

    if arm not in INDEPENDENT_ARMS:
        raise BilevelError(f"arm {arm!r} cannot run on its own; accepted: {', '.join(INDEPENDENT_ARMS)}")
    config = load_saved_config(out)
    config = config.model_copy(update={"arms": [arm], "robustness": config.robustness.model_copy(update={"enabled": False})})
    run = Run.start(config, resume=True, announce=False)
    (only,) = arms_of(config)
    if not run.skip(only.label):
        only.run(run)


def main(argv: list[str] | None = None) -> int:
    usage = f"python -m bilevel.commands.arm_workers OUT ARM (ARM one of {', '.join(INDEPENDENT_ARMS)})"
    return worker_main(sys.argv[1:] if argv is None else argv, usage, run_one_arm)


if __name__ == "__main__":  # pragma: no cover - run as a worker process
    sys.exit(main())
