"""The digits world as a plugin: `--model digits` (the shipped teacher) or any pipeline folder marked as a digits
pipeline (a `digits_world.json` marker, written by teacher training and kept by `bilevel export`).

Its priority is above the tiny world's, which claims every TinyTextToImagePipeline folder (the digits teacher is
one); an unmarked tiny folder is never claimed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from bilevel.core.config import RunConfig
from bilevel.core.errors import BilevelError
from bilevel.core.world import Purpose, World, WorldPlugin
from bilevel.plugins.worlds.digits.data import INSTALL_HINT, parse_digit

NAME = "digits"
MARKER = "digits_world.json"
MARKER_FORMAT = "bilevel-digits-world/1"
SHIPPED_TEACHER = Path(__file__).resolve().parents[3] / "assets" / "digits-teacher"
#: the concept a digits run erases when none is given (docs/digits-world.md says why seven)
DEFAULT_CONCEPT = "seven"
#: the global default concept (a tiny-world colour): left untouched, it means "the world's default"
GLOBAL_DEFAULT = ["purple"]
#: unlearners whose default prompt mapping ('farthest') is a tiny-world colour: option name per unlearner
MAPPED_OPTIONS = {"concept-ablation": "anchor", "salun": "relabel"}
SD_ONLY_DATA = ("finetune_data", "concept_data", "concept_prompts", "retain_prompts", "resolution")


def write_marker(folder: Path) -> None:
    """Mark a pipeline folder as a digits-world teacher, so `--model FOLDER` resolves to this world."""
    (Path(folder) / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "world": NAME}, indent=1) + "\n")


def is_digits_pipeline(source: str) -> bool:
    """'digits', or a pipeline folder carrying the marker. Cheap, never raises."""
    if source == NAME:
        return True
    path = Path(source).expanduser()
    try:
        return (path / "model_index.json").is_file() and (path / MARKER).is_file()
    except OSError:
        return False


def teacher_folder(source: str) -> Path:
    return SHIPPED_TEACHER if source == NAME else Path(source).expanduser()


def partner_prompts(concepts: list[str]) -> list[str]:
    """One prompt per concept prompt, naming the farthest non-concept digit under the same name (word or numeral)."""
    from bilevel.plugins.worlds.digits.data import prompts_for
    from bilevel.plugins.worlds.digits.neighbours import farthest_digit

    digits = [parse_digit(c) for c in concepts]
    return [p for d in digits for p in prompts_for(farthest_digit(d, set(digits)))]


class DigitsWorldPlugin(WorldPlugin):
    name: ClassVar[str] = NAME
    description: ClassVar[str] = (
        "real 8x8 handwritten digits (scikit-learn); concepts are digits; CNN classifier detector, Frechet distance"
    )
    priority: ClassVar[int] = 20
    api_version = 2

    def accepts(self, source: str) -> bool:
        return is_digits_pipeline(source)

    def check(self, config: RunConfig, purpose: Purpose) -> None:
        """Concepts are digits ('seven' or '7'); a config that never set concepts gets this world's default one
        (written back into the config, so config.json and the tables name it)."""
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise BilevelError(INSTALL_HINT) from None
        if config.concepts == GLOBAL_DEFAULT and "concepts" not in config.model_fields_set:
            config.concepts = [DEFAULT_CONCEPT]
        digits = [parse_digit(c) for c in config.concepts]
        if len(set(digits)) < len(digits):
            raise BilevelError(
                f"concepts {config.concepts} name one digit twice (a word and its numeral name one class)"
            )
        if len(digits) >= 10:
            raise BilevelError("every digit is a concept; leave at least one class to fine-tune on")
        given = [k for k in SD_ONLY_DATA if getattr(config.data, k) is not None]
        if given:
            raise BilevelError(
                f"data.{given[0]} applies to Stable Diffusion models; the digits world reads its own real digits"
            )
        option = MAPPED_OPTIONS.get(config.unlearner.name)
        if purpose == "run" and option and option not in config.unlearner.options:
            listed = ", ".join(f"'{p}'" for p in partner_prompts(config.concepts))
            raise BilevelError(
                f"{config.unlearner.name}'s default {option} ('farthest') is a tiny-world colour; on the digits world "
                f'give one prompt per concept prompt, e.g. --set "unlearner.options.{option}=[{listed}]" '
                "(the digit farthest from the concept in the detector's features)"
            )

    def build(self, config: RunConfig, purpose: Purpose) -> World:
        from bilevel.plugins.worlds.digits.world import DigitsWorld
        from bilevel.worlds.models import load_tiny_pipeline

        m, d = config.model, config.data
        folder = teacher_folder(m.source)
        pipe = load_tiny_pipeline(str(folder), m.device)
        return DigitsWorld.build(
            pipe, folder, config.concepts, d.finetune_size, d.concept_size, d.seed, m.device, m.mixed_precision
        )
