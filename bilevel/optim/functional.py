"""Evaluating a module at tensors other than its own parameters, and the parameter plumbing solvers share.

`Objective.loss(batch)` always runs the model as it stands. Unrolled and finite-difference solvers need the loss
at other points (non-leaf tensors carrying a graph, or perturbed copies), so `swap_parameters` temporarily puts
given tensors where the parameters were and restores the originals afterwards, even on error.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import BilevelProblem
from bilevel.optim.steps import optimizer_step
from bilevel.runtime.distributed import average_


@contextlib.contextmanager
def swap_parameters(module: nn.Module, tensors: Mapping[nn.Parameter, torch.Tensor]) -> Iterator[None]:
    """Inside the block, every slot holding one of the given parameters holds the matching tensor instead.

    Keys are the Parameter objects (not names) so tied weights and aliases are swapped together. The tensors
    may be non-leaf (their graph then reaches the loss). Setting `_parameters[...]` directly bypasses
    `register_parameter`'s Parameter-only check, which is what lets a non-leaf tensor stand in.
    """
    by_id = {id(p): t for p, t in tensors.items()}
    for p, t in tensors.items():
        if t.shape != p.shape:
            raise ValueError(f"swap_parameters: shape {tuple(t.shape)} for a parameter of shape {tuple(p.shape)}")
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and id(p) in by_id:
                    swapped.append((sub, name, p))
                    sub._parameters[name] = by_id[id(p)]  # type: ignore[assignment]
        yield
    finally:
        for sub, name, p in reversed(swapped):
            sub._parameters[name] = p


@contextlib.contextmanager
def swap_data(params: Sequence[nn.Parameter], tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Point each parameter's storage at the given tensor (in-place updates then land in that tensor).

    Used to let the problem's upper optimiser (whose state is keyed by the Parameter objects) step the proximal
    anchors instead of the model's weights. Must only be used when no graph references the parameters.
    """
    saved = [p.data for p in params]
    try:
        for p, t in zip(params, tensors):
            p.data = t
        yield
    finally:
        for p, d in zip(params, saved):
            p.data = d


def split_names(problem: BilevelProblem) -> tuple[list[str], list[str]]:
    """Upper and lower parameter names for the split coupling; they must be disjoint and non-empty."""
    lower_ids = {id(p) for p in problem.lower_params.values()}
    shared = [n for n, p in problem.upper_params.items() if id(p) in lower_ids]
    if shared:
        raise BilevelError(
            f"split coupling needs disjoint upper and lower parameters, but {len(shared)} are in both "
            f"(e.g. {shared[0]!r}); use coupling 'proximal' or 'shared', or give the lower level the complement"
        )
    if not problem.upper_params or not problem.lower_params:
        raise BilevelError("split coupling needs non-empty upper_params and lower_params")
    return list(problem.upper_params), list(problem.lower_params)


def proximal_pairs(problem: BilevelProblem) -> list[tuple[str, str]]:
    """(upper name, lower name) of each upper parameter; in the proximal coupling each must be a lower one too."""
    lower_by_id = {id(p): n for n, p in problem.lower_params.items()}
    pairs, missing = [], []
    for n, p in problem.upper_params.items():
        (pairs.append((n, lower_by_id[id(p)])) if id(p) in lower_by_id else missing.append(n))
    if missing:
        raise BilevelError(
            f"proximal coupling needs every upper parameter to be a lower parameter too; {missing[0]!r} is not "
            "(use coupling 'split' for disjoint subsets)"
        )
    if not pairs:
        raise BilevelError("proximal coupling needs non-empty upper_params")
    return pairs


