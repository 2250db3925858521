"""The training loop shared by every arm: a solver's outer steps with progress, history and finiteness checks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from .errors import NonFiniteLossError
from .interfaces import BilevelProblem, BilevelSolver
from .progress import console, log_console, progress_bar


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant lr after a linear warmup (the paper's schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))


def run_solver(
    problem: BilevelProblem,
    solver: BilevelSolver,
    steps: int,
    *,
    description: str,
    log_every: int = 50,
    start: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run outer steps [start, steps); returns logged metrics (means over each log window)."""
    history: list[dict[str, Any]] = []
    window: dict[str, list[float]] = {}
    upper_updates = 0
    t0 = time.perf_counter()
    with progress_bar(description, total=steps, completed=start) as advance:
        for step in range(start, steps):
            metrics = solver.step(problem, step)
            upper_updates += "upper_loss" in metrics
            for k, v in metrics.items():
                if not math.isfinite(v):
                    raise NonFiniteLossError(
                        f"{k} became {v} at step {step} of {description}; lower the learning rates (last good state kept)"
                    )
                window.setdefault(k, []).append(v)
            advance(1, **{k: v for k, v in metrics.items() if k.endswith("loss")})
            if (step + 1) % log_every == 0 or step + 1 == steps:
                history.append(
                    {"step": step + 1, "seconds": time.perf_counter() - t0, "upper_updates": upper_updates}
                    | {k: sum(v) / len(v) for k, v in window.items()}
                )
                window = {}
                if not console.is_terminal:  # logs and CI: a line per window instead of a live bar
                    shown = " ".join(f"{k}={v:.4g}" for k, v in history[-1].items() if k != "step")
                    log_console.print(f"{description}: step {step + 1}/{steps} {shown}")
            if on_step is not None:
                on_step(step + 1)
    return history
