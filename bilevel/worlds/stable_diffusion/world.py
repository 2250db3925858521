"""SDWorld: what a run trains in when the teacher is a real Stable Diffusion pipeline. It offers the attributes the
tiny world offers (teacher, bank, finetune, concept_data, prompts, schedule, sample shape, device) but its x0 are
scaled VAE latents: fine-tuning images are encoded once by the frozen VAE, and samples are decoded for evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from bilevel.core.config import RunConfig
from bilevel.core.errors import BilevelError
from bilevel.core.world import EvalOutput, Purpose
from bilevel.diffusion.conditioning import PromptBank
from bilevel.diffusion.sampling import sample_images
from bilevel.runtime.precision import autocast
from bilevel.worlds.stable_diffusion.data import ImageRecord, iter_batches, list_records
from bilevel.worlds.stable_diffusion.loading import SDParts, check_sd_index, load_sd_parts, read_model_index

ENCODE_BATCH = 16
TEXT_BATCH = 64
SAMPLE_BATCH = 32
DEFAULT_RETAIN = 8
#: Retain prompts when a command has neither fine-tuning captions nor data.retain_prompts (eval, prune, unlearn).
GENERIC_RETAIN = [
    "a photo of a cat", "a photo of a dog", "a landscape with a river", "a city street at night",
    "a bowl of fruit on a table", "a portrait of a person", "a red car", "a house in a field",
]  # fmt: skip


@dataclass
class LatentSample:
    """x0 for training: scaled VAE latents (N, C, h, w) and one prompt per latent."""

    images: torch.Tensor
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class SDWorld:
    parts: SDParts
    concepts: list[str]
    bank: PromptBank
    finetune: LatentSample
    device: torch.device
    precision: str
    resolution: int
    prompts_for_concepts: list[str]
    prompts_to_retain: list[str]
    concept_records: list[ImageRecord] | None = None
    concept_size: int = 64
    sample_steps: int = 25
    sample_guidance: float = 7.5
    seed: int = 0
    evaluation: Any = None  # the run's EvalConfig (CLIP model, reference images, NudeNet)
    name: str = "stable-diffusion"
    clamp_samples: bool = field(default=False, init=False)  # x0 are latents, not pixels in [-1, 1]
    quality_metric: str = field(default="fid", init=False)

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def build(cls, config: RunConfig, purpose: Purpose = "run") -> SDWorld:
        """Load the pipeline, read and encode the fine-tuning data, and fix the prompts (all from the config).
        Only `run` requires fine-tuning data; the other commands use it when given (calibration, retain terms)."""
        d, m = config.data, config.model
        check_sd_index(read_model_index(m.source), m.source, m.trust_remote_code)  # the model first: cheap checks
        if d.finetune_data is None and purpose == "run":
            raise BilevelError(
                "a Stable Diffusion run needs fine-tuning data: set data.finetune_data to an image+caption folder "
                "or a saved datasets folder"
            )
        finetune_records = []
        if d.finetune_data is not None:
            finetune_records = list_records(
                d.finetune_data, what="fine-tuning", limit=d.finetune_size, captions_required=True,
                image_column=d.image_column, caption_column=d.caption_column,
            )  # fmt: skip
        concept_records = None
        if d.concept_data is not None:
            concept_records = list_records(
                d.concept_data, what="concept", limit=d.concept_size, captions_required=False,
                image_column=d.image_column, caption_column=d.caption_column,
            )  # fmt: skip
        parts = load_sd_parts(m.source, m.device, m.trust_remote_code)
        resolution = d.resolution or parts.unet.config.sample_size * vae_factor(parts.vae)
        check_resolution(resolution, parts)
        device = torch.device(m.device)
        concept_prompts = d.concept_prompts or [
            t.replace("{concept}", c) for c in config.concepts for t in d.concept_templates
        ]
        world = cls(
            parts=parts,
            concepts=list(config.concepts),
            bank=PromptBank(lambda p: encode_prompts(parts, p), device),
            finetune=LatentSample(torch.empty(0), []),
            device=device,
            precision=m.mixed_precision,
            resolution=resolution,
            prompts_for_concepts=list(concept_prompts),
            prompts_to_retain=[],
            concept_records=concept_records,
            concept_size=d.concept_size,
            sample_steps=config.evaluation.steps,
            sample_guidance=config.evaluation.guidance_or(2.0),
            seed=d.seed,
            evaluation=config.evaluation,
        )
        check_known_words(parts.tokenizer, world.prompts_for_concepts, "concept prompt")
        captions = [r.caption or "" for r in finetune_records]
        if finetune_records:
            world.finetune = LatentSample(world.encode_records(finetune_records, seed=d.seed), captions)
        default_retain = list(dict.fromkeys(captions))[:DEFAULT_RETAIN] or GENERIC_RETAIN
        world.prompts_to_retain = list(d.retain_prompts or default_retain)
        world.bank.add([""] + world.prompts_for_concepts + world.prompts_to_retain)
        return world

    # ------------------------------------------------------------------------------------------ the tiny-world API
    @property
    def teacher(self) -> torch.nn.Module:
        return self.parts.unet

    @property
    def tokenizer(self):
        return self.parts.tokenizer

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.parts.scheduler_config)

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.parts.scheduler_config).alphas_cumprod.float()

    @property
    def prediction_type(self) -> str:
        return str(self.parts.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        side = self.resolution // vae_factor(self.parts.vae)
        return (self.parts.unet.config.in_channels, side, side)

    def concept_prompts(self, concept: str | None = None) -> list[str]:
        """All concept prompts, or those of one concept (the prompts that name it; all of them when the run has
        a single concept, so explicit prompts need not repeat the concept's name)."""
        if concept is None or len(self.concepts) == 1:
            return list(self.prompts_for_concepts)
        return [p for p in self.prompts_for_concepts if concept.lower() in p.lower()] or [concept]

    def retain_prompts(self) -> list[str]:
        return list(self.prompts_to_retain)

    @cached_property
    def concept_data(self) -> LatentSample:
        """Concept x0: the concept image folder encoded by the VAE, else concept_size samples of the teacher
        (made on first use, so arms without an unlearner never pay for them)."""
        prompts = self.prompts_for_concepts
        if self.concept_records is not None:
            captions = [r.caption or prompts[i % len(prompts)] for i, r in enumerate(self.concept_records)]
            return LatentSample(self.encode_records(self.concept_records, seed=self.seed + 1), captions)
        chosen = [prompts[i % len(prompts)] for i in range(self.concept_size)]
        latents = self.sample(self.teacher, chosen, steps=self.sample_steps, guidance=self.sample_guidance,
                              generator=torch.Generator().manual_seed(self.seed + 1))  # fmt: skip
        return LatentSample(latents, chosen)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled VAE latents (a seeded draw from the posterior), on the run's device."""
        vae = self.parts.vae
        scale, shift = vae_scale_shift(vae)
        gen = torch.Generator().manual_seed(self.seed + 2)
        out = []
        with torch.no_grad():
            for start in range(0, len(pixels), ENCODE_BATCH):
                with autocast(self.precision, self.device):
                    dist = vae.encode(pixels[start : start + ENCODE_BATCH].to(self.device)).latent_dist
                noise = torch.randn(dist.mean.shape, generator=gen).to(self.device)
                out.append(((dist.mean.float() + dist.std.float() * noise - shift) * scale).float())
        return torch.cat(out)

    def evaluate(self, unet: torch.nn.Module, settings) -> EvalOutput:
        from bilevel.worlds.stable_diffusion.evaluation import evaluate_sd

        return evaluate_sd(unet, self, settings)

    def pipeline_parts(self) -> dict[str, Any]:
        p = self.parts
        return {"vae": p.vae, "text_encoder": p.text_encoder, "tokenizer": p.tokenizer}

    # ------------------------------------------------------------------------------------------ latent space
    @torch.no_grad()
    def encode_records(self, records: list[ImageRecord], seed: int) -> torch.Tensor:
        """Scaled latents of the images (a draw from the VAE posterior, seeded), on the run's device."""
        vae = self.parts.vae
        scale, shift = vae_scale_shift(vae)
        gen = torch.Generator().manual_seed(seed)
        out = []
        for pixels in iter_batches(records, self.resolution, ENCODE_BATCH):
            with autocast(self.precision, self.device):
                dist = vae.encode(pixels.to(self.device)).latent_dist
            noise = torch.randn(dist.mean.shape, generator=gen).to(self.device)
            z = dist.mean.float() + dist.std.float() * noise
            out.append(((z - shift) * scale).float())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (N, 3, R, R) of scaled latents, on the CPU."""
        vae = self.parts.vae
        scale, shift = vae_scale_shift(vae)
        out = []
        for start in range(0, len(latents), ENCODE_BATCH):
            z = latents[start : start + ENCODE_BATCH].to(self.device).float() / scale + shift
            with autocast(self.precision, self.device):
                out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def sample(
        self, unet: torch.nn.Module, prompts: list[str], *, steps: int, guidance: float, generator: torch.Generator
    ) -> torch.Tensor:
        """Latents sampled by `unet` with the pipeline's schedule (DDIM; epsilon or v-prediction), one per prompt."""
        c, h, _ = self.sample_shape
        with autocast(self.precision, self.device):
            latents = sample_images(
                unet, self.scheduler_config, self.bank(prompts), self.bank.empty(1), steps=steps, guidance=guidance,
                generator=generator, batch_size=SAMPLE_BATCH, channels=c, size=h,
            )  # fmt: skip
        return latents.float()


def vae_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent side (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_scale_shift(vae: torch.nn.Module) -> tuple[float, float]:
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def check_resolution(resolution: int, parts: SDParts) -> None:
    """The latent side must survive every UNet downsampling exactly."""
    step = vae_factor(parts.vae) * 2 ** (len(parts.unet.config.down_block_types) - 1)
    if resolution % step:
        raise BilevelError(
            f"data.resolution {resolution} does not fit this model; accepted: a multiple of {step} "
            f"(default {parts.unet.config.sample_size * vae_factor(parts.vae)})"
        )


def check_known_words(tokenizer: Any, prompts: list[str], what: str) -> None:
    """A word the tokenizer cannot represent (a word-level vocabulary's [UNK]) would silently condition on nothing:
    refuse it, naming the word and the known vocabulary."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    for prompt in prompts:
        for word in prompt.split():
            ids = tokenizer(word, add_special_tokens=False).input_ids
            if unk in ids:
                vocab = sorted(w for w in tokenizer.get_vocab() if w.isalpha())
                shown = ", ".join(vocab[:60]) + (" ..." if len(vocab) > 60 else "")
                raise BilevelError(
                    f"{what} {prompt!r}: the tokenizer does not know the word {word!r}; known words: {shown}"
                )


@torch.no_grad()
def encode_prompts(parts: SDParts, prompts: list[str]) -> torch.Tensor:
    """Frozen text-encoder hidden states (N, tokens, dim), padded to the tokenizer's maximum length, in batches."""
    tok, enc = parts.tokenizer, parts.text_encoder
    device = next(enc.parameters()).device
    length = min(int(tok.model_max_length), int(enc.config.max_position_embeddings))  # some configs say 1e30
    out = []
    for start in range(0, len(prompts), TEXT_BATCH):
        ids = tok(
            prompts[start : start + TEXT_BATCH], padding="max_length", max_length=length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(device)  # fmt: skip
        out.append(enc(ids)[0].float())
    return torch.cat(out)
