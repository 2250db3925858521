"""Built-in pruners, registered through the `bilevel` entry-point group like any third-party plugin."""

from ...registry.hookspecs import hookimpl


@hookimpl
def register_pruners(register) -> None:
    from .bk_sdm import BKSDMPruner
    from .diff_pruning import DiffPruningPruner
    from .magnitude import MagnitudePruner

    register(MagnitudePruner)
    register(BKSDMPruner)
    register(DiffPruningPruner)
