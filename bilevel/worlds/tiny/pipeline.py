"""The tiny text-to-image pipeline, in diffusers' layout so it saves and reloads with `save_pretrained`.

Self-contained on purpose (torch and diffusers only, no bilevel import): `bilevel export` copies this very file as
`pipeline.py` into an exported tiny-world folder, so the folder loads with stock diffusers and no bilevel installed:
`DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True)`.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DiffusionPipeline


class TinyTextToImagePipeline(DiffusionPipeline):
    """Pixel-space text-to-image: an SD-shaped UNet, a small CLIP text encoder, a word-level tokenizer, DDIM."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler) -> None:
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
        guidance_scale: float = 1.0,  # the tiny teacher's stated sampler (no guidance; see its model card)
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1]: classifier-free-guided DDIM, one batched forward per step."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([""]).expand(len(prompts), -1, -1)
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps)
        unet = self.unet
        dtype = next(unet.parameters()).dtype
        size, channels = unet.config.sample_size, unet.config.in_channels
        x = torch.randn((len(prompts), channels, size, size), generator=generator).to(cond.device, dtype)
        both_cond = torch.cat([uncond, cond]).to(dtype)
        for t in scheduler.timesteps:
            if guidance_scale == 1.0:
                eps = unet(x, t, encoder_hidden_states=cond.to(dtype)).sample
            else:
                e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=both_cond).sample.chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            x = scheduler.step(eps, t, x).prev_sample
        return x
