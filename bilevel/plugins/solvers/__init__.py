"""Built-in bilevel solvers, registered through the `bilevel` entry-point group."""

from ...registry.hookspecs import hookimpl


@hookimpl
def register_solvers(register) -> None:
    from .alternating import AlternatingSolver

    register(AlternatingSolver)
