"""Params, MACs and measured forward latency of a UNet.

Two MAC counts: `macs` (torch's FlopCounterMode: every matmul, convolution and scaled-dot-product attention, so the
attention a channel pruner leaves untouched is counted) and `macs_layers` (torch-pruning's layer counter, which
omits attention matmuls: what pruning papers report, kept for comparison with them)."""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelStats:
    params: int
    macs: int  # attention included (FlopCounterMode / 2)
    latency_ms: float
    latency_batch: int
    macs_layers: int = 0  # torch-pruning's count (no attention matmuls)

    def to_json(self) -> dict:
        return asdict(self)


def example_inputs(unet: nn.Module, batch: int = 1) -> dict[str, torch.Tensor]:
    cfg = unet.config
    p = next(unet.parameters())
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return {
        "sample": torch.randn(batch, cfg.in_channels, size, size, device=p.device, dtype=p.dtype),
        "timestep": torch.tensor([10] * batch, device=p.device),
        "encoder_hidden_states": torch.randn(batch, 8, cfg.cross_attention_dim, device=p.device, dtype=p.dtype),
    }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs_with_attention(unet: nn.Module) -> int:
    """MACs of one forward at batch 1 and the model's sample size, attention matmuls included (FLOPs / 2)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # the math backend spells attention as matmuls, which every device's counter sees (the fused CPU kernel is not
    # registered with FlopCounterMode, so it would count as zero)
    with sdpa_kernel(SDPBackend.MATH), counter:
        unet(**example_inputs(unet, 1))
    return int(counter.get_total_flops() // 2)


def count_macs(unet: nn.Module) -> int:
    """MACs of one forward at batch 1 and the model's sample size (torch-pruning's layer counter: no attention
    matmuls; the MAC targets of channel pruners are shares of this count, as in the pruning literature)."""
    import torch_pruning as tp

    with contextlib.redirect_stdout(io.StringIO()):  # the counter prints a batch-size warning
        macs, _ = tp.utils.count_ops_and_params(_Wrapped(unet), example_inputs(unet, 1))
    return int(macs)


@torch.no_grad()
def measure_latency_ms(unet: nn.Module, batch: int = 64, repeats: int = 10) -> float:
    """Median wall time of one forward (after two warm-ups)."""
    inputs = example_inputs(unet, batch)
    sync = torch.cuda.synchronize if inputs["sample"].is_cuda else (lambda: None)
    for _ in range(2):
        unet(**inputs)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        unet(**inputs)
        sync()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def model_stats(unet: nn.Module, latency_batch: int = 64, repeats: int = 10) -> ModelStats:
    was_training = unet.training
    unet.eval()
    stats = ModelStats(
        count_params(unet), count_macs_with_attention(unet), measure_latency_ms(unet, latency_batch, repeats),
        latency_batch, count_macs(unet),
    )  # fmt: skip
    unet.train(was_training)
    return stats


class _Wrapped(nn.Module):
    """Returns a tensor (not a diffusers output object) so op counters and graph tracers accept the UNet."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
