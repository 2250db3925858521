"""Magnitude pruner: structured channel pruning by the L_p norm of each coupled channel group (torch-pruning)."""

from __future__ import annotations

from pydantic import Field

from ...core.channel_pruning import check_forward, prune_unet_channels
from ...core.interfaces import CalibrationBatch, PluginConfig, Pruner, PruneResult


class MagnitudeConfig(PluginConfig):
    ratio: float = Field(0.3, gt=0, lt=1, description="share of channels removed per layer group")
    p: int = Field(2, ge=1, description="norm order of the magnitude score")
    keep_time_embedding: bool = Field(True, description="never prune the timestep embedding MLP")


class MagnitudePruner(Pruner):
    name = "magnitude"
    description = "Structured channel pruning by weight magnitude (torch-pruning MagnitudeImportance)."
    Config = MagnitudeConfig
    api_version = 2

    def prune(self, teacher, calibration: CalibrationBatch | None) -> PruneResult:
        import torch_pruning as tp

        cfg: MagnitudeConfig = self.config
        student, pairs = prune_unet_channels(
            teacher, tp.importance.MagnitudeImportance(p=cfg.p), cfg.ratio, keep_time_embedding=cfg.keep_time_embedding
        )
        check_forward(student)
        return PruneResult(
            student=student, manifest={"pruner": self.name, "options": cfg.model_dump()}, feature_pairs=pairs
        )
