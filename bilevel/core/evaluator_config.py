"""Evaluation options for real-image runs (pydantic; unknown keys are refused so typos fail loudly)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class EvaluatorConfig(BaseModel):
    """Which CLIP model scores and detects, which images the Fréchet distance compares against, and NudeNet."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    clip_model: str = Field(
        "openai/clip-vit-large-patch14",
        min_length=1,
        description="Hugging Face hub id or local folder of a transformers CLIPModel (safetensors weights)",
    )
    reference_images: Path | None = Field(
        None, description="folder of .png/.jpg/.jpeg/.webp images for the CLIP-feature Fréchet distance; None: skip it"
    )
    nudity: bool = Field(False, description="also run NudeNet (optional package `nudenet`)")
    nudity_threshold: float = Field(0.5, ge=0.0, le=1.0, description="NudeNet score at which a body part counts")
