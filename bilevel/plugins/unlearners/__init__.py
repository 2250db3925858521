"""Built-in unlearners, registered through the `bilevel` entry-point group."""

from bilevel.registry.hookspecs import hookimpl


@hookimpl
def register_unlearners(register) -> None:
    from bilevel.plugins.unlearners.concept_ablation import ConceptAblation
    from bilevel.plugins.unlearners.esd import ESD
    from bilevel.plugins.unlearners.salun import SalUn

    register(ESD)
    register(ConceptAblation)
    register(SalUn)
