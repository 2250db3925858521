"""The tiny teacher's architecture: shaped like Stable Diffusion's UNet (4 stages, 2 layers per block,
cross-attention down/up stages and a cross-attention mid block) so BK-SDM's block removal applies unchanged."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from bilevel.worlds.tiny.pipeline import TinyTextToImagePipeline
from bilevel.worlds.tiny.text import build_text_encoder, build_tokenizer, give_names_meaning

IMAGE_SIZE = 8
TEXT_DIM = 64


#: Wide enough (and 8 channels per GroupNorm group) that channel pruning at BK-SDM Small's compute leaves a student
#: that recovers; the first teacher (16, 32, 32, 32) with 4 groups did not.
CHANNELS = (32, 64, 64, 64)


def tiny_unet_config(channels: tuple[int, ...] = CHANNELS, groups: int = 8, heads: int = 4) -> dict:
    return {
        "sample_size": IMAGE_SIZE,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": 2,
        "norm_num_groups": groups,
        "cross_attention_dim": TEXT_DIM,
        "attention_head_dim": heads,  # diffusers reads this as the number of heads
    }


def tiny_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        set_alpha_to_one=False,
    )


def build_tiny_pipeline(seed: int = 0) -> TinyTextToImagePipeline:
    """A freshly initialised (untrained) tiny pipeline, deterministic by seed."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, TEXT_DIM)
    give_names_meaning(text_encoder, tokenizer, seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    return TinyTextToImagePipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=tiny_scheduler())
