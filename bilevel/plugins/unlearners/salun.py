"""SalUn (Fan et al., ICLR 2024): saliency-masked random-label unlearning.

1. Saliency mask (once, in prepare): g = sum over one pass of the forget set of grad_theta of the forgetting loss
   -||eps - [(1+w) eps_theta(x_t, c) - w eps_theta(x_t, 0)]||^2; keep the top `mask_fraction` of |g| globally
   (ranked across all parameters together), freeze the rest.
2. Unlearning: ||eps_theta(x_t, c_f) - sg(eps_theta(x_t, c'))||^2 + alpha * L_ddpm(retain data), with x_t noised
   forget images and c' the forget prompt relabelled to a different concept. before_step multiplies every
   gradient by the mask, so with a weight-decay-free optimiser (the runner's AdamW uses weight_decay=0.0)
   masked-out weights never change: their Adam moments stay exactly zero.

Relabelling default ('farthest'): the concept colour is replaced by the palette colour farthest from it
("a purple circle" -> "a yellow circle"); deterministic, a real prompt the model renders well, and never confusable
with the concept. 'random' draws a non-concept colour per sample (SalUn's random labelling); averaging the
predictions of several colours tends to give a blended, off-palette colour rather than a clean one.

target_model 'student' (default, as in the paper) lets the relabelled target drift with the trained weights; on the
tiny world the relabel colour and its neighbours then drift towards the concept. 'frozen' takes the target from the
frozen reference instead; `bilevel unlearn` uses it (with alpha 5) when SalUn runs alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bilevel.core.errors import BilevelError
from bilevel.core.interfaces import PluginConfig, UnlearnContext, Unlearner
from bilevel.toolkit import (
    FARTHEST,
    RANDOM,
    PromptMapping,
    atomic_save_tensors,
    concept_in,
    digested_name,
    explicit_prompts,
    generate_or_load,
    model_fingerprint,
    noised,
    non_concept_colours,
    prediction_type,
    replace_concept,
    tensor_fingerprint,
)

MASK_FILE = "salun_mask.safetensors"  # named per mask: salun_mask-<digest of its meta>.safetensors
FORGET_CACHE = "salun_forget.safetensors"
RETAIN_CACHE = "salun_retain.safetensors"
MASK_PREFIX = "mask."


class RelabelMapping(PromptMapping):
    """SalUn's relabelling: 'farthest', 'random' (a non-concept colour per sample), a word, or explicit prompts."""

    keywords: ClassVar[tuple[str, ...]] = (FARTHEST, RANDOM)


class SalUnConfig(PluginConfig):
    mask_fraction: float = Field(0.5, gt=0, le=1, description="share of weights kept trainable (global top |grad|)")
    mask_guidance: float = Field(7.5, ge=0, description="w of the guided forgetting loss behind the saliency mask")
    mask_samples: int = Field(512, gt=0, description="forget samples in the one pass that computes the mask")
    mask_batch_size: int = Field(32, gt=0, description="batch size of the mask pass")
    relabel: RelabelMapping = Field(
        default_factory=RelabelMapping,
        description="how c' derives from a forget prompt: 'farthest' (farthest non-concept palette colour), "
        "'random' (a random non-concept colour per sample), a word replacing the concept word, or a list of "
        "explicit relabelled prompts (one per concept prompt)",
    )
    target_model: Literal["student", "frozen"] = Field(
        "student",
        description="whose relabelled prediction is the target: the trained model under stop-gradient (the paper) "
        "or the frozen reference (a fixed target)",
    )
    alpha: float = Field(0.5, ge=0, description="weight of the retain-set diffusion loss")
    forget_source: Literal["auto", "data", "teacher"] = Field(
        "auto", description="forget images: data (the context's concept images), teacher (generated), auto: data if any"
    )
    num_generated: int = Field(256, gt=0, description="images generated per set when the context has none")
    generate_steps: int = Field(25, gt=0, description="DDIM steps when generating images")
    generate_guidance: float = Field(2.0, ge=0, description="guidance when generating images")


@dataclass
class SalUnBatch:
    """Noised forget images with their prompts and relabelled prompts, plus (alpha > 0) a noised retain batch."""

    xt: torch.Tensor
    t: torch.Tensor
    c_f: torch.Tensor
    c_new: torch.Tensor
    frozen_target: torch.Tensor | None  # target_model 'frozen': sg(eps_frozen(x_t, c')), computed once per batch
    xr: torch.Tensor | None = None
    tr: torch.Tensor | None = None
    c_r: torch.Tensor | None = None
    er: torch.Tensor | None = None


def saliency_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping exactly round(fraction * total) entries with the largest score, ranked globally."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().float().cpu() for n in names])
    k = max(1, min(flat.numel(), round(fraction * flat.numel())))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start : start + size].view(scores[n].shape)
        start += size
    return out


