"""From images to the encoder's outputs, batched: the one way train, evaluate and predict see images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from mpad.clip import ClipBundle
from mpad.encoder import EncoderOutput, LocalityAwareEncoder
from mpad.transforms import model_input, to_tensor


def build_encoder(
    bundle: ClipBundle, laa: dict[str, Any], intermediate_layers: Sequence[int] = ()
) -> LocalityAwareEncoder:
    """The LAA encoder for `bundle` from the `laa` settings {attention, k, layers, cls}."""
    encoder = LocalityAwareEncoder(
        bundle.model.visual,
        layers=int(laa["layers"]),
        attention=str(laa["attention"]),
        k=None if laa.get("k") is None else float(laa["k"]),
        cls=str(laa.get("cls", "neighbor-cls")),
        intermediate_layers=intermediate_layers,
    )
    return encoder.to(bundle.device).eval()


@torch.no_grad()
def encode(encoder: LocalityAwareEncoder, bundle: ClipBundle, images: torch.Tensor) -> EncoderOutput:
    """images (B, 3, H, W) float in [0, 1], any size -> EncoderOutput in fp32 (on the bundle's device)."""
    batch = model_input(images.to(bundle.device), bundle.image_size, bundle.mean, bundle.std)
    batch = batch.to(bundle.compute_dtype)  # the resize and normalisation run in fp32
    return encoder(batch)


def stack_images(images: Iterable[np.ndarray], size: Sequence[int]) -> torch.Tensor:
    """uint8 (H, W, 3) images of any sizes -> (B, 3, *size) float in [0, 1] (bicubic resize, no crop)."""
    tensors = [model_input(to_tensor(img)[None], size, (0, 0, 0), (1, 1, 1)) for img in images]
    return torch.cat(tensors)
