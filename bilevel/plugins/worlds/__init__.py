"""World plugins: the data, prompts, concept detector and teacher that a run is about. The built-ins register
through the `bilevel` entry-point group exactly as a third-party world does."""

from bilevel.registry.hookspecs import hookimpl


@hookimpl
def register_worlds(register) -> None:
    from bilevel.plugins.worlds.digits.plugin import DigitsWorldPlugin
    from bilevel.plugins.worlds.stable_diffusion import StableDiffusionWorldPlugin
    from bilevel.plugins.worlds.tiny import TinyWorldPlugin

    register(TinyWorldPlugin)
    register(StableDiffusionWorldPlugin)
    register(DigitsWorldPlugin)