class SalUn(Unlearner):
    name = "salun"
    description = "SalUn: gradient-saliency mask + random-label (relabelling) unlearning with a retain loss."
    Config = SalUnConfig
    api_version = 2

    def __init__(self, config: SalUnConfig | None = None) -> None:
        super().__init__(config)
        self.mask: dict[str, torch.Tensor] | None = None
        self._forget: torch.Tensor | None = None
        self._forget_prompts: list[str] = []
        self._relabel: dict[str, str] = {}
        self._retain: torch.Tensor | None = None
        self._retain_prompts: list[str] = []
        self._concepts: list[str] = []

    # ------------------------------------------------------------------------------------------ data
    def relabelled(self, prompts: list[str], concepts: list[str], concept_prompts: list[str]) -> dict[str, str]:
        """Fixed relabelling per distinct prompt (empty for 'random', drawn per sample in loss())."""
        mapping: RelabelMapping = self.config.relabel
        distinct = list(dict.fromkeys(prompts))
        if mapping.prompts is not None:
            table = dict(zip(concept_prompts, explicit_prompts(mapping.prompts, concept_prompts, "relabel.prompts")))
            missing = [p for p in distinct if p not in table]
            if missing:
                raise BilevelError(
                    f"forget prompt {missing[0]!r} has no entry in relabel.prompts; give one per concept prompt"
                )
            return {p: table[p] for p in distinct}
        if mapping.mode == RANDOM:
            for p in distinct:
                concept_in(p, concepts)  # every forget prompt must name a concept
            non_concept_colours(concepts)
            return {}
        return dict(zip(distinct, mapping.map(distinct, concepts, "relabel")))

    def _load_sets(self, ctx: UnlearnContext) -> None:
        cfg: SalUnConfig = self.config
        use_data = cfg.forget_source == "data" or (cfg.forget_source == "auto" and ctx.concept_images is not None)
        if use_data:
            if ctx.concept_images is None or not ctx.concept_image_prompts:
                raise BilevelError(
                    "salun forget_source='data' needs concept images; use forget_source='teacher' or 'auto'"
                )
            self._forget, self._forget_prompts = ctx.concept_images, list(ctx.concept_image_prompts)
        else:
            if not ctx.concept_prompts:
                raise BilevelError("salun needs at least one concept prompt")
            prompts = [ctx.concept_prompts[i % len(ctx.concept_prompts)] for i in range(cfg.num_generated)]
            self._forget = generate_or_load(
                ctx, prompts, filename=FORGET_CACHE, steps=cfg.generate_steps, guidance=cfg.generate_guidance, seed=ctx.seed + 31
            )  # fmt: skip
            self._forget_prompts = prompts
        if cfg.alpha > 0:
            if ctx.retain_images is not None and ctx.retain_image_prompts:
                self._retain, self._retain_prompts = ctx.retain_images, list(ctx.retain_image_prompts)
            elif ctx.retain_prompts:
                prompts = [ctx.retain_prompts[i % len(ctx.retain_prompts)] for i in range(cfg.num_generated)]
                self._retain = generate_or_load(
                    ctx, prompts, filename=RETAIN_CACHE, steps=cfg.generate_steps, guidance=cfg.generate_guidance, seed=ctx.seed + 37
                )  # fmt: skip
                self._retain_prompts = prompts
            else:
                raise BilevelError(
                    "salun alpha > 0 needs retain images or retain prompts; set alpha=0 to drop the retain loss"
                )

    # ------------------------------------------------------------------------------------------ mask
    def compute_scores(self, ctx: UnlearnContext, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """|sum over one pass of the forget set of grad of the guided forgetting loss|, per parameter."""
        cfg: SalUnConfig = self.config
        assert self._forget is not None
        gen = torch.Generator().manual_seed(ctx.seed + 41)
        n = min(cfg.mask_samples, self._forget.shape[0])
        order = torch.randperm(self._forget.shape[0], generator=gen)[:n]
        total = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        names, tensors = list(params), list(params.values())
        w = cfg.mask_guidance
        for start in range(0, n, cfg.mask_batch_size):
            idx = order[start : start + cfg.mask_batch_size]
            xt, t, eps = noised(self._forget[idx], ctx.alphas_cumprod, gen, ctx.device, prediction_type(ctx.scheduler_config))
            cond = ctx.encode([self._forget_prompts[j] for j in idx.tolist()])
            uncond = ctx.encode([""]).expand(len(idx), -1, -1)
            both = ctx.student(
                torch.cat([xt, xt]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])
            ).sample
            e_u, e_c = both.chunk(2)
            loss = -F.mse_loss((1 + w) * e_c - w * e_u, eps)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for k, g in zip(names, grads):
                if g is not None:
                    total[k] += g.float()
        return {k: v.abs() for k, v in total.items()}

    def _mask_meta(self, ctx: UnlearnContext) -> dict[str, str]:
        cfg: SalUnConfig = self.config
        return {
            "mask_fraction": repr(cfg.mask_fraction),
            "mask_guidance": repr(cfg.mask_guidance),
            "mask_samples": str(cfg.mask_samples),
            "forget_prompts": json.dumps(sorted(set(self._forget_prompts))),
            "forget_images": tensor_fingerprint(self._forget),
            "seed": str(ctx.seed),
            # the saliency of the model being unlearned: a two-stage arm's KD student gets its own mask, not the
            # one of the pruned student another arm of the same run computed
            "student": model_fingerprint(ctx.student),
        }

    def _read_cached_mask(
        self, path: Path, meta: dict[str, str], params: dict[str, nn.Parameter]
    ) -> dict[str, torch.Tensor] | None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                if (f.metadata() or {}) != meta or names != set(params):
                    return None
                mask = {k: f.get_tensor(k).bool() for k in names}
        except (SafetensorError, OSError):  # a corrupt file is recomputed and overwritten
            return None
        if any(mask[k].shape != p.shape for k, p in params.items()):
            return None
        return mask

    def prepare(self, ctx: UnlearnContext) -> None:
        self._concepts = list(ctx.concepts)
        self._load_sets(ctx)
        self._relabel = self.relabelled(self._forget_prompts, self._concepts, list(ctx.concept_prompts))
        params = {k: p for k, p in ctx.student.named_parameters() if p.requires_grad}
        if not params:
            raise BilevelError("salun found no trainable parameters in the student (all have requires_grad=False)")
        if self.mask is not None and set(self.mask) == set(params):
            return  # restored by load_state_dict
        meta = self._mask_meta(ctx)
        # one file per mask meta: arms of one run that unlearn different students keep their own masks
        path = Path(ctx.run_dir) / digested_name(MASK_FILE, meta) if ctx.run_dir is not None else None
        if path is not None and path.is_file():
            cached = self._read_cached_mask(path, meta, params)
            if cached is not None:
                self.mask = {k: v.to(ctx.device) for k, v in cached.items()}
                return
        mask = saliency_mask(self.compute_scores(ctx, params), self.config.mask_fraction)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_tensors(mask, path, metadata=meta)
        self.mask = {k: v.to(ctx.device) for k, v in mask.items()}

    # ------------------------------------------------------------------------------------------ training
    def relabel_batch(self, prompts: list[str], generator: torch.Generator) -> list[str]:
        if self._relabel:
            return [self._relabel[p] for p in prompts]
        colours = non_concept_colours(self._concepts)
        picks = torch.randint(len(colours), (len(prompts),), generator=generator).tolist()
        return [replace_concept(p, concept_in(p, self._concepts), colours[j]) for p, j in zip(prompts, picks)]

    def draw(self, ctx: UnlearnContext, batch_size: int, generator: torch.Generator) -> SalUnBatch:
        cfg: SalUnConfig = self.config
        i = torch.randint(self._forget.shape[0], (batch_size,), generator=generator)
        forget_prompts = [self._forget_prompts[j] for j in i.tolist()]
        c_f = ctx.encode(forget_prompts)
        c_new = ctx.encode(self.relabel_batch(forget_prompts, generator))
        xt, t, _ = noised(self._forget[i], ctx.alphas_cumprod, generator, ctx.device)
        frozen_target = None
        if cfg.target_model == "frozen":
            with torch.no_grad():
                frozen_target = ctx.teacher(xt, t, encoder_hidden_states=c_new).sample
        batch = SalUnBatch(xt, t, c_f, c_new, frozen_target)
        if cfg.alpha == 0 or self._retain is None:
            return batch
        j = torch.randint(self._retain.shape[0], (batch_size,), generator=generator)
        batch.c_r = ctx.encode([self._retain_prompts[k] for k in j.tolist()])
        batch.xr, batch.tr, batch.er = noised(
            self._retain[j], ctx.alphas_cumprod, generator, ctx.device, prediction_type(ctx.scheduler_config)
        )
        return batch

    def loss(self, ctx: UnlearnContext, batch: SalUnBatch) -> torch.Tensor:
        b = batch
        target = b.frozen_target
        if target is None:  # target_model 'student': the trained model's own relabelled prediction, stop-gradient
            with torch.no_grad():
                target = ctx.student(b.xt, b.t, encoder_hidden_states=b.c_new).sample
        if b.xr is None:
            return F.mse_loss(ctx.student(b.xt, b.t, encoder_hidden_states=b.c_f).sample, target)
        out = ctx.student(
            torch.cat([b.xt, b.xr]), torch.cat([b.t, b.tr]), encoder_hidden_states=torch.cat([b.c_f, b.c_r])
        ).sample
        pred_f, pred_r = out.split([len(b.xt), len(b.xr)])
        return F.mse_loss(pred_f, target) + self.config.alpha * F.mse_loss(pred_r, b.er)

    def before_step(self, student: nn.Module) -> None:
        """Multiply every gradient by the mask; parameters outside the mask get no gradient at all."""
        assert self.mask is not None  # set by prepare(), which the base class checks has run
        for name, p in student.named_parameters():
            if p.grad is None:
                continue
            m = self.mask.get(name)
            if m is None:
                p.grad.zero_()
            else:
                p.grad.masked_fill_(~m.to(p.grad.device), 0.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.mask is None:
            return {}
        return {MASK_PREFIX + k: v.detach().cpu() for k, v in self.mask.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mask = {k[len(MASK_PREFIX) :]: v.bool() for k, v in state.items() if k.startswith(MASK_PREFIX)}
        if mask:
            self.mask = mask
