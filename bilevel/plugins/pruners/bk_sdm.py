"""BK-SDM pruner (Kim et al., 2023): architectural block removal, student initialised from the teacher's weights."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from bilevel.core.interfaces import CalibrationBatch, PluginConfig, Pruner, PruneResult
from bilevel.toolkit import check_forward, remove_blocks


class BKSDMConfig(PluginConfig):
    variant: Literal["base", "small", "tiny"] = Field(
        "small",
        description="base: one layer per down stage, two per up stage, mid block kept; small: base without the mid "
        "block; tiny: small without the innermost stage",
    )


class BKSDMPruner(Pruner):
    name = "bk-sdm"
    description = "BK-SDM block removal (base/small/tiny); the student starts from the teacher's weights."
    Config = BKSDMConfig
    api_version = 2

    def prune(self, teacher, calibration: CalibrationBatch | None) -> PruneResult:
        cfg: BKSDMConfig = self.config
        student, pairs, key_map = remove_blocks(teacher, cfg.variant)
        check_forward(student)
        removed = len(set(teacher.state_dict()) - set(key_map.values()))
        return PruneResult(
            student=student,
            manifest={},
            feature_pairs=pairs,
            notes={"variant": cfg.variant, "teacher_tensors_dropped": removed},
        )
