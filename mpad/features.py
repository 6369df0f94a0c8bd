"""From images to the encoder's outputs, batched: the one way train, evaluate and predict see images."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from mpad.config import LaaConfig
from mpad.laa import EncoderOutput, LocalityAwareEncoder
from mpad.transforms import model_input, resize, to_tensor

if TYPE_CHECKING:  # stack_images serves predict's ONNX backend, which runs without open_clip
    from mpad.clip import ClipBundle


def build_encoder(
    bundle: ClipBundle, laa: LaaConfig, intermediate_layers: Sequence[int] = (), image_embedding: bool = False
) -> LocalityAwareEncoder:
    """The LAA encoder (eq. 11-12) for `bundle` with the settings `laa` (params, or a prompts file's). Without
    `image_embedding` (only the image score `global` reads it) its outputs have none, and the last block's
    original path is skipped (mpad.laa)."""
    encoder = LocalityAwareEncoder(
        bundle.model.visual,
        layers=int(laa.layers),
        attention=str(laa.attention),
        k=None if laa.k is None else float(laa.k),
        cls=str(laa.cls),
        intermediate_layers=intermediate_layers,
        image_embedding=image_embedding,
    )
    return encoder.to(bundle.device).eval()


@torch.no_grad()
def encode(encoder: LocalityAwareEncoder, bundle: ClipBundle, images: torch.Tensor) -> EncoderOutput:
    """images (B, 3, H, W) float in [0, 1], any size -> EncoderOutput in fp32 (on the bundle's device)."""
    batch = model_input(images.to(bundle.device), bundle.image_size, bundle.mean, bundle.std)
    batch = batch.to(bundle.compute_dtype)  # the resize and normalisation run in fp32
    return encoder(batch)


@torch.no_grad()
def encode_batched(
    encoder: LocalityAwareEncoder, bundle: ClipBundle, images: torch.Tensor, batch_size: int
) -> EncoderOutput:
    """`encode` over (N, 3, H, W) images in chunks of `batch_size` (bounded device memory), outputs
    concatenated along the batch: image_embedding (N, D) or None, patch_features (N, H', W', D), intermediates
    per requested block (N, H', W', width); all fp32 on the bundle's device."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outs = [encode(encoder, bundle, images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return EncoderOutput(
        image_embedding=None if outs[0].image_embedding is None else torch.cat([o.image_embedding for o in outs]),
        patch_features=torch.cat([o.patch_features for o in outs]),
        intermediates=[torch.cat(layer) for layer in zip(*(o.intermediates for o in outs), strict=True)],
    )


def stack_images(images: Iterable[np.ndarray], size: Sequence[int]) -> torch.Tensor:
    """uint8 (H, W, 3) images of any sizes -> (B, 3, *size) float, [0, 1] up to bicubic overshoot (resized, no
    crop). Every consumer clamps first (`encode`'s `model_input`, the exported graph's `normalise`), so the
    overshoot is not clamped here too: a server calls this once a request, on its event loop's time."""
    return torch.cat([resize(to_tensor(img)[None], size) for img in images])
