"""Real Stable Diffusion (1.x/2.x) as a world: a local diffusers pipeline folder or a Hugging Face Hub id."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from bilevel.core.config import RunConfig
from bilevel.core.world import Purpose, World, WorldPlugin


class StableDiffusionWorldPlugin(WorldPlugin):
    name: ClassVar[str] = "stable-diffusion"
    description: ClassVar[str] = "a Stable Diffusion pipeline (folder or hub id); VAE latents; CLIP detector, FID"
    priority: ClassVar[int] = 0
    api_version = 2

    def accepts(self, source: str) -> bool:
        from bilevel.worlds.stable_diffusion.loading import is_hub_id, is_tiny_pipeline

        if is_tiny_pipeline(source):
            return False
        path = Path(source).expanduser()
        return (path / "model_index.json").is_file() or is_hub_id(source)

    def build(self, config: RunConfig, purpose: Purpose) -> World:
        from bilevel.worlds.stable_diffusion.evaluation import prepare_evaluators
        from bilevel.worlds.stable_diffusion.world import SDWorld

        world = SDWorld.build(config, purpose)
        if purpose in ("run", "eval", "unlearn"):
            prepare_evaluators(world, config.evaluation)  # a missing CLIP model fails before any training
        return world
