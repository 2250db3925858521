"""Built-in unlearners, registered through the `bilevel` entry-point group."""

from ...registry.hookspecs import hookimpl


@hookimpl
def register_unlearners(register) -> None:
    from .esd import ESD

    register(ESD)
