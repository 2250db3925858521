"""A word-level tokenizer for digit prompts and the same small frozen CLIP text encoder as the tiny world."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from bilevel.plugins.worlds.digits.data import CLASS_NAMES
from bilevel.worlds.tiny.text import build_text_encoder as _tiny_text_encoder

SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
MAX_LENGTH = 8
#: Words beyond the two class names, so paraphrased prompts ("a picture of the number 7") tokenise to known ids.
FILLER = ["a", "an", "the", "handwritten", "digit", "number", "of", "in", "style", "with", "and", "picture", "written"]


def vocabulary() -> list[str]:
    numerals = [str(i) for i in range(len(CLASS_NAMES))]
    return list(dict.fromkeys(SPECIAL + FILLER + list(CLASS_NAMES) + numerals))


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()  # splits "7" as its own word
    tok.post_processor = TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=MAX_LENGTH,
    )


def build_text_encoder(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64) -> CLIPTextModel:
    """2-layer CLIP text model sized to the tokenizer (random init, frozen, as SD's CLIP is never trained)."""
    return _tiny_text_encoder(tokenizer, hidden_size)
