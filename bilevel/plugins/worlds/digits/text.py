"""A word-level tokenizer for digit prompts and the same small frozen CLIP text encoder as the tiny world."""

from __future__ import annotations

from transformers import CLIPTextModel, PreTrainedTokenizerFast

from bilevel.plugins.worlds.digits.data import CLASS_NAMES
from bilevel.worlds.tiny.text import build_text_encoder as _tiny_text_encoder
from bilevel.worlds.tiny.text import word_level_tokenizer

SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
MAX_LENGTH = 8
#: Words beyond the two class names, so paraphrased prompts ("a picture of the number 7") tokenise to known ids.
FILLER = ["a", "an", "the", "handwritten", "digit", "number", "of", "in", "style", "with", "and", "picture", "written"]


def vocabulary() -> list[str]:
    numerals = [str(i) for i in range(len(CLASS_NAMES))]
    return list(dict.fromkeys(SPECIAL + FILLER + list(CLASS_NAMES) + numerals))


def build_tokenizer() -> PreTrainedTokenizerFast:
    return word_level_tokenizer(vocabulary(), MAX_LENGTH)  # Whitespace pre-tokenising splits "7" as its own word


def build_text_encoder(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64) -> CLIPTextModel:
    """2-layer CLIP text model sized to the tokenizer (random init, frozen, as SD's CLIP is never trained)."""
    return _tiny_text_encoder(tokenizer, hidden_size)
