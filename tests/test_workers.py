"""The worker pool behind side-by-side arms and cells: order, prerequisites, failures and logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bilevel.core.errors import BilevelError
from bilevel.runtime.workers import Job, last_line, run_jobs, workers_from_env


def test_jobs_run_after_their_prerequisite_and_a_failure_skips_its_dependents(tmp_path: Path) -> None:
    jobs = [
        Job("broken", "json.tool", (str(tmp_path / "missing.json"),), tmp_path / "broken.log"),
        Job("after-broken", "platform", (), tmp_path / "after-broken.log", after="broken"),
        Job("fine", "platform", (), tmp_path / "fine.log"),
        Job("after-fine", "platform", (), tmp_path / "after-fine.log", after="fine"),
    ]
    finished, echoed = [], []
    run_jobs(jobs, 2, echoed.append, lambda job, rc, s: finished.append((job.name, rc)))
    outcome = dict(finished)
    assert outcome["broken"] != 0 and outcome["after-broken"] is None  # skipped, never started
    assert outcome["fine"] == 0 and outcome["after-fine"] == 0
    assert [n for n, _ in finished].index("fine") < [n for n, _ in finished].index("after-fine")
    assert not (tmp_path / "after-broken.log").exists()
    assert "missing.json" in last_line(tmp_path / "broken.log")
    assert any(line.startswith("[fine] ") for line in echoed)  # every line names its job


def test_an_error_in_on_finish_stops_the_running_jobs(tmp_path: Path) -> None:
    slow = Job("slow", "timeit", ("-n", "1", "import time; time.sleep(30)"), tmp_path / "slow.log")
    quick = Job("quick", "json.tool", (str(tmp_path / "missing.json"),), tmp_path / "quick.log")

    def stop(job: Job, rc: int | None, seconds: float) -> None:
        if rc != 0:
            raise BilevelError(f"{job.name} failed")

    with pytest.raises(BilevelError, match="quick failed"):
        run_jobs([slow, quick], 2, lambda line: None, stop)  # returns in about a second, not 30


def test_workers_env_is_checked(monkeypatch) -> None:
    monkeypatch.setenv("BILEVEL_WORKERS", "3")
    assert workers_from_env() == 3
    monkeypatch.setenv("BILEVEL_WORKERS", "auto")
    assert workers_from_env() is None
    monkeypatch.setenv("BILEVEL_WORKERS", "0")
    with pytest.raises(BilevelError, match="at least 1"):
        workers_from_env()


def test_workers_end_when_their_parent_is_killed(tmp_path: Path) -> None:
    """A SIGKILLed parent cannot clean up; its workers must not live on as orphans writing into the run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    marker = f"orphan-check-{os.getpid()}-{time.time_ns()}"
    script = (
        "from pathlib import Path; from bilevel.runtime.workers import Job, run_jobs; "
        f"run_jobs([Job('sleeper', 'timeit', ('-n', '1', 'import time; time.sleep(60)  # {marker}'), "
        f"Path({str(tmp_path / 'sleeper.log')!r}))], 1, print, lambda *a: None)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])

    def workers() -> list[str]:
        found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, check=False).stdout.split()
        return [pid for pid in found if int(pid) != parent.pid]

    deadline = time.monotonic() + 30
    while not workers():
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.1)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while workers():
        assert time.monotonic() < deadline, "the worker outlived its killed parent"
        time.sleep(0.1)
