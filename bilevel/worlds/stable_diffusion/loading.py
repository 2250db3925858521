"""Load a Stable Diffusion pipeline's parts (UNet, VAE, text encoder, tokenizer, scheduler) from a local diffusers
folder or a Hugging Face Hub id, without ever running code shipped with the model unless trust_remote_code is set.

Each part is loaded with its own diffusers/transformers class (as named in model_index.json), safetensors only;
a model_index.json that names any other library (custom code) is refused unless the user trusts it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bilevel.core.errors import BilevelError

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TRUSTED_LIBRARIES = ("diffusers", "transformers")
TINY_PIPELINE = "TinyTextToImagePipeline"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class SDParts:
    """The frozen parts of a Stable Diffusion pipeline (all in eval mode, requires_grad False)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    source: str


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set: every load is then local_files_only (the local cache only)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def is_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not Path(source).expanduser().exists()


def read_model_index(source: str) -> dict[str, Any]:
    """model_index.json of a local folder or a hub id; one-line BilevelErrors for anything missing or corrupt."""
    path = Path(source).expanduser()
    if path.is_dir():
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise BilevelError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    elif is_hub_id(source):
        index_file = _hub_file(source, "model_index.json")
    else:
        raise BilevelError(
            f"model {source!r} not found; accepted: 'tiny', a local diffusers pipeline folder or a hub id (owner/name)"
        )
    try:
        index = json.loads(Path(index_file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BilevelError(f"corrupt model_index.json in {source}: {exc}") from None
    if not isinstance(index, dict):
        raise BilevelError(f"corrupt model_index.json in {source}: expected a JSON object")
    return index


def _hub_file(repo: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=hub_offline())
    except Exception as exc:  # noqa: BLE001 - offline, not cached, no such repo, no network: all one line
        why = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            if hub_offline()
            else str(exc).splitlines()[0]
        )
        raise BilevelError(f"cannot get {filename} of hub model {repo!r}: {why}") from None


def is_tiny_pipeline(source: str) -> bool:
    """Whether `source` is the tiny world's teacher ('tiny' or a TinyTextToImagePipeline folder)."""
    if source == "tiny":
        return True
    path = Path(source).expanduser()
    if not (path / "model_index.json").is_file():
        return False
    try:
        return json.loads((path / "model_index.json").read_text()).get("_class_name") == TINY_PIPELINE
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def check_sd_index(index: dict[str, Any], source: str, trust_remote_code: bool) -> bool:
    """Validate a model_index.json for a Stable Diffusion run; True when it needs custom code (and it is trusted)."""
    custom = []
    cls = index.get("_class_name")
    if not isinstance(cls, str):
        custom.append(f"pipeline class {cls!r}")
    if index.get("text_encoder_2") not in (None, [None, None]):
        raise BilevelError(
            f"{source} has two text encoders (SDXL-style {cls}); supported: Stable Diffusion 1.x/2.x pipelines"
        )
    for part in PARTS:
        entry = index.get(part)
        if not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
            raise BilevelError(
                f"{source} is not a Stable Diffusion pipeline: model_index.json has no {part!r} "
                f"(needs {', '.join(PARTS)}; found {cls})"
            )
        library, name = entry
        if library not in TRUSTED_LIBRARIES:
            custom.append(f"{part} from {library}.{name}")
    if custom and not trust_remote_code:
        raise BilevelError(
            f"{source} needs custom code ({'; '.join(custom)}); pass model.trust_remote_code=true "
            "(--set model.trust_remote_code=true) only if you trust its author"
        )
    return bool(custom)


def load_sd_parts(source: str, device: str = "cpu", trust_remote_code: bool = False) -> SDParts:
    """The frozen parts of the pipeline at `source` (local folder or hub id), on `device`, in fp32."""
    from bilevel.worlds.models import quiet_hub_libraries

    index = read_model_index(source)
    if index.get("_class_name") == TINY_PIPELINE:
        raise BilevelError(f"{source} is a tiny-world pipeline; it runs in the tiny world, not as Stable Diffusion")
    needs_code = check_sd_index(index, source, trust_remote_code)
    quiet_hub_libraries()
    where = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)  # the libraries log a failed load at ERROR before raising: keep one line
    try:
        parts = _load_custom(where, trust_remote_code) if needs_code else _load_each(where, index)
    except BilevelError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt weights, missing files, bad configs: one line naming the folder
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BilevelError(f"cannot load Stable Diffusion pipeline from {source}: {first}") from None
    finally:
        logging.disable(previous)
    unet, vae, text_encoder, tokenizer, scheduler = parts
    if unet.config.in_channels != vae.config.latent_channels:
        raise BilevelError(
            f"{source}: the UNet takes {unet.config.in_channels} channels but the VAE makes "
            f"{vae.config.latent_channels} (inpainting/depth pipelines are not supported; use a text-to-image one)"
        )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False).to(device)
    return SDParts(unet, vae, text_encoder, tokenizer, dict(scheduler.config), source)


def _load_each(where: str, index: dict[str, Any]) -> tuple[Any, ...]:
    """Each part with the diffusers/transformers class model_index.json names (never code from the folder)."""
    import diffusers
    import transformers

    common = {"local_files_only": hub_offline()}
    loaded = []
    for part in PARTS:
        library, name = index[part]
        module = diffusers if library == "diffusers" else transformers
        cls = getattr(module, name, None)
        if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
            raise BilevelError(f"{where}: {part} class {library}.{name} is not available in this {library} version")
        if part == "unet" and Path(where).is_dir():
            from bilevel.worlds.models import exported_student_unet

            student = exported_student_unet(Path(where))  # a channel-pruned student exported into the pipeline
            if student:
                loaded.append(student["unet"])
                continue
        kwargs: dict[str, Any] = {"subfolder": part, **common}
        if part in ("unet", "vae", "text_encoder"):
            kwargs["use_safetensors"] = True
        loaded.append(cls.from_pretrained(where, **kwargs))
    return tuple(loaded)


def _load_custom(where: str, trust_remote_code: bool) -> tuple[Any, ...]:
    """A pipeline whose index names custom code: only reached with trust_remote_code=True."""
    from diffusers import DiffusionPipeline

    assert trust_remote_code
    pipe = DiffusionPipeline.from_pretrained(
        where, trust_remote_code=True, use_safetensors=True, local_files_only=hub_offline()
    )
    return tuple(getattr(pipe, part) for part in PARTS)
