"""Prompt mapping: the option shared by unlearners that pair each concept prompt with another prompt (Concept
Ablation's anchors, SalUn's relabelled prompts, UCE's anchors), as one pydantic sub-model and its helpers.

A mapping is a keyword (e.g. 'farthest'), one word that replaces the concept word in each prompt, or explicit
prompts (one per concept prompt). In options it may be given as a string (keyword or word), a list of prompts, or
`{mode: ..., prompts: [...]}`.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import PluginConfig

FARTHEST = "farthest"
DROP = "drop"
RANDOM = "random"
_WORD = re.compile(r"^[A-Za-z][A-Za-z-]*$")


def check_word(value: str, option: str, keywords: tuple[str, ...]) -> str:
    """A remapping option is a keyword or one plain word (it replaces the concept word in each prompt)."""
    value = value.strip()
    if value in keywords or _WORD.match(value):
        return value
    raise ValueError(f"{option} must be one of {', '.join(keywords)} or a single word, got {value!r}")


def concept_in(prompt: str, concepts: list[str]) -> str:
    """The concept named in a prompt (longest match first); a BilevelError when it names none."""
    for c in sorted(concepts, key=len, reverse=True):
        if re.search(rf"(?<!\w){re.escape(c)}(?!\w)", prompt):
            return c
    raise BilevelError(
        f"prompt {prompt!r} names none of the concepts ({', '.join(concepts)}); give explicit target prompts instead"
    )


def replace_concept(prompt: str, concept: str, word: str | None) -> str:
    """Replace (or, with word None, drop) the concept word in a prompt; whitespace is normalised."""
    out = re.sub(rf"(?<!\w){re.escape(concept)}(?!\w)", word or "", prompt)
    return " ".join(out.split())


def alias_prompts(concept_prompts: list[str], concept: str, alias: str) -> list[str]:
    """Each concept prompt with the concept word replaced by the alias (the alias alone where a prompt does not
    name the concept, as Stable Diffusion's explicit concept prompts need not)."""
    return [q if (q := replace_concept(p, concept, alias)) != p else alias for p in concept_prompts]


def farthest_colour(concept: str, exclude: list[str]) -> str:
    """The tiny-world palette colour farthest (RGB) from `concept`, skipping `exclude` (the other concepts)."""
    from bilevel.worlds.tiny.palette import colour_names, palette_tensor

    names = colour_names()
    if concept not in names:
        raise BilevelError(
            f"'farthest' needs tiny-world colour concepts, got {concept!r} (accepted: {', '.join(names)}); "
            "give a replacement word or explicit prompts instead"
        )
    pal = palette_tensor()
    d = (pal - pal[names.index(concept)]).norm(dim=1)
    for i, n in enumerate(names):
        if n == concept or n in exclude:
            d[i] = -1.0
    if float(d.max()) < 0:
        raise BilevelError("every palette colour is a concept; no colour is left to map the concepts onto")
    return names[int(d.argmax())]


def non_concept_colours(concepts: list[str]) -> list[str]:
    """The tiny-world palette colours that are not concepts (SalUn's random relabelling draws from them)."""
    from bilevel.worlds.tiny.palette import colour_names

    left = [c for c in colour_names() if c not in concepts]
    if not left:
        raise BilevelError("every palette colour is a concept; no colour is left to map the concepts onto")
    return left


def remap_prompts(prompts: list[str], concepts: list[str], mode: str, option: str) -> list[str]:
    """One replacement prompt per prompt: mode 'farthest' (farthest non-concept palette colour), 'drop'
    (remove the concept word) or a literal word that replaces the concept word."""
    from bilevel.worlds.tiny.palette import is_style

    out = []
    for p in prompts:
        c = concept_in(p, concepts)
        if mode == FARTHEST and is_style(c):  # a style has no opposite: its partner prompt simply omits it
            out.append(replace_concept(p, c, None))
        elif mode == FARTHEST:
            out.append(replace_concept(p, c, farthest_colour(c, concepts)))
        elif mode == DROP:
            out.append(replace_concept(p, c, None))
        else:
            if mode in concepts:
                raise BilevelError(f"{option} {mode!r} is itself a concept; choose a word that is not being erased")
            out.append(replace_concept(p, c, mode))
    return out


def explicit_prompts(given: list[str], targets: list[str], option: str) -> list[str]:
    """The explicit prompts, checked to be one per concept prompt."""
    if len(given) != len(targets):
        raise BilevelError(
            f"{option} has {len(given)} prompts but there are {len(targets)} concept prompts; give one per concept prompt"
        )
    return list(given)


class PromptMapping(PluginConfig):
    """How each concept prompt maps to its partner prompt. Subclasses set `keywords` (the modes besides a word)."""

    keywords: ClassVar[tuple[str, ...]] = (FARTHEST,)

    mode: str = Field(
        FARTHEST,
        description="'farthest': the concept colour becomes the non-concept palette colour farthest from it (tiny "
        "world); another keyword the plugin accepts; or one word replacing the concept word",
    )
    prompts: list[str] | None = Field(None, description="explicit prompts, one per concept prompt (overrides mode)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """A string is the mode, a list the explicit prompts (so `--set anchor=drop` keeps working)."""
        if isinstance(value, str):
            return {"mode": value}
        if isinstance(value, (list, tuple)):
            return {"prompts": list(value)}
        return value

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        return check_word(value, "mode", cls.keywords)

    def map(self, concept_prompts: list[str], concepts: list[str], option: str) -> list[str]:
        """One partner prompt per concept prompt; `option` names the plugin's field in error messages."""
        if self.prompts is not None:
            return explicit_prompts(self.prompts, concept_prompts, f"{option}.prompts")
        return remap_prompts(concept_prompts, concepts, self.mode, option)
