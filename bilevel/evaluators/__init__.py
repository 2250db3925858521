"""Evaluators for real (Stable-Diffusion-scale) images: CLIP score, a zero-shot CLIP concept detector, a CLIP-feature
Fréchet distance and an optional NudeNet detector.

Exports resolve lazily (PEP 562) so that importing the package, e.g. for `EvaluatorConfig` in a run config, pulls in
neither torch nor transformers: bilevel's CLI must stay fast to import.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bilevel.core.evaluator_config import EvaluatorConfig
    from bilevel.evaluators.clip import ClipConceptDetector, ClipScorer
    from bilevel.evaluators.frechet import frechet_distance, frechet_distance_from_moments, frechet_distance_to_folder
    from bilevel.evaluators.nudity import NUDENET_EXPLICIT_CLASSES, NUDENET_EXPOSED_CLASSES, NudityDetector

_EXPORTS = {
    "ClipScorer": "clip",
    "ClipConceptDetector": "clip",
    "EvaluatorConfig": "bilevel.core.evaluator_config",  # a config model: it lives with the contracts
    "frechet_distance": "frechet",
    "frechet_distance_from_moments": "frechet",
    "frechet_distance_to_folder": "frechet",
    "NudityDetector": "nudity",
    "NUDENET_EXPLICIT_CLASSES": "nudity",
    "NUDENET_EXPOSED_CLASSES": "nudity",
}

__all__ = [
    "NUDENET_EXPLICIT_CLASSES",
    "NUDENET_EXPOSED_CLASSES",
    "ClipConceptDetector",
    "ClipScorer",
    "EvaluatorConfig",
    "NudityDetector",
    "frechet_distance",
    "frechet_distance_from_moments",
    "frechet_distance_to_folder",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module if "." in module else f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
