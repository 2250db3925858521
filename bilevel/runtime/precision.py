"""Mixed precision as autocast around forward passes: weights (and optimiser state) stay fp32, matmuls and
convolutions run in fp16/bf16. Used for training objectives, teacher sampling and evaluation alike."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from bilevel.core.errors import BilevelError

F = TypeVar("F", bound=Callable[..., Any])
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context for `precision` ('no', 'fp16', 'bf16') on `device`; 'no' is a no-op.

    bf16 works on CPU and CUDA; fp16 only on CUDA (CPU fp16 kernels are slow or missing)."""
    if precision == "no":
        return contextlib.nullcontext()
    if precision not in DTYPES:
        raise BilevelError(f"unknown mixed precision {precision!r}; accepted: no, fp16, bf16")
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise BilevelError(f"mixed precision fp16 needs a CUDA device, got {kind!r}; use bf16 or no")
    return torch.autocast(device_type=kind, dtype=DTYPES[precision])


def under_autocast(fn: F, precision: str, device: torch.device | str) -> F:
    """fn, run inside autocast(precision, device) (returned unchanged for 'no')."""
    if precision == "no":
        return fn

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with autocast(precision, device):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


_SCALER = "_bilevel_loss_scaler"


def attach_loss_scaler(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """fp16 only: dynamic loss scaling (torch's GradScaler) for every step `steps.optimizer_step` makes, so small
    gradients do not underflow to zero; bf16 has fp32's exponent range and needs none."""
    setattr(optimizer, _SCALER, torch.amp.GradScaler(torch.device(device).type))


def loss_scaler(optimizer: torch.optim.Optimizer) -> torch.amp.GradScaler | None:
    return getattr(optimizer, _SCALER, None)


def loss_scaler_state(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The scale and its growth tracker (None without a scaler), checkpointed so that a resumed fp16 run scales,
    skips and grows exactly as the uninterrupted one would."""
    scaler = loss_scaler(optimizer)
    return scaler.state_dict() if scaler is not None else None


def load_loss_scaler_state(optimizer: torch.optim.Optimizer, state: dict[str, Any] | None) -> None:
    """Restore what loss_scaler_state returned; a mismatch (fp16 now but not then, or the reverse) is an error."""
    scaler = loss_scaler(optimizer)
    if (scaler is None) != (state is None):
        then, now = ("fp16" if state is not None else "not fp16"), ("fp16" if scaler is not None else "not fp16")
        raise BilevelError(f"checkpoint was written {then} but this run is {now}; resume with the run's own config")
    if scaler is not None:
        scaler.load_state_dict(state)
