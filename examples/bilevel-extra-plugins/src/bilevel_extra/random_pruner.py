"""Random structured channel pruning: every coupled channel group gets a random importance, and the lowest
`ratio` share is removed. It is the standard sanity baseline of pruning papers (e.g. Li et al., "Pruning Filters for
Efficient ConvNets", ICLR 2017; Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019; Fang et al.,
"DepGraph: Towards Any Structural Pruning", CVPR 2023, whose torch-pruning provides `RandomImportance`): a pruner
that does not beat it at equal size and fine-tuning budget has not shown that its importance criterion matters.

It uses bilevel's shared channel-pruning engine (`bilevel.compression.channel_pruning.prune_unet_channels`), so the
diffusers specifics (attention heads, samplers, the kept output conv) and the feature-KD channel bookkeeping are
the same as for the built-in `magnitude` and `diff-pruning` pruners; only the importance differs. The draw is
seeded and does not touch torch's global random state.
"""

from __future__ import annotations

import torch
from pydantic import Field

from bilevel import CalibrationBatch
from bilevel.toolkit import ChannelPruner, ChannelPrunerConfig, ChannelScores


class RandomConfig(ChannelPrunerConfig):
    seed: int = Field(0, description="seed of the random importance (same seed, same student)")


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


class RandomPruner(ChannelPruner):
    name = "random"
    description = "Structured channel pruning with random channel importance (the baseline of pruning papers)."
    Config = RandomConfig
    api_version = 2

    def scores(self, teacher, calibration: CalibrationBatch | None) -> ChannelScores:
        return ChannelScores(seeded_random_importance(self.config.seed))
