"""A word-level tokenizer and a small CLIP text encoder for tiny-world prompts (built offline, no hub)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from bilevel.worlds.tiny.palette import ALIASES, COLOURS, SHAPES, STYLES, colour_names

SPECIAL = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
MAX_LENGTH = 8


def build_tokenizer() -> PreTrainedTokenizerFast:
    names = [w for c in colour_names() for w in (c, ALIASES[c])] + [w for s in STYLES.items() for w in s]
    words = SPECIAL + ["a", "shape", "of", "in", "the", "style", "with", "and"] + names + list(SHAPES)
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


def give_names_meaning(text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerFast, seed: int = 0,
                       shared: float = 0.5) -> None:
    """Make the frozen encoder's word embeddings carry meaning, as a pretrained CLIP's do: a colour word's embedding
    is `shared` parts a direction given by its RGB (a fixed random projection of the colour, so similar colours get
    similar embeddings and a colour's two names point the same way) and the rest a direction of its own; the style's
    two names share a direction likewise. Without this every word is an unrelated random vector and what a student
    can do with a colour it never saw depends only on what its weights happened to keep."""
    emb = text_encoder.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    dim = emb.shape[1]
    scale = emb.detach().norm(dim=1).mean()
    projection = torch.randn(dim, 3, generator=gen)
    rgb = torch.tensor([COLOURS[c] for c in colour_names()], dtype=torch.float32) / 255.0
    centred = rgb - rgb.mean(0)
    groups = {c: (projection @ centred[i], [c, ALIASES[c]]) for i, c in enumerate(colour_names())}
    groups.update({s: (torch.randn(dim, generator=gen), [s, alias]) for s, alias in STYLES.items()})
    vocab = tokenizer.get_vocab()
    with torch.no_grad():
        for direction, words in groups.values():
            common = direction / direction.norm()
            for word in words:
                own = torch.randn(dim, generator=gen)
                mixed = shared**0.5 * common + (1 - shared) ** 0.5 * own / own.norm()
                emb[vocab[word]] = scale * mixed / mixed.norm()
