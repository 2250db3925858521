"""The tiny world as a plugin: the shipped tiny teacher ('tiny') or any TinyTextToImagePipeline folder."""

from __future__ import annotations

from typing import ClassVar

from bilevel.core.config import RunConfig
from bilevel.core.errors import BilevelError
from bilevel.core.world import Purpose, World, WorldPlugin

#: Data settings only a Stable Diffusion world reads; given to the tiny world they would be silently ignored.
SD_ONLY_DATA = ("finetune_data", "concept_data", "concept_prompts", "retain_prompts", "resolution")


class TinyWorldPlugin(WorldPlugin):
    name: ClassVar[str] = "tiny"
    description: ClassVar[str] = "8x8 procedural coloured shapes; concepts are colours; colour detector, SWD"
    priority: ClassVar[int] = 10
    api_version = 2

    def accepts(self, source: str) -> bool:
        from bilevel.worlds.stable_diffusion.loading import is_tiny_pipeline

        return is_tiny_pipeline(source)

    def check(self, config: RunConfig, purpose: Purpose) -> None:
        from bilevel.worlds.tiny.dataset import check_colours

        check_colours(config.concepts)
        given = [k for k in SD_ONLY_DATA if getattr(config.data, k) is not None]
        if given:
            raise BilevelError(
                f"data.{given[0]} applies to Stable Diffusion models; the tiny world makes its own data and prompts"
            )

    def build(self, config: RunConfig, purpose: Purpose) -> World:
        from bilevel.worlds.models import load_tiny_pipeline
        from bilevel.worlds.tiny.world import TinyWorld

        m, d = config.model, config.data
        pipe = load_tiny_pipeline(m.source, m.device)
        return TinyWorld.build(
            pipe, config.concepts, d.finetune_size, d.concept_size, d.seed, m.device, m.mixed_precision
        )
