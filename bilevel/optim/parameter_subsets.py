"""Named parameter subsets an unlearner may train (e.g. ESD-x's cross-attention, UCE's keys and values)."""

from __future__ import annotations

from torch import nn


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}


def select_subset(model: nn.Module, subset: str) -> dict[str, nn.Parameter]:
    """cross-attention-kv: to_k/to_v of every cross-attention; attention: every parameter of every attention
    (self and cross); full: all parameters."""
    params = dict(model.named_parameters())
    if subset == "full":
        return params
    chosen: set[str] = set()
    for name, m in attention_modules(model).items():
        if subset == "attention":
            chosen.update(f"{name}.{k}" for k, _ in m.named_parameters())
        elif subset == "cross-attention-kv" and m.is_cross_attention:
            chosen.update(f"{name}.to_k.{k}" for k, _ in m.to_k.named_parameters())
            chosen.update(f"{name}.to_v.{k}" for k, _ in m.to_v.named_parameters())
    return {k: v for k, v in params.items() if k in chosen}
