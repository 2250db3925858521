"""Tiny Stable-Diffusion-format models built offline, for tests of the real-SD path and the evaluators.

build_tiny_sd writes a `StableDiffusionPipeline` folder (tiny VAE, SD-shaped UNet, tiny CLIP text encoder and a BPE
CLIPTokenizer from a vocab.json/merges.txt written here, DDIM scheduler); build_tiny_clip writes a tiny `CLIPModel`
with its tokenizer and image processor. Random weights: the tests check mechanics, not image quality.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

LATENT_SIZE = 8  # latent side; the VAE has two stages (factor 2), so images are 16x16
IMAGE_SIZE = 16
TEXT_DIM = 32
MAX_TOKENS = 16
WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "an",
    "in",
    "style",
    "painting",
    "picture",
    "van",
    "gogh",
    "monet",
    "cat",
    "dog",
    "red",
    "blue",
    "green",
    "tree",
    "house",
    "by",
    "with",
    "and",
    "on",
    "sky",
    "field",
    "portrait",
    "landscape",
]


def write_clip_bpe(folder: Path) -> Path:
    """vocab.json + merges.txt for a CLIPTokenizer: every letter/digit (inner and word-final) plus a few words."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in WORDS:  # merge each word left to right, so whole words become single tokens
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            tokens.append(pieces[0])
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return folder


def tiny_tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    src = write_clip_bpe(Path(tmp) / "bpe")
    return CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=MAX_TOKENS)


def _text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_DIM,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_unet_config() -> dict:
    """SD's layout in miniature: 4 stages, 2 layers per block, cross-attention stages and mid block."""
    return {
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": (8, 16, 16, 16),
        "layers_per_block": 2,
        "norm_num_groups": 4,
        "cross_attention_dim": TEXT_DIM,
        "attention_head_dim": 2,
    }


def build_tiny_sd(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a StableDiffusionPipeline folder (random weights, safetensors) and return its path."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(folder.parent / f".{folder.name}-src")
    text_encoder = CLIPTextModel(_text_config(len(tokenizer))).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )
    unet = UNet2DConditionModel(**tiny_unet_config())
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Write a tiny CLIPModel with its tokenizer and image processor (loadable with from_pretrained)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(folder.parent / f".{folder.name}-src")
    vision = CLIPVisionConfig(
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=4,
        projection_dim=TEXT_DIM,
    )
    config = CLIPConfig(
        text_config=_text_config(len(tokenizer)).to_dict(), vision_config=vision.to_dict(), projection_dim=TEXT_DIM
    )
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
    )
    model.save_pretrained(str(folder), safe_serialization=True)
    processor.save_pretrained(str(folder))
    return folder


def write_random_pngs(folder: Path, count: int, seed: int, size: int = IMAGE_SIZE) -> list[Path]:
    """`count` random RGB PNGs (0.png, 1.png, ...) in a new folder: image data for SD-world tests."""
    from PIL import Image

    folder.mkdir()
    gen = torch.Generator().manual_seed(seed)
    paths = [folder / f"{i}.png" for i in range(count)]
    for path in paths:
        Image.fromarray((torch.rand(size, size, 3, generator=gen) * 255).byte().numpy()).save(path)
    return paths
