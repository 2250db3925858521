"""The module named by this package's `bilevel` entry point: one pluggy hook per plugin kind it provides.

Plugin classes are imported inside the hooks so that `bilevel plugins` stays fast and a missing optional
dependency is reported as this package's load failure instead of breaking the others.
"""

from bilevel import hookimpl


@hookimpl
def register_unlearners(register) -> None:
    from .uce import UCE

    register(UCE)


@hookimpl
def register_pruners(register) -> None:
    from .random_pruner import RandomPruner

    register(RandomPruner)
