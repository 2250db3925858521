"""The digits teacher's architecture: the tiny teacher's SD-shaped UNet (so BK-SDM block removal applies), 1 channel."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from bilevel.plugins.worlds.digits.data import CHANNELS, IMAGE_SIZE
from bilevel.plugins.worlds.digits.text import build_text_encoder, build_tokenizer
from bilevel.worlds.tiny.architecture import TEXT_DIM, tiny_scheduler, tiny_unet_config
from bilevel.worlds.tiny.pipeline import TinyTextToImagePipeline

#: The first tiny teacher's widths, groups and heads (what the shipped digits teacher was trained with).
DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 32, 32)
GROUPS, HEADS = 4, 2


def digits_unet_config(channels: tuple[int, ...] = DEFAULT_CHANNELS) -> dict:
    config = tiny_unet_config(tuple(channels), groups=GROUPS, heads=HEADS)
    config.update(sample_size=IMAGE_SIZE, in_channels=CHANNELS, out_channels=CHANNELS)
    return config


def build_digits_pipeline(seed: int = 0, channels: tuple[int, ...] = DEFAULT_CHANNELS) -> TinyTextToImagePipeline:
    """A freshly initialised (untrained) digits pipeline, deterministic by seed; the tiny world's pipeline class."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, TEXT_DIM)
    unet = UNet2DConditionModel(**digits_unet_config(channels))
    return TinyTextToImagePipeline(
        unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=tiny_scheduler()
    )
