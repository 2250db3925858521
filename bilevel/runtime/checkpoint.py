"""Exact-resume checkpoints of one trained arm, written so that a kill at any moment leaves the last complete one.

Layout of `<out>/checkpoints/<arm>/`: one folder per checkpoint (`step-000020/`) holding the student
(safetensors), the optimisers' and schedulers' state (torch.save, read back with weights_only=True only), the
solver's and unlearner's tensors (safetensors) and the torch RNG state; `state.json`, written atomically last,
names the complete folder plus the step, the data-draw counters and the history. Older folders are removed only
after state.json points past them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import BilevelProblem, BilevelSolver, Unlearner
from bilevel.diffusion.kd_objective import DrawCounter
from bilevel.optim.training import TrainState
from bilevel.runtime.io import atomic_save_tensors, atomic_write_text, load_tensors, read_format_json
from bilevel.runtime.precision import load_loss_scaler_state, loss_scaler_state

STATE = "state.json"
FORMAT = "bilevel-checkpoint/1"
STUDENT = "model.safetensors"
OPTIM = "optim.pt"
SOLVER = "solver.safetensors"
UNLEARNER = "unlearner.safetensors"
EXTRA = "extra.safetensors"  # the problem's extra_state (e.g. a learned adversarial embedding)
RNG = "rng.safetensors"


@dataclass
class ArmState:
    """What the runner rebuilds around a problem to continue one arm: counters named 'lower' and 'upper'."""

    problem: BilevelProblem
    solver: BilevelSolver  # a registered solver, or interfaces.LowerOnly / UpperOnly for the baselines
    unlearner: Unlearner | None
    counters: dict[str, DrawCounter]


def save_checkpoint(folder: Path, arm: ArmState, state: TrainState, steps: int) -> None:
    """Write a complete checkpoint folder, then point state.json at it, then drop the older folders."""
    folder = Path(folder)
    name = f"step-{state.step:06d}"
    target = folder / name
    if target.exists():  # a leftover from a kill before state.json was written
        shutil.rmtree(target)
    target.mkdir(parents=True)
    p = arm.problem
    atomic_save_tensors(p.model.state_dict(), target / STUDENT)
    torch.save(
        {
            "lower_optimizer": p.lower_optimizer.state_dict(),
            "upper_optimizer": p.upper_optimizer.state_dict(),
            "lower_scheduler": p.lower_scheduler.state_dict() if p.lower_scheduler is not None else None,
            "upper_scheduler": p.upper_scheduler.state_dict() if p.upper_scheduler is not None else None,
            "lower_loss_scaler": loss_scaler_state(p.lower_optimizer),  # fp16: None otherwise
            "upper_loss_scaler": loss_scaler_state(p.upper_optimizer),
        },
        target / OPTIM,
    )
    solver_tensors, solver_json = _flatten(arm.solver.state_dict())
    atomic_save_tensors(solver_tensors, target / SOLVER)
    atomic_save_tensors(arm.unlearner.state_dict() if arm.unlearner is not None else {}, target / UNLEARNER)
    atomic_save_tensors(_rng_state(), target / RNG)
    atomic_save_tensors(_flatten({name: obj.state_dict() for name, obj in p.extra_state.items()})[0], target / EXTRA)
    meta = {
        "format": FORMAT,
        "folder": name,
        "steps": steps,
        "counters": {k: c.count for k, c in arm.counters.items()},
        "solver": solver_json,
        **state.to_json(),
    }
    atomic_write_text(folder / STATE, json.dumps(meta, indent=1))
    for old in folder.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def read_state(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's state.json, or None when the arm has none yet."""
    path = Path(folder) / STATE
    if not path.is_file():
        return None
    return read_format_json(path, FORMAT, "checkpoint", "; remove the folder to restart this arm")


def load_unlearner_state(folder: Path, unlearner: Unlearner | None) -> None:
    """Restore the unlearner's tensors before its prepare() so it reuses them (e.g. a saliency mask)."""
    meta = read_state(folder)
    if meta is None or unlearner is None:
        return
    unlearner.load_state_dict(load_tensors(Path(folder) / meta["folder"] / UNLEARNER))


def load_checkpoint(folder: Path, arm: ArmState, steps: int) -> TrainState | None:
    """Restore student, optimisers, schedulers, solver, counters and RNG; None when there is no checkpoint."""
    folder = Path(folder)
    meta = read_state(folder)
    if meta is None:
        return None
    if int(meta["steps"]) != steps:
        raise BilevelError(
            f"checkpoint {folder} is for {meta['steps']} steps, this run has {steps}; resume the same config"
        )
    ckpt = folder / meta["folder"]
    p = arm.problem
    weights = load_tensors(ckpt / STUDENT)
    if set(weights) != set(p.model.state_dict()):
        raise BilevelError(f"checkpoint {ckpt} holds another model's weights; resume with the run's own config")
    with torch.no_grad():
        p.model.load_state_dict(weights, strict=True)
    try:
        optim = torch.load(ckpt / OPTIM, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise BilevelError(f"corrupt checkpoint file {ckpt / OPTIM}: {str(exc).splitlines()[0]}") from None
    p.lower_optimizer.load_state_dict(optim["lower_optimizer"])
    p.upper_optimizer.load_state_dict(optim["upper_optimizer"])
    for key, scheduler in (("lower_scheduler", p.lower_scheduler), ("upper_scheduler", p.upper_scheduler)):
        if scheduler is not None and optim.get(key) is not None:
            scheduler.load_state_dict(optim[key])
    for key, opt in (("lower_loss_scaler", p.lower_optimizer), ("upper_loss_scaler", p.upper_optimizer)):
        if key in optim:  # absent from checkpoints written before the scale was saved
            load_loss_scaler_state(opt, optim[key])
    arm.solver.load_state_dict(_unflatten(load_tensors(ckpt / SOLVER), meta.get("solver", {})))
    for k, c in arm.counters.items():
        c.count = int(meta["counters"][k])
    _set_rng_state(load_tensors(ckpt / RNG))
    if p.extra_state:
        extra = _unflatten(load_tensors(ckpt / EXTRA), {}) if (ckpt / EXTRA).is_file() else {}
        for name, obj in p.extra_state.items():
            obj.load_state_dict(extra.get(name, {}))
    return TrainState.from_json(meta)


def _flatten(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Nested state -> ('a/b' -> tensor) for safetensors and the JSON-able rest (keeping its nesting)."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            tensors[prefix + k] = v.detach().clone()
        elif isinstance(v, dict):
            t, r = _flatten(v, f"{prefix}{k}/")
            tensors.update(t)
            rest[k] = r
        else:
            rest[k] = v
    return tensors, rest


def _unflatten(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of _flatten."""
    state: dict[str, Any] = json.loads(json.dumps(rest))
    for key, tensor in tensors.items():
        *path, leaf = key.split("/")
        node = state
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = tensor
    return state


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
