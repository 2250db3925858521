"""Prompt embeddings computed once and reused: the text encoder is frozen, so re-encoding every step is waste."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class PromptBank:
    """Maps prompt strings to frozen text-encoder hidden states, encoding each distinct prompt once."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], device: torch.device | str = "cpu") -> None:
        self._encode = encode
        self._cache: dict[str, torch.Tensor] = {}
        self.device = torch.device(device)

    def add(self, prompts: Iterable[str]) -> None:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            with torch.no_grad():
                embs = self._encode(missing).to(self.device)
            self._cache.update(zip(missing, embs))

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(N, tokens, dim) embeddings for the prompts, in order."""
        self.add(prompts)
        return torch.stack([self._cache[p] for p in prompts])

    def empty(self, n: int = 1) -> torch.Tensor:
        """The unconditional (empty-prompt) embedding, repeated n times."""
        return self([""]).expand(n, -1, -1)
