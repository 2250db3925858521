"""The training loop shared by every arm: a solver's outer steps with progress, history and finiteness checks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from bilevel.core.errors import NonFiniteLossError
from bilevel.core.interfaces import BilevelProblem, BilevelSolver
from bilevel.runtime.distributed import mean_metrics
from bilevel.runtime.progress import console, log_console, progress_bar


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant lr after a linear warmup (the paper's schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))


@dataclass
class TrainState:
    """The loop's own progress, checkpointed with the model so a resumed run logs exactly what an unbroken one does.

    window: metrics of the current (not yet logged) log window; seconds: training wall time before this session;
    cpu_seconds: this process's CPU time spent training (all its threads), which, unlike wall time, other jobs on a
    shared machine do not inflate: the cost figure to compare arms by on a CPU (on a GPU it counts host time only).
    """

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    window: dict[str, list[float]] = field(default_factory=dict)
    upper_updates: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "history": self.history,
            "window": self.window,
            "upper_updates": self.upper_updates,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        return cls(
            step=int(data["step"]),
            history=list(data.get("history", [])),
            window={k: [float(x) for x in v] for k, v in data.get("window", {}).items()},
            upper_updates=int(data.get("upper_updates", 0)),
            seconds=float(data.get("seconds", 0.0)),
            cpu_seconds=float(data.get("cpu_seconds", 0.0)),
        )


@dataclass(frozen=True)
class TrainCost:
    """What training an arm cost: wall seconds and this process's CPU seconds. Two-stage arms add their KD
    student's cost to their own, so every arm's figure covers its whole path from the pruned student."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def __add__(self, other: TrainCost) -> TrainCost:
        return TrainCost(self.seconds + other.seconds, self.cpu_seconds + other.cpu_seconds)

    @classmethod
    def of(cls, state: TrainState) -> TrainCost:
        return cls(state.seconds, state.cpu_seconds)

    def row(self) -> dict[str, float]:
        """The result-row fields (`train_seconds`, `train_cpu_seconds`)."""
        return {"train_seconds": self.seconds, "train_cpu_seconds": self.cpu_seconds}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TrainCost:
        """From a saved result row (rows written before CPU time was recorded read 0 CPU seconds)."""
        return cls(float(row.get("train_seconds", 0.0)), float(row.get("train_cpu_seconds", 0.0)))


def run_solver(
    problem: BilevelProblem,
    solver: BilevelSolver,
    steps: int,
    *,
    description: str,
    log_every: int = 50,
    state: TrainState | None = None,
    on_step: Callable[[TrainState], None] | None = None,
) -> list[dict[str, Any]]:
    """Run outer steps [state.step, steps); returns logged metrics (means over each log window).

    `state` (updated in place) resumes a checkpointed run; `on_step` sees it after every finite step, never after
    a non-finite one, so a checkpoint written there is always a good one.
    """
    state = state if state is not None else TrainState()
    t0 = time.perf_counter() - state.seconds
    c0 = time.process_time() - state.cpu_seconds
    with progress_bar(description, total=steps, completed=state.step) as advance:
        for step in range(state.step, steps):
            metrics = mean_metrics(solver.step(problem, step))  # the global batch's (one process: unchanged)
            for k, v in metrics.items():
                if not math.isfinite(v):
                    raise NonFiniteLossError(
                        f"{k} became {v} at step {step + 1}/{steps} of {description}; lower the learning rates"
                    )
            state.upper_updates += "upper_loss" in metrics
            for k, v in metrics.items():
                state.window.setdefault(k, []).append(v)
            state.step, state.seconds = step + 1, time.perf_counter() - t0
            state.cpu_seconds = time.process_time() - c0
            advance(1, **{k: v for k, v in metrics.items() if k.endswith("loss")})
            if (step + 1) % log_every == 0 or step + 1 == steps:
                _log_window(state, steps, description)
            if on_step is not None:  # checkpoints and curve evaluations are not training time
                hook_start, hook_cpu = time.perf_counter(), time.process_time()
                on_step(state)
                t0 += time.perf_counter() - hook_start
                c0 += time.process_time() - hook_cpu
    return state.history


def _log_window(state: TrainState, steps: int, description: str) -> None:
    """Close the current log window into the history (and a log line when not on a terminal)."""
    state.history.append(
        {"step": state.step, "seconds": state.seconds, "upper_updates": state.upper_updates}
        | {k: sum(v) / len(v) for k, v in state.window.items()}
    )
    state.window = {}
    if not console.is_terminal:  # logs and CI: a line per window instead of a live bar
        shown = " ".join(f"{k}={v:.4g}" for k, v in state.history[-1].items() if k != "step")
        log_console.print(f"{description}: step {state.step}/{steps} {shown}")
