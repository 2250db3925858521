"""Random structured channel pruning: every coupled channel group gets a random importance, and the lowest
`ratio` share is removed. It is the standard sanity baseline of pruning papers (e.g. Li et al., "Pruning Filters for
Efficient ConvNets", ICLR 2017; Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019; Fang et al.,
"DepGraph: Towards Any Structural Pruning", CVPR 2023, whose torch-pruning provides `RandomImportance`): a pruner
that does not beat it at equal size and fine-tuning budget has not shown that its importance criterion matters.

It uses bilevel's shared channel-pruning engine (`bilevel.core.channel_pruning.prune_unet_channels`), so the
diffusers specifics (attention heads, samplers, the kept output conv) and the feature-KD channel bookkeeping are
the same as for the built-in `magnitude` and `diff-pruning` pruners; only the importance differs. The draw is
seeded and does not touch torch's global random state.
"""

from __future__ import annotations

import torch
from pydantic import Field

from bilevel.core.channel_pruning import check_forward, prune_unet_channels
from bilevel.core.interfaces import CalibrationBatch, PluginConfig, Pruner, PruneResult


class RandomConfig(PluginConfig):
    ratio: float = Field(0.3, gt=0, lt=1, description="share of channels removed per layer group")
    seed: int = Field(0, description="seed of the random importance (same seed, same student)")
    keep_time_embedding: bool = Field(True, description="never prune the timestep embedding MLP")


def seeded_random_importance(seed: int):
    """torch-pruning's RandomImportance with its own generator instead of the global one."""
    import torch_pruning as tp

    class SeededRandomImportance(tp.importance.RandomImportance):
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(seed)

        @torch.no_grad()
        def __call__(self, group, **kwargs):
            _, idxs = group[0]
            return torch.rand(len(idxs), generator=self.generator)

    return SeededRandomImportance()


class RandomPruner(Pruner):
    name = "random"
    description = "Structured channel pruning with random channel importance (the baseline of pruning papers)."
    Config = RandomConfig
    api_version = 2

    def prune(self, teacher, calibration: CalibrationBatch | None) -> PruneResult:
        cfg: RandomConfig = self.config
        student, pairs = prune_unet_channels(
            teacher, seeded_random_importance(cfg.seed), cfg.ratio, keep_time_embedding=cfg.keep_time_embedding
        )
        check_forward(student)
        return PruneResult(
            student=student, manifest={"pruner": self.name, "options": cfg.model_dump()}, feature_pairs=pairs
        )
