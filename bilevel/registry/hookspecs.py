"""The pluggy hooks: one per plugin kind. Each receives a `register` callback taking a plugin class."""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("bilevel")
hookimpl = pluggy.HookimplMarker("bilevel")


@hookspec
def register_pruners(register: Callable[[type], None]) -> None:
    """Call register(PrunerClass) for each pruner this package provides."""


@hookspec
def register_unlearners(register: Callable[[type], None]) -> None:
    """Call register(UnlearnerClass) for each unlearner this package provides."""


@hookspec
def register_solvers(register: Callable[[type], None]) -> None:
    """Call register(SolverClass) for each bilevel solver this package provides."""


@hookspec
def register_worlds(register: Callable[[type], None]) -> None:
    """Call register(WorldPluginClass) for each world (teacher, data, evaluator) this package provides."""


@hookspec
def register_attacks(register: Callable[[type], None]) -> None:
    """Call register(AttackClass) for each attack (a test of whether a suppressed concept is really gone)."""
