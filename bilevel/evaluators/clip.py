"""CLIP score and a zero-shot CLIP concept detector that work on image tensors.

Generated images are already tensors in [0, 1]; CLIP's preprocessing (shortest-edge bicubic resize, centre crop,
mean/std normalisation) is redone in torch from the constants in the model's own `preprocessor_config.json`, so
evaluation needs no PIL round trip and can stay on the GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bilevel.core.errors import BilevelError
from bilevel.evaluators._images import check_images

#: transformers' defaults for CLIP, used only for keys a processor config leaves out.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (then only the local cache or folders are read)."""
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag.strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


def _hw(value: Any, key: str) -> tuple[int, int]:
    """(height, width) from a processor-config size: an int (square) or {'height', 'width'}."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and {"height", "width"} <= _set_keys(value):
        return int(value["height"]), int(value["width"])
    raise BilevelError(f"unsupported {key} {value!r} in the CLIP processor config; accepted: an int or height/width")


def _set_keys(value: dict[str, Any]) -> set[str]:
    """Keys with a value: serialised size dicts may list every field, unused ones as None."""
    return {key for key, item in value.items() if item is not None}


def _triple(value: Any, key: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise BilevelError(f"CLIP processor config {key} must have 3 values (RGB); got {value!r}")
    return values[0], values[1], values[2]


@dataclass(frozen=True)
class ClipPreprocessing:
    """The image side of a CLIP processor config, applied to [N, 3, H, W] tensors in [0, 1]."""

    shortest_edge: int | None  # resize keeping the aspect ratio (CLIP's default) ...
    resize_hw: tuple[int, int] | None  # ... or to an exact size; both None: no resize
    crop_hw: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClipPreprocessing:
        """Read transformers' CLIPImageProcessor keys; missing keys take transformers' CLIP defaults."""
        shortest_edge = resize_hw = crop_hw = None
        if config.get("do_resize", True):
            size = config.get("size", {"shortest_edge": 224})
            if isinstance(size, int):  # legacy configs: an int size meant the shortest edge for CLIP
                shortest_edge = size
            elif isinstance(size, dict) and "shortest_edge" in _set_keys(size):
                shortest_edge = int(size["shortest_edge"])
            else:
                resize_hw = _hw(size, "size")
        if config.get("do_center_crop", True):
            crop_hw = _hw(config.get("crop_size", {"height": 224, "width": 224}), "crop_size")
        if config.get("do_normalize", True):
            mean = _triple(config.get("image_mean", OPENAI_CLIP_MEAN), "image_mean")
            std = _triple(config.get("image_std", OPENAI_CLIP_STD), "image_std")
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(shortest_edge, resize_hw, crop_hw, mean, std)

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        """Size after the resize (before the crop), with transformers' rounding."""
        if self.shortest_edge is not None:
            short, long = min(height, width), max(height, width)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_long, new_short) if height > width else (new_short, new_long)
        if self.resize_hw is not None:
            return self.resize_hw
        return height, width

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> normalised pixel values [N, 3, crop_h, crop_w] (float32)."""
        images = images.float()
        height, width = images.shape[-2:]
        target = self.output_hw(height, width)
        if target != (height, width):
            # antialias: matches PIL's downsampling filter; clamp: PIL's uint8 output cannot overshoot either
            images = F.interpolate(images, size=target, mode="bicubic", antialias=True, align_corners=False)
            images = images.clamp(0, 1)
        if self.crop_hw is not None:
            images = _center_crop(images, self.crop_hw)
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std


def _center_crop(images: torch.Tensor, crop_hw: tuple[int, int]) -> torch.Tensor:
    """Centre crop with transformers' offsets; pads with zeros first when the image is smaller than the crop."""
    crop_h, crop_w = crop_hw
    height, width = images.shape[-2:]
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = images.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return images[..., top : top + crop_h, left : left + crop_w]


def _check_prompts(prompts: Sequence[str], what: str) -> list[str]:
    if isinstance(prompts, str) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise BilevelError(f"{what} must be a list of non-empty strings; got {prompts!r}")
    return list(prompts)


