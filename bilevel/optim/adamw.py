"""The one AdamW every training loop here builds: weight decay 0 (masked unlearners rely on untouched masked
weights) and, on a CPU, torch's fused kernel.

Why fused: a small diffusion UNet has hundreds of parameter tensors, and the reference (per-tensor) AdamW pays a
few Python-dispatched ops per tensor per step. On the tiny teacher's 684 tensors one step costs about 32 ms that
way and 5 ms fused (`benchmarks/bench_optimizer.py`), about 5% of a tiny-world KD step. On CUDA torch's own
default (multi-tensor) stays: fused there would have to cooperate with the fp16 loss scaler, and the step is not
where a GPU run spends its time."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable[torch.Tensor], lr: float) -> torch.optim.AdamW:
    """AdamW(lr, weight_decay=0) over `params`, fused when they live on a CPU."""
    params = list(params)
    fused = bool(params) and params[0].device.type == "cpu"
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **({"fused": True} if fused else {}))
