"""Attack plugins: tests of whether a suppressed concept is really gone (other names, learned prompt embeddings,
further fine-tuning). The built-ins register through the `bilevel` entry-point group like a third party's."""

from bilevel.registry.hookspecs import hookimpl


@hookimpl
def register_attacks(register) -> None:
    from bilevel.plugins.attacks.inversion import Inversion
    from bilevel.plugins.attacks.paraphrase import Paraphrase
    from bilevel.plugins.attacks.relearn_benign import RelearnBenign
    from bilevel.plugins.attacks.relearn_fewshot import RelearnFewshot

    for cls in (Paraphrase, Inversion, RelearnBenign, RelearnFewshot):
        register(cls)
