"""World plugins: the data, prompts, concept detector and teacher that a run is about. The built-ins register
through the `bilevel` entry-point group exactly as a third-party world does."""

from ...registry.hookspecs import hookimpl


@hookimpl
def register_worlds(register) -> None:
    from .stable_diffusion import StableDiffusionWorldPlugin
    from .tiny import TinyWorldPlugin

    register(TinyWorldPlugin)
    register(StableDiffusionWorldPlugin)
