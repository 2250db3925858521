"""UCE: Unified Concept Editing (Gandikota, Orgad, Belinkov, Materzynska, Bau, "Unified Concept Editing in
Diffusion Models", WACV 2024; arXiv:2308.14761), building on TIME (Orgad et al., ICCV 2023).

UCE edits only the cross-attention key and value projections W (to_k, to_v of every cross-attention layer), the
only place where text enters the UNet. For each concept prompt embedding c_i and its anchor ("target") prompt
embedding c_i*, it asks the edited projection to produce what the original one produced for the anchor, while
preserved prompts c_p keep their original keys/values:

    min_W  sum_i ||W c_i - W_old c_i*||^2  +  lambda sum_p ||W c_p - W_old c_p||^2

The paper solves this least-squares problem in closed form on a model that is not otherwise trained. In a bilevel
run the same projections are also trained by the lower level, so here the objective is the upper-level *loss*,
minimised by the solver's gradient steps:

- the erase term uses, by default, the current student's own projection of the anchor under stop-gradient
  (`target_model="student"`), so the target follows the lower level's fine-tuning; `target_model="initial"` uses
  the projections frozen when the run starts (the paper's W_old);
- the preservation term (UCE's lambda, `preserve_weight`) compares against W_old on the retain prompts; it is off
  by default because in a bilevel run the lower level already preserves everything else, and it is the term to
  turn on for a standalone `bilevel unlearn`.

Token alignment: each concept prompt is paired with an anchor prompt that differs only in the concept word
("a purple circle" -> "a yellow circle"), so the two embedding sequences align position by position; positions that
do not depend on the concept have equal embeddings and contribute nothing. (The reference implementation aligns
the sequences from the last concept token on; with a word replacement this is the same set of positions.)

Cost: no UNet forward at all, only the cross-attention projections of a batch of text embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bilevel import BilevelError, PluginConfig, UnlearnContext, Unlearner
from bilevel.toolkit import PromptMapping


class UCEConfig(PluginConfig):
    anchor: PromptMapping = Field(
        default_factory=PromptMapping,
        description="anchor prompts replace the concept word by this word; 'farthest' (tiny world only): the "
        "non-concept palette colour farthest from the concept in RGB; or a list of explicit anchor prompts, one per "
        "concept prompt",
    )
    target_model: Literal["student", "initial"] = Field(
        "student",
        description="whose projection of the anchor is the target: the current student under stop-gradient "
        "(follows the lower level) or the projections frozen at the start of the run (the paper's W_old)",
    )
    projections: Literal["kv", "v", "k"] = Field(
        "kv", description="which cross-attention projections are edited and trained: key and value (paper), or one"
    )
    preserve_weight: float = Field(
        0.0, ge=0, description="UCE's lambda: weight of ||W c_p - W_old c_p||^2 on the retain prompts (0 disables)"
    )


@dataclass
class UCEBatch:
    """Text embeddings only: concept prompts, their anchors and (preserve_weight > 0) retain prompts."""

    concept: torch.Tensor
    anchor: torch.Tensor
    keep: torch.Tensor | None


def cross_attention_projections(model: nn.Module, which: str) -> dict[str, nn.Linear]:
    """name -> Linear for the chosen key/value projections of every cross-attention layer (diffusers Attention)."""
    from diffusers.models.attention_processor import Attention

    out: dict[str, nn.Linear] = {}
    for name, m in model.named_modules():
        if isinstance(m, Attention) and m.is_cross_attention:
            for proj in ("to_k", "to_v"):
                if proj[-1] in which:
                    out[f"{name}.{proj}"] = getattr(m, proj)
    return out


class UCE(Unlearner):
    name = "uce"
    description = "Unified Concept Editing: concept keys/values of cross-attention map onto an anchor's (no UNet pass)."
    Config = UCEConfig
    api_version = 2

    def __init__(self, config: UCEConfig | None = None) -> None:
        super().__init__(config)
        self.targets: list[str] = []
        self.anchors: list[str] = []
        self._initial: dict[str, torch.Tensor] = {}  # W_old (and biases), keyed like the student's parameters

    def trainable_parameters(self, student: nn.Module) -> dict[str, nn.Parameter]:
        return {
            f"{name}.{k}": p
            for name, proj in cross_attention_projections(student, self.config.projections).items()
            for k, p in proj.named_parameters()
        }

    def prepare(self, ctx: UnlearnContext) -> None:
        if not ctx.concept_prompts:
            raise BilevelError("uce needs at least one concept prompt")
        self.targets = list(ctx.concept_prompts)
        self.anchors = self.config.anchor.map(self.targets, list(ctx.concepts), "anchor")
        if self._initial:  # restored by load_state_dict (a resumed run): W_old of the original start
            self._initial = {k: v.to(ctx.device) for k, v in self._initial.items()}
        else:
            self._initial = {k: p.detach().clone() for k, p in self.trainable_parameters(ctx.student).items()}
        if not self._initial:
            raise BilevelError("uce: the student has no cross-attention layers to edit")

    def _initial_projection(self, name: str, x: torch.Tensor) -> torch.Tensor:
        bias = self._initial.get(f"{name}.bias")
        return F.linear(x, self._initial[f"{name}.weight"], bias)

    def draw(self, ctx: UnlearnContext, batch_size: int, generator: torch.Generator) -> UCEBatch:
        i = torch.randint(len(self.targets), (batch_size,), generator=generator).tolist()
        c = ctx.encode([self.targets[k] for k in i])
        c_anchor = ctx.encode([self.anchors[k] for k in i])
        c_keep = None
        if self.config.preserve_weight > 0 and ctx.retain_prompts:
            j = torch.randint(len(ctx.retain_prompts), (batch_size,), generator=generator).tolist()
            c_keep = ctx.encode([ctx.retain_prompts[k] for k in j])
        return UCEBatch(c, c_anchor, c_keep)

    def loss(self, ctx: UnlearnContext, batch: UCEBatch) -> torch.Tensor:
        c, c_anchor, c_keep = batch.concept, batch.anchor, batch.keep
        layers = cross_attention_projections(ctx.student, self.config.projections)
        total = torch.zeros((), device=c.device)
        for name, proj in layers.items():
            with torch.no_grad():
                if self.config.target_model == "student":
                    target = proj(c_anchor)
                else:
                    target = self._initial_projection(name, c_anchor)
            total = total + F.mse_loss(proj(c), target)
            if c_keep is not None:
                with torch.no_grad():
                    keep_target = self._initial_projection(name, c_keep)
                total = total + self.config.preserve_weight * F.mse_loss(proj(c_keep), keep_target)
        return total / len(layers)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"initial.{k}": v.detach().cpu() for k, v in self._initial.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        restored = {k.removeprefix("initial."): v for k, v in state.items() if k.startswith("initial.")}
        if restored:
            self._initial = restored
