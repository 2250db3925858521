"""The baselines' one-level "solvers": lower-level steps only (DDPM-only, KD-only) and upper-level steps only (the
two-stage baseline's erase stage). They implement the solver interface, so checkpoints and the training loop treat
them like any solver; they are not registered."""

from __future__ import annotations

from bilevel.core.interfaces import BilevelProblem, BilevelSolver
from bilevel.optim.steps import lower_step, upper_step


class LowerOnly(BilevelSolver):
    """The baselines' solver (DDPM-only or KD-only fine-tuning): lower-level steps only. Not registered."""

    name = "lower-only"
    description = "Lower-level steps only."
    api_version = 2

    def step(self, problem: BilevelProblem, step: int) -> dict[str, float]:
        return {"lower_loss": lower_step(problem)}


class UpperOnly(BilevelSolver):
    """The two-stage baseline's erase stage: upper-level (unlearning) steps only. Not registered."""

    name = "upper-only"
    description = "Upper-level steps only."
    api_version = 2

    def step(self, problem: BilevelProblem, step: int) -> dict[str, float]:
        return {"upper_loss": upper_step(problem)}
