"""Built-in pruners, registered through the `bilevel` entry-point group like any third-party plugin."""

from bilevel.registry.hookspecs import hookimpl


@hookimpl
def register_pruners(register) -> None:
    from bilevel.plugins.pruners.bk_sdm import BKSDMPruner
    from bilevel.plugins.pruners.diff_pruning import DiffPruningPruner
    from bilevel.plugins.pruners.magnitude import MagnitudePruner

    register(MagnitudePruner)
    register(BKSDMPruner)
    register(DiffPruningPruner)
