"""Magnitude pruner: structured channel pruning by the L_p norm of each coupled channel group (torch-pruning)."""

from __future__ import annotations

from pydantic import Field

from bilevel.core.interfaces import CalibrationBatch
from bilevel.toolkit import ChannelPruner, ChannelPrunerConfig, ChannelScores


class MagnitudeConfig(ChannelPrunerConfig):
    p: int = Field(2, ge=1, description="norm order of the magnitude score")


class MagnitudePruner(ChannelPruner):
    name = "magnitude"
    description = "Structured channel pruning by weight magnitude (torch-pruning MagnitudeImportance)."
    Config = MagnitudeConfig
    api_version = 2

    def scores(self, teacher, calibration: CalibrationBatch | None) -> ChannelScores:
        import torch_pruning as tp

        return ChannelScores(tp.importance.MagnitudeImportance(p=self.config.p))