def _looks_like_path(model_id: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that is not a folder was meant as a folder."""
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or "\\" in model_id


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ClipScorer:
    """A frozen transformers CLIPModel with its tokenizer and tensor preprocessing.

    Image-side outputs come back on the input images' device, text features on the scorer's device; features are
    L2-normalised float32 whatever the model's dtype.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        preprocessing: ClipPreprocessing,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
        model_id: str = "",
    ) -> None:
        if batch_size < 1:
            raise BilevelError(f"CLIP batch_size must be >= 1; got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing
        self.batch_size = batch_size
        self.model_id = model_id
        positions = int(model.config.text_config.max_position_embeddings)
        tokenizer_max = getattr(tokenizer, "model_max_length", positions) or positions
        self.max_length = min(positions, int(tokenizer_max))
        #: reference-folder features by (folder, file stamps), so several arms compare against one pass
        self.folder_cache: dict[tuple[Any, ...], torch.Tensor] = {}

    @classmethod
    def load(
        cls,
        model_id: str = DEFAULT_CLIP_MODEL,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> ClipScorer:
        """Load a CLIPModel (safetensors only: nothing is unpickled), its tokenizer and its processor config.

        `model_id` is a hub id (read from the local cache only when HF_HUB_OFFLINE=1) or a local folder.
        """
        import transformers
        from transformers import AutoConfig, AutoTokenizer, CLIPConfig, CLIPModel, ImageProcessingMixin

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        path = Path(model_id).expanduser()
        is_folder = path.is_dir()
        if not is_folder and _looks_like_path(model_id):
            raise BilevelError(
                f"CLIP model folder {model_id} not found; pass a folder written by CLIPModel.save_pretrained "
                f"or a hub id such as {DEFAULT_CLIP_MODEL}"
            )
        source = str(path) if is_folder else model_id
        offline = hub_offline()
        local_only = offline or is_folder

        def unavailable(exc: BaseException) -> BilevelError:
            if is_folder:
                return BilevelError(
                    f"cannot load CLIP model from folder {path}: {_first_line(exc)} (accepted: a folder written by "
                    "CLIPModel.save_pretrained with model.safetensors, tokenizer files and preprocessor_config.json)"
                )
            if offline:
                return BilevelError(
                    f"CLIP model {model_id!r}: its weights are not available offline (HF_HUB_OFFLINE=1 and not "
                    f"in the local Hugging Face cache); download it once with network access "
                    f"(`hf download {model_id}`) or pass a local CLIP model folder"
                )
            return BilevelError(
                f"CLIP model {model_id!r} not found or not loadable: {_first_line(exc)} (accepted: a hub id such as "
                f"{DEFAULT_CLIP_MODEL} or a local folder written by CLIPModel.save_pretrained)"
            )

        errors = (OSError, ValueError, KeyError, RuntimeError)
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        except errors as exc:
            raise unavailable(exc) from None
        if not isinstance(config, CLIPConfig):
            raise BilevelError(
                f"{model_id} is a {getattr(config, 'model_type', '?')!r} model; the evaluators need a CLIP model "
                f"(model_type 'clip'), e.g. {DEFAULT_CLIP_MODEL}"
            )
        try:
            model = CLIPModel.from_pretrained(source, use_safetensors=True, local_files_only=local_only)
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            processor_config, _ = ImageProcessingMixin.get_image_processor_dict(source, local_files_only=local_only)
        except errors as exc:
            raise unavailable(exc) from None
        preprocessing = ClipPreprocessing.from_config(processor_config)
        return cls(model, tokenizer, preprocessing, device, dtype, batch_size, model_id)

    @property
    def logit_scale(self) -> float:
        """CLIP's learned softmax temperature (exp of the stored log scale; 100 for OpenAI's models)."""
        return float(self.model.logit_scale.detach().float().exp())

    @torch.inference_mode()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Already-preprocessed pixel values -> normalised image embeddings (float32, scorer device)."""
        model = self.model
        pooled = model.vision_model(pixel_values=pixel_values.to(self.device, self.dtype)).pooler_output
        return F.normalize(model.visual_projection(pooled).float(), dim=-1)

    @torch.inference_mode()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, D] normalised CLIP image embeddings, in batches of `batch_size`."""
        images = check_images(images)
        if len(images) == 0:
            raise BilevelError("image_features needs at least one image; got an empty batch")
        chunks = [
            self.encode_pixels(self.preprocessing(chunk.to(self.device))) for chunk in images.split(self.batch_size)
        ]
        return torch.cat(chunks).to(images.device)

    @torch.inference_mode()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """M prompts -> [M, D] normalised CLIP text embeddings (truncated to CLIP's context length)."""
        prompts = _check_prompts(prompts, "prompts")
        if not prompts:
            raise BilevelError("text_features needs at least one prompt; got an empty list")
        model, chunks = self.model, []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(
                prompts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            out = model.text_model(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
            chunks.append(F.normalize(model.text_projection(out.pooler_output).float(), dim=-1))
        return torch.cat(chunks)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP score of each image against its own prompt: max(100 * cos(image, text), 0), shape [N]."""
        prompts = _check_prompts(prompts, "prompts")
        if len(prompts) != len(images):
            raise BilevelError(
                f"CLIP score needs one prompt per image; got {len(images)} images, {len(prompts)} prompts"
            )
        image = self.image_features(images)
        text = self.text_features(prompts).to(image.device)
        return (100.0 * (image * text).sum(-1)).clamp(min=0.0)


class ClipConceptDetector:
    """Zero-shot concept detection: softmax over concept and neutral prompts at CLIP's own temperature.

    An image shows the concept when the concept prompts together take more than half the probability. Neutral
    prompts give the detector something to choose instead, which a fixed cosine threshold would not.
    """

    threshold = 0.5

    def __init__(self, scorer: ClipScorer, concept_prompts: Sequence[str], neutral_prompts: Sequence[str]) -> None:
        concept = _check_prompts(concept_prompts, "concept_prompts")
        neutral = _check_prompts(neutral_prompts, "neutral_prompts")
        if not concept or not neutral:
            raise BilevelError(
                "ClipConceptDetector needs at least one concept prompt and one neutral prompt; "
                f"got {len(concept)} concept and {len(neutral)} neutral"
            )
        self.scorer = scorer
        self.concept_prompts, self.neutral_prompts = concept, neutral
        self.text = scorer.text_features(concept + neutral)  # encoded once: detection is then image-only

    def concept_probability(self, images: torch.Tensor) -> torch.Tensor:
        """[N]: the concept prompts' total softmax probability."""
        image = self.scorer.image_features(images)
        logits = self.scorer.logit_scale * image @ self.text.to(image.device).T
        return logits.softmax(dim=-1)[:, : len(self.concept_prompts)].sum(dim=-1)

    def detect(self, images: torch.Tensor) -> torch.Tensor:
        """[N] bool: the concept prompts' total probability exceeds 0.5."""
        return self.concept_probability(images) > self.threshold
