"""Built-in bilevel solvers, registered through the `bilevel` entry-point group."""

from ...registry.hookspecs import hookimpl


@hookimpl
def register_solvers(register) -> None:
    from .alternating import AlternatingSolver
    from .bome import BomeSolver
    from .implicit import ImplicitSolver
    from .unrolled import UnrolledSolver

    register(AlternatingSolver)
    register(UnrolledSolver)
    register(ImplicitSolver)
    register(BomeSolver)
