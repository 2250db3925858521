"""torch.compile for training (`model.compile`): the student and the frozen teacher are compiled in place for
the arm's training steps, so parameter names, state dicts, checkpoints and saved students are unchanged, and run
eagerly again afterwards (sampling and evaluation use many batch shapes, each a recompilation).

Why opt-in: compiling the tiny UNet costs minutes on a CPU (docs/performance.md), more than a default run's
training, and solvers that differentiate through gradients (double backward: implicit-gradient, unrolled) cannot
run through compiled graphs, so those are refused up front."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from bilevel.core.config import ModelConfig
from bilevel.core.errors import BilevelError


def check_solver_compiles(config: ModelConfig, solver: object) -> None:
    """Refuse model.compile with a solver that needs double backward, before any work is done."""
    if config.compile and getattr(solver, "second_order", False):
        raise BilevelError(
            f"model.compile does not work with solver {getattr(solver, 'name', solver)!r}: it differentiates through "
            "gradients (double backward), which compiled graphs do not support; use solver alternating or bome, "
            "or model.compile=false"
        )


@contextlib.contextmanager
def compiled_for_training(config: ModelConfig, *models: nn.Module) -> Iterator[None]:
    """Within the block, every model in `models` runs compiled (when config.compile); eager again after it. A
    model already compiled (the teacher shared by a run's arms) is left as it is."""
    if not config.compile:
        yield
        return
    mine = [m for m in dict.fromkeys(models) if getattr(m, "_compiled_call_impl", None) is None]
    options = {"mode": config.compile_mode} if config.compile_backend == "inductor" else {}
    for model in mine:
        model.compile(backend=config.compile_backend, **options)  # in place: names and state dict unchanged
    try:
        yield
    finally:
        for model in mine:
            model._compiled_call_impl = None  # nn.Module.compile's own attribute: back to the eager forward


@contextlib.contextmanager
def eager(*models: nn.Module) -> Iterator[None]:
    """Within the block, compiled models run their eager forward (an evaluation in the middle of compiled
    training: sampling's batch shapes would each recompile); compiled again after it."""
    saved = [(m, getattr(m, "_compiled_call_impl", None)) for m in dict.fromkeys(models)]
    for model, _ in saved:
        model._compiled_call_impl = None
    try:
        yield
    finally:
        for model, compiled in saved:
            model._compiled_call_impl = compiled
