"""Built-in bilevel solvers, registered through the `bilevel` entry-point group."""

from bilevel.registry.hookspecs import hookimpl


@hookimpl
def register_solvers(register) -> None:
    from bilevel.plugins.solvers.alternating import AlternatingSolver
    from bilevel.plugins.solvers.bome import BomeSolver
    from bilevel.plugins.solvers.implicit import ImplicitSolver
    from bilevel.plugins.solvers.unrolled import UnrolledSolver

    register(AlternatingSolver)
    register(UnrolledSolver)
    register(ImplicitSolver)
    register(BomeSolver)
