"""`paraphrase`: the concept under other names (the world's aliases, or a user's prompt file such as an I2P or
Ring-A-Bell export), rendered in place of the concept prompts and scored by the world's own detector."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from bilevel.core.attack import Attack, AttackConfig, AttackResult
from bilevel.core.errors import BilevelError
from bilevel.toolkit import alias_prompts, measure_swapped_rate, read_prompt_file


class ParaphraseConfig(AttackConfig):
    prompts: Path | None = Field(
        None, description="a .csv (its prompt column, e.g. an I2P export) or .txt file (one prompt per line), spread "
        "over the concept samples in place of the concept prompts"
    )  # fmt: skip
    limit: int = Field(256, gt=0, description="use at most this many prompts of the file")
    aliases: bool = Field(True, description="try each of the world's aliases of the concept (World.concept_aliases)")


class Paraphrase(Attack):
    name: ClassVar[str] = "paraphrase"
    description: ClassVar[str] = "the concept under other names: the world's aliases or a prompt file (best variant)"
    Config = ParaphraseConfig
    api_version = 2

    def run(self, unet, world, concept, evaluation) -> AttackResult:
        cfg: ParaphraseConfig = self.config  # type: ignore[assignment]
        offered = getattr(world, "concept_aliases", None)
        aliases = [a for a in (offered(concept) if callable(offered) and cfg.aliases else []) if a != concept]
        if not aliases and cfg.prompts is None:
            raise BilevelError(
                f"paraphrase: world {world.name!r} offers no aliases of {concept!r} and no prompt file was given; "
                "pass --set paraphrase.prompts=FILE (.csv with a prompt column, or .txt with one prompt per line)"
            )
        variants: dict[str, list[str]] = {
            f"alias:{a}": alias_prompts(world.concept_prompts(concept), concept, a) for a in aliases
        }
        if cfg.prompts is not None:
            variants[f"file:{cfg.prompts.name}"] = read_prompt_file(cfg.prompts, cfg.limit)
        rates = {}
        for label, prompts in variants.items():
            per_key = label.startswith("alias:")
            rates[label] = measure_swapped_rate(
                world, unet, concept, evaluation, cfg.samples, cfg.sampler_steps, world.bank(prompts), per_key
            )
        best = max(rates, key=lambda k: rates[k].rate)  # the attacker keeps the variant that works best
        return AttackResult(
            attack=self.name, concept=concept, concept_rate=rates[best].rate, interval=rates[best].interval,
            samples=rates[best].samples,
            used={
                "best": best,
                "variants": {k: {"concept_rate": m.rate, "interval": m.interval} for k, m in rates.items()},
                "prompts": {k: v[:8] for k, v in variants.items()},
                "prompt_count": {k: len(v) for k, v in variants.items()},
            },
        )  # fmt: skip
