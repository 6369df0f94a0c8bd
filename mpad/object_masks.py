"""Object masks M_obj for OAGM (paper sec. 3.4): where on a shot image the object is, so that the synthesized
noise lands on the item and not on the background.

Methods:

- `clip` (default): CLIP Surgery style. The dual-path encoder with V-V attention and no locality mask
  (independent of the `laa` settings) gives patch features; each patch is scored against an object
  prompt ensemble ("a photo of a {class}" templates) and a background prompt ensemble, softmax over the
  two (the same `patch_probabilities` as the anomaly maps), upsampled bilinearly to the image size and
  thresholded. With random weights this map says nothing; the fallback below then usually applies.
- `border`: no model. The image border is taken as background; a pixel's distance from the border's
  colour statistics (per-channel robust z-score) is turned into a probability; works for objects on a
  plain background.

Both masks are cleaned with scikit-image morphology (`clean_mask`). Texture categories get the same
mask (`oagm.texture_mask: mask_method`) or the whole image (`whole`): docs/method.md#oagm. An object mask
that is empty or covers almost the whole image falls back to the whole image; `ObjectMask.fallback` says why
(the caller decides whether and how to tell a user).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from skimage import morphology

from mpad.clip import ClipBundle
from mpad.config import MASK_METHODS, TEXTURE_MASKS, LaaConfig, OagmConfig
from mpad.features import build_encoder, encode_batched
from mpad.prompts import TEMPLATES, class_words, text_ensemble
from mpad.scoring import anomaly_maps
from mpad.text_cache import TextCache

BACKGROUND_PROMPTS = (
    "a photo of the background.",
    "a photo of a blank surface.",
    "a photo of an empty surface.",
    "a photo of a plain background.",
    "a photo of an empty table.",
    "a photo of nothing.",
    "a close-up photo of the background.",
)
# An object mask covering less than MIN_OBJECT_FRACTION or more than MAX_OBJECT_FRACTION of the image
# is not trusted: the whole image is used instead (`ObjectMask.fallback` says why).
MIN_OBJECT_FRACTION = 0.01
MAX_OBJECT_FRACTION = 0.97
# Border method: width of the border strip (fraction of the shorter side, at least 2 px), the floor on
# the border's colour spread (on [0, 1] values) and the z-score at which the probability reaches 0.5.
BORDER_FRACTION = 0.05
BORDER_MIN_STD = 3.0 / 255.0
BORDER_Z_HALF = 6.0
# Images per encoder forward pass of the clip object mask (bounds device memory for large k).
ENCODE_BATCH = 32


@dataclass
class ObjectMask:
    """M_obj of one image. mask: (H, W) bool. fallback: why the whole image was used instead (or None)."""

    mask: np.ndarray
    fallback: str | None = None

    @property
    def fraction(self) -> float:
        return float(self.mask.mean())


@torch.no_grad()
def clip_object_probability(
    bundle: ClipBundle, images: torch.Tensor, category: str, layers: int = 6, cache: TextCache | None = None
) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W) probability that each pixel shows the object.

    Patch features from the dual-path encoder with V-V attention over the last min(layers, depth)
    blocks and no locality mask (CLIP Surgery); softmax over [background, object] text ensembles of the
    scaled cosine similarities (the S' maps of sec. 3.3 with [background, object] in place of
    [normal, anomaly], so the "anomaly" channel of `scoring.anomaly_maps` is the object), upsampled bilinearly.
    """
    depth = len(bundle.model.visual.transformer.resblocks)
    settings = LaaConfig(attention="vv", k=None, layers=max(1, min(int(layers), depth)), cls="neighbor-cls")
    encoder = build_encoder(bundle, settings)
    patches = encode_batched(encoder, bundle, images, ENCODE_BATCH).patch_features  # (B, h, w, D)
    words = class_words(category)
    ensemble = partial(text_ensemble, bundle.model, bundle.tokenizer, cache=cache)
    text = torch.stack([ensemble(BACKGROUND_PROMPTS), ensemble([t.format(words) for t in TEMPLATES])])
    scale = bundle.model.logit_scale.exp().float()
    return anomaly_maps(patches, text.to(patches.device), scale, images.shape[-2:]).cpu()


