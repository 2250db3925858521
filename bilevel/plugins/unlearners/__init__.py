"""Built-in unlearners, registered through the `bilevel` entry-point group."""

from ...registry.hookspecs import hookimpl


@hookimpl
def register_unlearners(register) -> None:
    from .concept_ablation import ConceptAblation
    from .esd import ESD
    from .salun import SalUn

    register(ESD)
    register(ConceptAblation)
    register(SalUn)
