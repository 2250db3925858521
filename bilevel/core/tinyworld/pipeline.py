"""The tiny text-to-image pipeline, in diffusers' layout so it saves and reloads with `save_pretrained`."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from ..sampling import sample_images


class TinyTextToImagePipeline(DiffusionPipeline):
    """Pixel-space text-to-image: an SD-shaped UNet, a small CLIP text encoder, a word-level tokenizer, DDIM."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerFast, scheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids).last_hidden_state

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str] | str,
        *,
        num_inference_steps: int = 25,
        guidance_scale: float = 2.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1]."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""])
        return sample_images(
            self.unet,
            dict(self.scheduler.config),
            cond,
            uncond,
            steps=num_inference_steps,
            guidance=guidance_scale,
            generator=generator,
            channels=self.unet.config.in_channels,
            size=self.unet.config.sample_size,
        )