def set_parameters(params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
    """Copy values into parameters without recording a graph (values' graphs are not kept alive).

    In data-parallel training the values are averaged over the processes: a solver that writes parameters
    itself (unrolled's lower SGD steps) keeps the replicas identical; for one SGD step this is gradient averaging.
    """
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    average_(list(params))


def batch_head(batch: Any, n: int) -> Any:
    """The first n samples of a batch, e.g. for Hessian-vector products on fewer samples than the lower step.

    The batch size is the leading dimension of the first tensor found (depth first); every tensor with that leading
    dimension is sliced, other values are kept, and dataclasses, mappings, lists and tuples are rebuilt around them.
    Objectives whose batches hold per-sample tensors first (as the KD lower level's do) can thus be subsampled
    without knowing their type. A batch of at most n samples (or without tensors) is returned unchanged.
    """
    size = _leading_size(batch)
    if size is None or size <= n:
        return batch

    def cut(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj[:n] if obj.ndim > 0 and obj.shape[0] == size else obj
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            fields = {f.name: cut(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
            return dataclasses.replace(obj, **fields)
        if isinstance(obj, Mapping):
            return type(obj)({k: cut(v) for k, v in obj.items()})
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*(cut(v) for v in obj))
        if isinstance(obj, (list, tuple)):
            return type(obj)(cut(v) for v in obj)
        return obj

    return cut(batch)


def _leading_size(obj: Any) -> int | None:
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.ndim > 0 else None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        children: Any = (getattr(obj, f.name) for f in dataclasses.fields(obj))
    elif isinstance(obj, Mapping):
        children = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    else:
        return None
    for child in children:
        size = _leading_size(child)
        if size is not None:
            return size
    return None


@contextlib.contextmanager
def double_backward_attention(enabled: bool = True) -> Iterator[None]:
    """Route F.scaled_dot_product_attention to the math kernel, the only one with a double backward.

    The flash kernels (CPU and CUDA) and the memory-efficient kernel raise 'derivative for ... not implemented'
    when a graph through them is differentiated again (unrolled steps, autograd HVPs).
    """
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


@contextlib.contextmanager
def explain_missing_double_backward(solver_name: str, fix: str) -> Iterator[None]:
    """Turn autograd's 'derivative for <op> is not implemented' into a one-line user-facing error."""
    try:
        yield
    except RuntimeError as exc:
        msg = str(exc)
        if "derivative for" in msg and "not implemented" in msg:
            op = msg.split("derivative for", 1)[1].split("is not implemented", 1)[0].strip()
            raise BilevelError(f"solver {solver_name!r} needs a double backward, which {op} lacks; {fix}") from None
        raise


class Coupled:
    """The variables of one coupling, resolved once per problem.

    lower: the lower variable y (the problem's lower parameters, in a fixed order). upper: the Parameter objects
    the upper optimiser holds. For 'split' the upper variable x is `upper` itself; for 'proximal' x is a separate
    anchor copy (`anchors`) that `upper_step` lets the upper optimiser update, while the model keeps y;
    `prox_index[i]` is the position in `lower` of the parameter tied to anchor i.
    """

    def __init__(self, problem: BilevelProblem, coupling: str) -> None:
        self.coupling = coupling
        self.lower_names = list(problem.lower_params)
        self.lower = [problem.lower_params[n] for n in self.lower_names]
        if coupling == "split":
            self.upper_names, _ = split_names(problem)
            self.prox_index: list[int] = []
        elif coupling == "proximal":
            pairs = proximal_pairs(problem)
            self.upper_names = [u for u, _ in pairs]
            pos = {n: i for i, n in enumerate(self.lower_names)}
            self.prox_index = [pos[low] for _, low in pairs]
        else:
            self.upper_names = list(problem.upper_params)
            self.prox_index = []
        self.upper = [problem.upper_params[n] for n in self.upper_names]
        self.anchors: list[torch.Tensor] = [p.detach().clone() for p in self.upper] if coupling == "proximal" else []

    def prox_penalty(self, mu: float) -> torch.Tensor:
        """mu/2 ||y_U - x||^2 at the model's current y (zero outside the proximal coupling)."""
        if self.coupling != "proximal":
            return torch.zeros(())
        return 0.5 * mu * sum(((self.lower[i] - a) ** 2).sum() for i, a in zip(self.prox_index, self.anchors))

    def add_prox_grad(
        self, grads: list[torch.Tensor], ys: Sequence[torch.Tensor], xs: Sequence[torch.Tensor], mu: float
    ) -> list[torch.Tensor]:
        """grad_y of mu/2 ||y_U - x||^2 added to grad_y L_low (graph-preserving when ys/xs carry one)."""
        grads = list(grads)
        for i, x in zip(self.prox_index, xs):
            grads[i] = grads[i] + mu * (ys[i] - x)
        return grads

    def upper_step(self, problem: BilevelProblem, grads: Sequence[torch.Tensor]) -> None:
        """Step the upper variable with the problem's upper optimiser (anchors in the proximal coupling)."""
        step = lambda: optimizer_step(
            self.upper, grads, problem.upper_optimizer, problem.before_upper_step, problem.upper_scheduler
        )
        if self.coupling == "proximal":
            with swap_data(self.upper, self.anchors):
                step()
        else:
            step()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: a.detach().clone() for n, a in zip(self.upper_names, self.anchors)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in self.upper_names if n not in state] if self.anchors else []
        if missing:
            raise BilevelError(
                f"solver state lacks the proximal anchor for {missing[0]!r}; resume with the same unlearner"
            )
        for a, n in zip(self.anchors, self.upper_names):
            a.copy_(state[n])
