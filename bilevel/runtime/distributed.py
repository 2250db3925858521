"""Data-parallel training over several processes started by `accelerate launch` or `torchrun`.

Every process holds the whole student, takes its slice of each global batch and the processes average their
gradients before every optimiser step, so they stay identical replicas. Rank 0 alone writes outputs and prints.
A run started without a launcher (WORLD_SIZE unset or 1) never imports accelerate or torch.distributed: every
helper here is then the identity, so single-process runs are bit-identical to runs without this module.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import nn

from bilevel.core.errors import BilevelError

#: How long a process waits at a collective. Other ranks wait while rank 0 evaluates an arm (sampling plus
#: metrics), which can take far longer than torch's default 10-30 minutes on a real model.
TIMEOUT = timedelta(hours=3)
#: Gradients are averaged in flat buckets of at most this many elements (one all_reduce each).
BUCKET = 1 << 24

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the launched ones."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.world_size > 1


_current: Processes | None = None


def launched_world_size() -> int:
    """How many processes the launcher says it started (1 without a launcher)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise BilevelError(f"WORLD_SIZE={value!r} is not a number; launch with accelerate or torchrun") from None


def processes() -> Processes:
    """This process's rank and the world size; joins the process group on the first call when launched."""
    global _current
    if _current is None:
        _current = _join() if launched_world_size() > 1 else Processes()
    return _current


def _join() -> Processes:
    """Join the launcher's process group through accelerate (gloo on CPU, nccl on GPUs)."""
    from accelerate import PartialState

    # cpu=True on a machine without GPUs: accelerate's multi_gpu path would otherwise report one process.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=TIMEOUT)
    if state.num_processes != launched_world_size():
        raise BilevelError(
            f"the launcher started {launched_world_size()} processes but accelerate sees {state.num_processes}; "
            "launch with `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`"
        )
    atexit.register(_leave)
    return Processes(state.process_index, state.num_processes, state.local_process_index)


def check_launcher_precision(configured: str) -> None:
    """bilevel runs its own autocast (model.mixed_precision); accelerate's --mixed_precision would be ignored."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") or "no"
    if launcher not in ("no", configured):
        raise BilevelError(
            f"accelerate launch --mixed_precision {launcher} has no effect on bilevel; launch with --mixed_precision no "
            f"and set model.mixed_precision={launcher} instead (it is {configured})"
        )


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(like: torch.device) -> torch.device:
    """nccl reduces GPU tensors only; gloo works on CPU tensors."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return like if like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor (in place) by its mean over the processes; identity in a single process.

    Tensors are flattened into buckets per device and dtype so a model's gradients take a few all_reduces.
    Every process must pass tensors of the same shapes in the same order.
    """
    if not processes().multi or not tensors:
        return
    import torch.distributed as dist

    world = processes().world_size
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for (device, _), group in groups.items():
        for bucket in _buckets(group):
            flat = torch.cat([t.reshape(-1) for t in bucket]).to(_comm_device(device))
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            with torch.no_grad():
                for t in bucket:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and size + t.numel() > BUCKET:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average the .grad of these parameters over the processes (those without a gradient are left alone)."""
    average_([p.grad for p in params if p.grad is not None])


def average_gradients_before_step(*optimizers: torch.optim.Optimizer) -> None:
    """Make every step of these optimisers use gradients averaged over the processes (no-op in one process).

    The single place the averaging happens: whichever solver sets the gradients and calls step(), the step sees
    the mean. Masks applied before the step (unlearners' before_step) are linear, so their order does not matter.
    """
    if not processes().multi:
        return

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        average_gradients(p for group in optimizer.param_groups for p in group["params"])

    for optimizer in optimizers:
        optimizer.register_step_pre_hook(hook)


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Per-process losses -> their mean (the global batch's loss), the same on every process.

    So the logged history describes the whole batch, and a non-finite loss on one process stops all of them at
    the same step instead of leaving the others waiting at a collective.
    """
    if not processes().multi or not metrics:
        return metrics
    import torch.distributed as dist

    keys = list(metrics)  # the same order on every process: the same solver code made them
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64).to(_comm_device(torch.device("cpu")))
    dist.all_reduce(values)
    values = (values / processes().world_size).cpu()
    return {k: float(values[i]) for i, k in enumerate(keys)}


def shard(batch_size: int, what: str) -> slice | None:
    """This process's slice of a global batch of `batch_size` (None in one process: the whole batch)."""
    p = processes()
    if not p.multi:
        return None
    if batch_size % p.world_size:
        raise BilevelError(
            f"{what}={batch_size} does not split over {p.world_size} processes; use a multiple of {p.world_size}"
        )
    n = batch_size // p.world_size
    return slice(p.rank * n, (p.rank + 1) * n)


def barrier() -> None:
    if processes().multi:
        import torch.distributed as dist

        dist.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """Run fn on rank 0 only and hand its result (or its BilevelError) to every process."""
    p = processes()
    if not p.multi:
        return fn()
    import torch.distributed as dist

    box: list[Any] = [None]
    if p.is_main:
        try:
            box[0] = ("ok", fn())
        except BilevelError as exc:
            box[0] = ("error", str(exc))
            dist.broadcast_object_list(box, src=0)
            raise
        except BaseException:
            box[0] = ("error", "rank 0 failed; see its error above")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise BilevelError(value)
    return value


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache), the others after it, when they can read what it wrote."""
    p = processes()
    if p.multi and not p.is_main:
        barrier()
    yield
    if p.multi and p.is_main:
        barrier()


def broadcast_module(module: nn.Module) -> None:
    """Give every process rank 0's parameters and buffers, so all replicas start from identical weights."""
    if not processes().multi:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            buf = t.detach().to(_comm_device(t.device))
            dist.broadcast(buf, src=0)
            t.copy_(buf)


def checksum(module: nn.Module) -> str:
    """SHA-256 of the parameters' exact bytes (names and values)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in module.named_parameters():
            h.update(name.encode())
            h.update(p.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def check_in_sync(module: nn.Module, what: str) -> str | None:
    """Fail when the processes' copies of `module` differ; returns the common checksum (None in one process)."""
    p = processes()
    if not p.multi:
        return None
    import torch.distributed as dist

    mine = checksum(module)
    every: list[Any] = [None] * p.world_size
    dist.all_gather_object(every, mine)
    if len(set(every)) != 1:
        odd = [r for r, c in enumerate(every) if c != every[0]]
        raise BilevelError(
            f"{what}: the {p.world_size} processes' weights diverged (ranks {odd} differ from rank 0); "
            "a solver updated parameters without the averaged optimiser step"
        )
    return mine


def quiet_unless_main(*consoles: Any) -> None:
    """Silence rich consoles on every process but rank 0 (one table, one progress log)."""
    if processes().multi and not processes().is_main:
        for console in consoles:
            console.quiet = True
