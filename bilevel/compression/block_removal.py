"""BK-SDM block removal (Kim et al., 2023) for any SD-shaped diffusers `UNet2DConditionModel`.

The student is an ordinary `UNet2DConditionModel` built from a config, so it saves and reloads through
`compression.student_io` like any model (its shapes already match its config):

- base:  `layers_per_block=1`. Each down stage keeps its first resnet/attention (index 0); each up stage keeps two
  of its L+1 layers: index 0 and the last one (for SD's L=2: indices 0 and 2; student index 1 takes teacher index 2,
  whose skip connection has the same width). diffusers builds up stages with `layers_per_block + 1` layers, so
  `layers_per_block=1` gives exactly BK-SDM's "1 down, 2 up". Mid block kept.
- small: base with `mid_block_type=None`.
- tiny:  small without the innermost stage (`down_blocks[-1]`, the downsampler of `down_blocks[-2]`, `up_blocks[0]`);
  student `up_blocks[i]` takes teacher `up_blocks[i+1]`.

Every student tensor is copied from the teacher tensor it maps to (see `teacher_key`); nothing is left random.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import FeaturePair

VARIANTS = ("base", "small", "tiny")
DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
#: Config fields that may hold one value per stage, in down-block order (tiny drops the innermost = last entry).
PER_STAGE_DOWN_ORDER = (
    "down_block_types", "block_out_channels", "layers_per_block", "transformer_layers_per_block",
    "attention_head_dim", "num_attention_heads", "cross_attention_dim", "only_cross_attention",
)  # fmt: skip
#: Per-stage fields in up-block order (tiny drops the innermost = first entry).
PER_STAGE_UP_ORDER = ("up_block_types", "reverse_transformer_layers_per_block")

_BLOCK_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(.+)$")
_LAYER_KEY = re.compile(r"^(resnets|attentions)\.(\d+)\.(.+)$")


def _per_stage(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def check_compatible(config: dict[str, Any], variant: str) -> None:
    """Raise BilevelError (one line) when the UNet's shape does not allow the BK-SDM variant."""
    if variant not in VARIANTS:
        raise BilevelError(f"unknown bk-sdm variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    bad = [t for t in down if t not in DOWN_TYPES] + [t for t in up if t not in UP_TYPES]
    if bad:
        raise BilevelError(
            f"bk-sdm cannot remove blocks from {sorted(set(bad))}; accepted block types: {', '.join(DOWN_TYPES + UP_TYPES)}"
        )
    if len(down) != len(up):
        raise BilevelError(f"bk-sdm needs as many up as down stages; this UNet has {len(down)} down and {len(up)} up")
    layers = _per_stage(config["layers_per_block"], len(down))
    if min(layers) < 2:
        raise BilevelError(
            f"bk-sdm needs at least 2 layers per down stage to remove one; this UNet has layers_per_block={config['layers_per_block']}"
        )
    tlayers = config.get("transformer_layers_per_block", 1)
    if isinstance(tlayers, (list, tuple)) and any(isinstance(t, (list, tuple)) for t in tlayers):
        raise BilevelError("bk-sdm supports one transformer depth per stage; this UNet sets per-layer depths")
    if config.get("reverse_transformer_layers_per_block") is not None:
        raise BilevelError("bk-sdm supports symmetric UNets only; this UNet sets reverse_transformer_layers_per_block")
    if variant == "tiny":
        channels = list(config["block_out_channels"])
        if len(channels) < 2:
            raise BilevelError(
                f"bk-sdm tiny removes the innermost stage and needs at least 2 stages; this UNet has {len(channels)}"
            )
        if channels[-1] != channels[-2]:
            raise BilevelError(
                "bk-sdm tiny needs the two innermost stages to have equal widths (as SD's 1280, 1280); "
                f"this UNet has block_out_channels={tuple(channels)}"
            )


def student_config(config: dict[str, Any], variant: str) -> dict[str, Any]:
    """The diffusers config of the BK-SDM student of a UNet with this config."""
    check_compatible(config, variant)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg["layers_per_block"] = 1
    if variant in ("small", "tiny"):
        cfg["mid_block_type"] = None
    if variant == "tiny":
        n = len(cfg["down_block_types"])
        for key in PER_STAGE_DOWN_ORDER:
            if isinstance(cfg.get(key), (list, tuple)) and len(cfg[key]) == n:
                cfg[key] = list(cfg[key])[:-1]
        for key in PER_STAGE_UP_ORDER:
            if isinstance(cfg.get(key), (list, tuple)) and len(cfg[key]) == n:
                cfg[key] = list(cfg[key])[1:]
    return cfg


def teacher_key(student_key: str, variant: str, teacher_layers: Sequence[int]) -> str:
    """The teacher state-dict key a student key is initialised from.

    teacher_layers: the teacher's layers_per_block per down stage (its up stage i has reversed(...)[i] + 1 layers).
    """
    m = _BLOCK_KEY.match(student_key)
    if m is None:
        return student_key  # conv_in, time embedding, mid block (base), conv_norm_out, conv_out, ...
    kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
    layer = _LAYER_KEY.match(rest)
    if kind == "down_blocks":
        if layer is not None and int(layer.group(2)) != 0:
            raise ValueError(f"BK-SDM student has one layer per down stage; unexpected key {student_key}")
        return student_key  # down stage i keeps index 0 and its downsampler
    t_index = index + (1 if variant == "tiny" else 0)
    if layer is None:
        return f"up_blocks.{t_index}.{rest}"  # upsamplers
    j = int(layer.group(2))
    last = list(reversed(teacher_layers))[t_index]  # the teacher up stage has last + 1 layers: 0..last
    t_layer = {0: 0, 1: last}.get(j)
    if t_layer is None:
        raise ValueError(f"BK-SDM student has two layers per up stage; unexpected key {student_key}")
    return f"up_blocks.{t_index}.{layer.group(1)}.{t_layer}.{layer.group(3)}"


def feature_pairs(config: dict[str, Any], variant: str) -> list[FeaturePair]:
    """BK-SDM's feature-KD pairs (its released training code): every down and up block output, mid block excluded.

    Tiny: the student's innermost down stage has no downsampler, so it is matched before the teacher's
    (`...attentions.<last>.proj_out`, or the last resnet in a stage without attention); student up_blocks[i]
    matches teacher up_blocks[i+1].
    """
    n = len(config["down_block_types"])
    if variant != "tiny":
        names = [f"down_blocks.{i}" for i in range(n)] + [f"up_blocks.{i}" for i in range(n)]
        return [FeaturePair(name, name) for name in names]
    pairs = [FeaturePair(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(n - 2)]
    inner = n - 2
    last = _per_stage(config["layers_per_block"], n)[inner] - 1
    if config["down_block_types"][inner] == "CrossAttnDownBlock2D":
        pairs.append(
            FeaturePair(f"down_blocks.{inner}.attentions.0.proj_out", f"down_blocks.{inner}.attentions.{last}.proj_out")
        )
    else:
        pairs.append(FeaturePair(f"down_blocks.{inner}.resnets.0", f"down_blocks.{inner}.resnets.{last}"))
    pairs += [FeaturePair(f"up_blocks.{i}", f"up_blocks.{i + 1}") for i in range(n - 1)]
    return pairs


def remove_blocks(teacher: nn.Module, variant: str = "small") -> tuple[nn.Module, list[FeaturePair], dict[str, str]]:
    """Build the BK-SDM student of `teacher` (left unchanged) with the teacher's weights copied in.

    Returns (student in eval mode, float32, trainable; feature pairs; student key -> teacher key map).
    """
    from diffusers import UNet2DConditionModel

    if not isinstance(teacher, UNet2DConditionModel):
        raise BilevelError(f"bk-sdm prunes a diffusers UNet2DConditionModel; got {type(teacher).__name__}")
    t_config = dict(teacher.config)
    cfg = student_config(t_config, variant)
    n = len(t_config["down_block_types"])
    teacher_layers = _per_stage(t_config["layers_per_block"], n)
    device = next(teacher.parameters()).device
    student = _build_empty(UNet2DConditionModel, cfg, device)
    t_state = teacher.state_dict()
    key_map: dict[str, str] = {}
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in student.state_dict().items():
        src = teacher_key(key, variant, teacher_layers)
        if src not in t_state or tuple(t_state[src].shape) != tuple(tensor.shape):
            raise RuntimeError(f"BK-SDM mapping error: student {key} {tuple(tensor.shape)} <- teacher {src}")
        key_map[key] = src
        mapped[key] = t_state[src]
    student.load_state_dict(mapped, strict=True)  # copies (and casts to float32)
    student.eval().requires_grad_(True)
    return student, feature_pairs(t_config, variant), key_map


def _build_empty(cls: type, config: dict[str, Any], device: torch.device) -> nn.Module:
    """Construct without random initialisation (every tensor is overwritten by the teacher's) when that is safe."""
    with torch.device("meta"):
        model = cls.from_config(config)
    persistent = set(model.state_dict())
    transient = [n for n, _ in model.named_buffers() if n not in persistent]
    if transient:  # buffers the state dict does not carry would stay uninitialised: build normally instead
        return cls.from_config(config).float().to(device)
    return model.to_empty(device=device).float()
