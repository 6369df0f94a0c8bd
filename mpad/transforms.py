"""Images to model input: resize the whole image (no crop, so masks stay aligned) and normalise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    # (3, H, W) contiguous before the float conversion: `stack_images` then takes 8 ms of a core for a 1024 px image,
    # against 14 ms on the channels-last layout a float copy of the permuted view keeps, for the same values bit for
    # bit (tests/test_transforms.py). The copy also spares torch a read-only array (load_image may return one).
    return torch.from_numpy(np.array(image.transpose(2, 0, 1), order="C")).float().div_(255.0)


def model_input(images: torch.Tensor, size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size) resized (bicubic, antialiased) and normalised with mean/std.

    The full image is resized (aspect ratio not kept, no centre crop) so that every pixel of the
    ground-truth mask has a place in the anomaly map.
    """
    return normalise(resize(images, size), mean, std)


def resize(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, *size): bicubic, antialiased, the whole image (no crop); an identity at the same size
    (bit for bit, tested), so that `model_input` of an image `stack_images` already resized changes nothing."""
    return F.interpolate(images, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) -> the same clamped to [0, 1] (bicubic overshoots) and normalised with per-channel mean/std.

    The exported ONNX model starts with this step (mpad.deploy.graph), so its callers resize only.
    """
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images.clamp(0, 1) - mean_t) / std_t
