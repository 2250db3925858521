"""Render other conditioning in place of the concept prompts, through a world's own evaluator.

A world's `evaluate` samples its concept prompts and scores them with its detector; an attack that wraps the UNet
in `ConditioningSwap` makes those samples come from other text-encoder states (a paraphrase, a learned embedding)
while every other prompt group, the noise and the detector stay the world's own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ConditioningSwap(nn.Module):
    """`unet` whose conditioning rows equal one of `keys` (K, T, D) are replaced before the forward pass.

    per_key: a row matching key k gets values[k] (values (K, T, D)); otherwise the j-th matching row of each call
    gets values[j % M] (values (M, T, D)), so a prompt list is spread over the concept samples, the same sample
    getting the same prompt at every denoising step. `matched` counts replaced rows (0 after an evaluation: the
    world never rendered the keys, and the attack measured nothing).
    """

    def __init__(self, unet: nn.Module, keys: torch.Tensor, values: torch.Tensor, per_key: bool = True) -> None:
        super().__init__()
        if per_key and values.shape[0] != keys.shape[0]:
            raise ValueError(f"per_key needs one value per key, got {values.shape[0]} for {keys.shape[0]}")
        if values.shape[1:] != keys.shape[1:]:
            raise ValueError(f"values {tuple(values.shape[1:])} and keys {tuple(keys.shape[1:])} differ in shape")
        self.unet = unet
        self.keys = keys.detach()
        self.values = values.detach()
        self.per_key = per_key
        self.matched = 0

    def __getattr__(self, name: str) -> Any:  # config, dtype, device: the wrapped UNet's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def swap(self, states: torch.Tensor) -> torch.Tensor:
        keys = self.keys.to(states.device, states.dtype)
        same = (states.unsqueeze(1) == keys.unsqueeze(0)).flatten(2).all(-1)  # (B, K): exact, after the same cast
        rows = same.any(1).nonzero().flatten()
        if len(rows) == 0:
            return states
        out = states.clone()
        which = same[rows].float().argmax(1) if self.per_key else torch.arange(len(rows)) % len(self.values)
        out[rows] = self.values.to(states.device, states.dtype)[which.to(states.device)]
        self.matched += len(rows)
        return out

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        if encoder_hidden_states is not None:
            encoder_hidden_states = self.swap(encoder_hidden_states)
        return self.unet(sample, timestep, *args, encoder_hidden_states=encoder_hidden_states, **kwargs)
