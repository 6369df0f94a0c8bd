"""Score maps from patch features and the two text embeddings (paper sec. 3.3, S'_n and S'_a).

`pair_probabilities` is the softmax over [normal, anomaly] of the scaled cosine similarities per patch;
its anomaly channel, upsampled bilinearly to the evaluation size and optionally smoothed with a
Gaussian, is the anomaly map. The image score is read from the map: its maximum by default
(`image_score = "max"`), or the mean of its top `topk` fraction of pixels, or from the original path's
global embedding scored against the same prompts (`"global"`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IMAGE_SCORES = ("max", "topk_mean", "global")


def pair_probabilities(features: torch.Tensor, text: torch.Tensor, logit_scale: float | torch.Tensor) -> torch.Tensor:
    """features (..., D) L2-normalised, text (2, D) normalised [normal, anomaly] -> (..., 2) softmax probs."""
    return (logit_scale * (features @ text.t())).softmax(dim=-1)  # scaled after the product: 2 values, not D


def patch_probabilities(
    patch_features: torch.Tensor, text: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """(B, H', W', D) -> (B, 2, H', W'): S'_n and S'_a on the patch grid."""
    return pair_probabilities(patch_features, text, logit_scale).permute(0, 3, 1, 2)


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size), bilinear."""
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, H, W) smoothed with a separable Gaussian of std `sigma` pixels (reflect padding); sigma <= 0: copy."""
    if sigma <= 0:
        return maps.clone()
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps.unsqueeze(1)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def anomaly_maps(
    patch_features: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    size: Sequence[int],
) -> torch.Tensor:
    """(B, H', W', D) patch features -> (B, *size) anomaly probability maps S'_a, upsampled (smooth them with
    `gaussian_blur`, after any fusion with other maps)."""
    probs = patch_probabilities(patch_features, text, logit_scale)[:, 1:2]
    return upsample(probs, size)[:, 0]


def image_scores(
    maps: torch.Tensor,
    method: str = "max",
    topk: float = 0.01,
    image_embedding: torch.Tensor | None = None,
    text: torch.Tensor | None = None,
    logit_scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """(B, H, W) maps -> (B,) image anomaly scores by `method` (see module docstring)."""
    if method == "max":
        return maps.flatten(1).amax(dim=1)
    if method == "topk_mean":
        flat = maps.flatten(1)
        count = max(1, round(topk * int(flat.shape[1])))  # int(): a constant when torch.onnx traces it
        return flat.topk(count, dim=1).values.mean(dim=1)
    if method == "global":
        if image_embedding is None or text is None:
            raise ValueError("image_score = global needs the image embedding and the text embeddings")
        return pair_probabilities(F.normalize(image_embedding, dim=-1), text, logit_scale)[:, 1]
    raise ValueError(f"scoring.image_score must be one of {IMAGE_SCORES}, got {method!r}")
