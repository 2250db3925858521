"""Shared lifecycle of the hypergradient solvers that keep a separate upper variable (proximal anchors or a
split subset): coupling checks, building the `Coupled` view once, and checkpointing the anchors."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel

from bilevel.core.interfaces import BilevelProblem, BilevelSolver
from bilevel.toolkit import Coupled


class CoupledSolver(BilevelSolver):
    """Base for `unrolled` and `implicit-gradient`; their step() starts with `c = self.coupled(problem)`."""

    def __init__(self, config: BaseModel | None = None) -> None:
        super().__init__(config)
        self._coupled: Coupled | None = None
        self._pending: dict[str, torch.Tensor] | None = None

    def setup(self, problem: BilevelProblem) -> None:
        self._coupled = Coupled(problem, self.coupling)
        if self._pending is not None:
            self._coupled.load_state_dict(self._pending)
            self._pending = None

    def coupled(self, problem: BilevelProblem) -> Coupled:
        if self._coupled is None:
            self.setup(problem)
        return self._coupled

    def state_dict(self) -> dict[str, Any]:
        return {"anchors": self._coupled.state_dict()} if self._coupled is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        anchors = state.get("anchors", {})
        if self._coupled is not None:
            self._coupled.load_state_dict(anchors)
        else:
            self._pending = anchors
