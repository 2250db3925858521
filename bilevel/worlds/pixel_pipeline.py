"""What every pixel-space world built on a small diffusers pipeline (`self.pipe`: unet, text encoder, tokenizer,
scheduler) answers the same way: its teacher, tokenizer, noise schedule and sample shape come from the pipeline,
and its images are its samples (x0 are pixels in [-1, 1])."""

from __future__ import annotations

from typing import Any

import torch


class PixelPipelineWorld:
    """Mixin for World implementations holding `pipe` and `device` (the tiny and digits worlds)."""

    pipe: Any
    device: torch.device

    @property
    def tokenizer(self) -> Any:
        return self.pipe.tokenizer

    @property
    def teacher(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.pipe.scheduler.config)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.pipe.scheduler.alphas_cumprod.float()

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        cfg = self.pipe.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.sample_shape

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(self.device)

    def pipeline_parts(self) -> dict[str, Any]:
        return {"text_encoder": self.pipe.text_encoder, "tokenizer": self.pipe.tokenizer, "scheduler": self.pipe.scheduler}
