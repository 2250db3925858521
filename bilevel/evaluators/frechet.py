"""Fréchet distance between CLIP image features of generated images and a folder of reference images.

The matrix square root is an eigendecomposition of the symmetric product sqrt(S1) S2 sqrt(S1) in float64 (torch
only, no scipy): tr sqrt(S1 S2) equals tr sqrt(sqrt(S1) S2 sqrt(S1)), and the symmetric form is stable even when
the covariances are singular, as they are whenever there are fewer images than feature dimensions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bilevel.core.errors import BilevelError

if TYPE_CHECKING:
    from bilevel.evaluators.clip import ClipScorer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix; round-off negative eigenvalues count as 0."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_from_moments(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2) for Gaussians N(mu1, S1), N(mu2, S2)."""
    mu1, mu2, sigma1, sigma2 = (t.detach().to("cpu", torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise BilevelError(
            f"Fréchet distance needs means [D] and covariances [D, D] of one D; got {list(mu1.shape)}, "
            f"{list(sigma1.shape)}, {list(mu2.shape)}, {list(sigma2.shape)}"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = eigenvalues.clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)  # identical sets give round-off around 0, never a meaningful negative


def _moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = features.detach().to("cpu", torch.float64)
    return features.mean(dim=0), torch.cov(features.T, correction=1).reshape(features.shape[1], features.shape[1])


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] and [M, D] (unbiased covariances)."""
    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise BilevelError(
            f"Fréchet distance needs two feature matrices [N, D] and [M, D] with one D; got "
            f"{list(feats_a.shape)} and {list(feats_b.shape)}"
        )
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise BilevelError(
            f"Fréchet distance needs at least 2 samples on each side to estimate a covariance; got "
            f"{len(feats_a)} and {len(feats_b)}"
        )
    mu_a, sigma_a = _moments(feats_a)
    mu_b, sigma_b = _moments(feats_b)
    return frechet_distance_from_moments(mu_a, sigma_a, mu_b, sigma_b)


def reference_image_files(folder: Path) -> list[Path]:
    """The folder's images (top level only, sorted), or a one-line error for a missing or image-less folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BilevelError(
            f"reference image folder {folder} does not exist; pass a folder of {'/'.join(IMAGE_SUFFIXES)} images"
        )
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BilevelError(
            f"reference image folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images (subfolders are not read)"
        )
    return files


def load_image(path: Path) -> torch.Tensor:
    """One image file -> [1, 3, H, W] float in [0, 1] (RGB; alpha and palettes are flattened by PIL)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise BilevelError(f"cannot read reference image {path}: {exc}; accepted: {'/'.join(IMAGE_SUFFIXES)}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).float().div(255)


def folder_features(folder: Path, scorer: ClipScorer) -> torch.Tensor:
    """[M, D] CLIP image features of every image in `folder`, streamed in batches (never all pixels at once).

    Cached on the scorer by file names, sizes and modification times, so several arms share one pass.
    """
    files = reference_image_files(folder)
    key = (str(Path(folder).expanduser().resolve()),) + tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files
    )
    cached = scorer.folder_cache.get(key)
    if cached is not None:
        return cached
    chunks, pending = [], []
    for path in files:
        pending.append(scorer.preprocessing(load_image(path).to(scorer.device)))  # one size after preprocessing
        if len(pending) == scorer.batch_size:
            chunks.append(scorer.encode_pixels(torch.cat(pending)))
            pending = []
    if pending:
        chunks.append(scorer.encode_pixels(torch.cat(pending)))
    features = torch.cat(chunks).cpu()
    scorer.folder_cache = {key: features}  # keep one folder: a changed folder replaces the stale entry
    return features


def frechet_distance_to_folder(images: torch.Tensor, folder: Path, scorer: ClipScorer) -> float:
    """Fréchet distance between CLIP image features of `images` [N, 3, H, W] in [0, 1] and of `folder`'s images."""
    files = reference_image_files(folder)
    if len(images) < 2 or len(files) < 2:
        raise BilevelError(
            f"Fréchet distance needs at least 2 images on each side; got {len(images)} generated and "
            f"{len(files)} in {folder}"
        )
    return frechet_distance(scorer.image_features(images), folder_features(folder, scorer))
