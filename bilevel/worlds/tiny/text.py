"""A word-level tokenizer and a small CLIP text encoder for tiny-world prompts (built offline, no hub)."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from bilevel.worlds.tiny.palette import SHAPES, colour_names

SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
MAX_LENGTH = 8


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = SPECIAL + ["a", "shape", "of", "in", "the", "style", "with", "and"] + colour_names() + list(SHAPES)
    return word_level_tokenizer(words)


def word_level_tokenizer(words: list[str], max_length: int = MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over `words` (SPECIAL first; duplicates dropped), wrapping prompts in
    [BOS] ... [EOS] and padding to `max_length`: small worlds' prompts need no subword model."""
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=max_length,
    )


def build_text_encoder(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        projection_dim=hidden_size,
    )
    return CLIPTextModel(config).eval()
