"""A small pool of worker processes for independent pieces of one job (a run's arms, an ablation grid's cells).

Why processes: on the tiny world's small convolutions two OpenMP threads do not keep two cores busy, so two
one-thread processes finish two pieces of work sooner than one two-thread process runs them in turn (measured:
the default run's KD arm took 215 s at 2 threads alone and 151 s at 1 thread beside the bilevel arm).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from bilevel.core.errors import BilevelError

Echo = Callable[[str], None]
PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_ENV = "BILEVEL_WORKER_PARENT"
#: A worker runs `python -c _LAUNCH MODULE ARGS...`: bind to the parent, then run MODULE as __main__ with ARGS.
_LAUNCH = (
    "import runpy, sys; from bilevel.runtime.workers import bind_to_parent; bind_to_parent(); "
    "module = sys.argv.pop(1); runpy.run_module(module, run_name='__main__', alter_sys=True)"
)
#: Sets what "auto" means for every worker pool (tests set 1: a worker's start-up outweighs a 10-step test arm).
WORKERS_ENV = "BILEVEL_WORKERS"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """Each worker's equal share of the cores (its OMP_NUM_THREADS)."""
    return max(1, usable_cores() // max(1, workers))


def process_count(value: int | str, what: str) -> int:
    """A number of worker processes given as text or int, checked (>= 1); `what` names where it came from."""
    try:
        count = int(value)
    except ValueError:
        raise BilevelError(f"{what} takes a number of processes or 'auto', got {value!r}") from None
    if count < 1:
        raise BilevelError(f"{what} must be at least 1, got {count}")
    return count


def workers_from_env() -> int | None:
    """$BILEVEL_WORKERS as a number, None when unset or 'auto'."""
    value = os.environ.get(WORKERS_ENV, "auto").strip()
    return None if value in ("", "auto") else process_count(value, WORKERS_ENV)


def worker_main(args: list[str], usage: str, work: Callable[[Path, str], None]) -> int:
    """The entry point of a worker module: `work(FOLDER, NAME)`, a BilevelError as one line and exit code 2."""
    if len(args) != 2:
        print(f"usage: {usage}", file=sys.stderr)
        return 2
    try:
        work(Path(args[0]), args[1])
    except BilevelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


@dataclass(frozen=True)
class Job:
    """One worker: `python -m <module> <args>`, its output kept in log_path. after: the job that must have
    succeeded first (else this one is skipped)."""

    name: str
    module: str
    args: tuple[str, ...]
    log_path: Path
    after: str | None = None


@dataclass
class _Running:
    job: Job
    process: subprocess.Popen
    relay: threading.Thread
    started: float


def run_jobs(
    jobs: list[Job], slots: int, echo: Echo, on_finish: Callable[[Job, int | None, float], None],
    env: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """Run `jobs`, `slots` at a time, each with an equal share of the cores, in list order as far as `after`
    allows. Each job's lines are echoed prefixed with its name. on_finish(job, returncode, seconds) is called as
    each ends (returncode None: skipped because its `after` failed); if it raises, the running jobs are stopped
    and the error propagates (so one failure can stop the rest, or be recorded and let the rest go on)."""
    threads = threads_per_worker(slots)
    outcome: dict[str, int | None] = {}
    waiting, running = list(jobs), []
    try:
        while waiting or running:
            for job in list(waiting):
                if len(running) >= slots:
                    break
                if job.after is not None and job.after not in outcome:
                    continue  # its prerequisite is still waiting or running
                waiting.remove(job)
                if job.after is not None and outcome[job.after] != 0:
                    outcome[job.name] = None
                    on_finish(job, None, 0.0)
                    continue
                running.append(_start(job, threads, echo, env or {}))
            if running and not any(r.process.poll() is not None for r in running):
                time.sleep(0.2)
            for r in [r for r in running if r.process.poll() is not None]:
                running.remove(r)
                r.relay.join()
                outcome[r.job.name] = r.process.returncode
                on_finish(r.job, r.process.returncode, time.perf_counter() - r.started)
    finally:
        for r in running:  # an error or Ctrl-C: no orphaned worker keeps training
            r.process.terminate()
        for r in running:
            r.process.wait()
            r.relay.join()


def last_line(log_path: Path) -> str:
    """The last non-empty line a worker wrote (its one-line error when it failed)."""
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()] if log_path.exists() else []
    return lines[-1].strip() if lines else "no output"


def _start(job: Job, threads: int, echo: Echo, extra_env: dict[str, str]) -> _Running:
    env = {
        **os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "PYTHONUNBUFFERED": "1", **extra_env,
    }  # fmt: skip
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, job.module, *job.args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**env, PARENT_ENV: str(os.getpid())},
        text=True, bufsize=1,
    )  # fmt: skip
    relay = threading.Thread(target=_relay, args=(process.stdout, job.log_path, job.name, echo), daemon=True)
    relay.start()
    return _Running(job, process, relay, time.perf_counter())


def bind_to_parent() -> None:
    """In a worker, first thing: ask Linux to end it when the parent dies, however the parent dies (a SIGKILL or
    SIGTERM skips the parent's own clean-up), so no orphaned worker keeps writing into the run; and end at once if
    the parent is already gone."""
    parent = os.environ.get(PARENT_ENV)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # pragma: no cover - not glibc: the parent's clean-up still covers errors
            pass
    if parent is not None and os.getppid() != int(parent):
        sys.exit(1)  # the parent died before the request above took effect


def _relay(stream: IO[str], log_path: Path, name: str, echo: Echo) -> None:
    with log_path.open("w") as log:
        for line in stream:
            log.write(line)
            log.flush()
            if line.strip():
                echo(f"[{name}] {line.rstrip()}")