def border_object_probability(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W) probability-like score of "not background".

    The background model is the border strip (BORDER_FRACTION of the shorter side): per channel its
    median and robust spread s = max(1.4826 * MAD, BORDER_MIN_STD). A pixel's distance is the largest
    per-channel z = |x - median| / s, mapped to p = 1 - 2^(-(z / BORDER_Z_HALF)^2) (p = 0.5 at
    z = BORDER_Z_HALF).
    """
    _, _, h, w = images.shape
    b = max(2, round(BORDER_FRACTION * min(h, w)))
    border = torch.ones(h, w, dtype=torch.bool)
    border[b:-b, b:-b] = False
    out = []
    for image in images.float().cpu():
        strip = image[:, border]  # (3, n)
        median = strip.median(dim=1).values
        mad = (strip - median[:, None]).abs().median(dim=1).values
        spread = (1.4826 * mad).clamp_min(BORDER_MIN_STD)
        z = ((image - median[:, None, None]).abs() / spread[:, None, None]).amax(dim=0)
        out.append(1.0 - torch.pow(2.0, -((z / BORDER_Z_HALF) ** 2)))
    return torch.stack(out)


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: closing with a disc of radius ~1% of the shorter side, then removal of
    connected components and filling of holes smaller than 1% of the image area."""
    h, w = mask.shape
    radius = max(1, round(0.01 * min(h, w)))
    small = max(1, int(0.01 * h * w))
    out = morphology.closing(mask.astype(bool), morphology.disk(radius)).astype(bool)
    out = morphology.remove_small_objects(out, max_size=small)
    out = morphology.remove_small_holes(out, max_size=small)
    return np.ascontiguousarray(out, dtype=bool)


def object_masks(
    images: torch.Tensor,
    category: str,
    method: str = "clip",
    threshold: float = 0.5,
    texture: bool = False,
    bundle: ClipBundle | None = None,
    layers: int = 6,
    cache: TextCache | None = None,
) -> list[ObjectMask]:
    """M_obj for each of `images` (B, 3, H, W) float in [0, 1]; masks are (H, W) bool.

    texture: the whole image is the object (no model run). method `clip` needs `bundle` (and reads its
    prompt ensembles from `cache` when given). A mask whose
    cleaned area is outside [MIN_OBJECT_FRACTION, MAX_OBJECT_FRACTION] of the image falls back to the
    whole image; `ObjectMask.fallback` records why (returned, not printed: reporting is the caller's).
    """
    if method not in MASK_METHODS:
        raise ValueError(f"oagm.mask_method must be one of {MASK_METHODS}, got {method!r}")
    b, _, h, w = images.shape
    if texture:
        return [ObjectMask(np.ones((h, w), dtype=bool)) for _ in range(b)]
    if method == "clip":
        if bundle is None:
            raise ValueError("object mask method 'clip' needs the model bundle")
        probs = clip_object_probability(bundle, images, category, layers, cache)
    else:
        probs = border_object_probability(images)
    out = []
    for index, prob in enumerate(probs.numpy()):
        mask = clean_mask(prob > threshold)
        fraction = float(mask.mean())
        if MIN_OBJECT_FRACTION <= fraction <= MAX_OBJECT_FRACTION:
            out.append(ObjectMask(mask))
            continue
        kind = "empty" if fraction < MIN_OBJECT_FRACTION else "nearly the whole image"
        reason = (
            f"{category} image {index}: the {method} object mask is {kind} ({fraction:.1%} of the pixels); "
            "using the whole image as the object instead"
        )
        out.append(ObjectMask(np.ones((h, w), dtype=bool), fallback=reason))
    return out


# -------------------------------------------------------------------------------------------- regions


def shot_object_masks(
    images: torch.Tensor,
    category: str,
    oagm: OagmConfig,
    texture: bool,
    bundle: ClipBundle | None = None,
    cache: TextCache | None = None,
) -> list[ObjectMask]:
    """`object_masks` of the shots (K, 3, H, W) with the method, threshold and layers of `oagm`.

    texture: whether `category` is a texture; it then gets the whole image only when oagm.texture_mask is
    `whole`, else the mask of oagm.mask_method like an object."""
    if oagm.texture_mask not in TEXTURE_MASKS:
        raise ValueError(f"oagm.texture_mask must be one of {TEXTURE_MASKS}, got {oagm.texture_mask!r}")
    whole = texture and oagm.texture_mask == "whole"
    return object_masks(
        images,
        category,
        oagm.mask_method,
        oagm.mask_threshold,
        texture=whole,
        bundle=bundle,
        layers=oagm.mask_layers,
        cache=cache,
    )
