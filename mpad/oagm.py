"""Object-Attention Anomaly Generation Module, OAGM (paper sec. 3.4).

OAGM makes the anomalous training samples (x', M'_a) that MPTS (sec. 3.3, eq. 4-5) tunes the prompts on:

1. an object mask M_obj per shot image (`object_masks`), so that noise lands on the item and not on the
   background;
2. Gaussian noise N(0, sigma^2) added where the chosen region is 1 (`add_noise`, the paper's equation
   for x'); the anomaly mask M'_a is exactly that region (eq. 3 then gives M'_n = 1 - M'_a).

Object masks (method):

- `clip` (default): CLIP Surgery style. The dual-path encoder with V-V attention and no locality mask
  (independent of the `laa` settings) gives patch features; each patch is scored against an object
  prompt ensemble ("a photo of a {class}" templates) and a background prompt ensemble, softmax over the
  two (the same `patch_probabilities` as the anomaly maps), upsampled bilinearly to the image size and
  thresholded. With random weights this map says nothing; the fallback below then usually applies.
- `border`: no model. The image border is taken as background; a pixel's distance from the border's
  colour statistics (per-channel robust z-score) is turned into a probability; works for objects on a
  plain background.

Both masks are cleaned with scikit-image morphology (`clean_mask`). Texture categories get the same
mask (`oagm.texture_mask: mask_method`, the paper read literally: sec. 3.4 makes M_obj with the VLM for
every category) or the whole image (`whole`; then x' with and without OAGM is drawn from the same
support, and Table 3's texture rows could not differ). An object mask that is empty or covers almost
the whole image falls back to the whole image; `ObjectMask.fallback` says why (the caller decides whether
and how to tell a user).

Regions: `object` noises the whole object mask (the paper's literal reading); `blobs` noises a union of
a few random irregular ellipses inside the object, so a sample holds both normal and anomalous pixels.
With `enabled = False` the object mask is ignored (noise anywhere: paper Table 3, "without OAGM").

`synthesize_set` runs the whole module for a category's shots from an `OagmConfig`, seeded by
(oagm.seed, category).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from skimage import morphology
from skimage.transform import resize

from mpad.clip import ClipBundle
from mpad.config import LaaConfig, OagmConfig
from mpad.data.shots import stable_hash
from mpad.features import build_encoder, encode_batched
from mpad.prompts import TEMPLATES, class_words, text_ensemble
from mpad.scoring import anomaly_maps
from mpad.text_cache import TextCache

MASK_METHODS = ("clip", "border")
REGIONS = ("object", "blobs")
TEXTURE_MASKS = ("mask_method", "whole")
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


def add_noise(image: torch.Tensor, region_mask: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """The paper's equation for x' (sec. 3.4): x'(i,j) = x(i,j) + N(0, sigma^2) where the mask is 1, else x(i,j).

    image: (3, H, W) float in [0, 1]. region_mask: (H, W) bool (M_obj in the paper, or a region inside
    it). The noise is drawn from `generator` for every pixel (same draws whatever the mask), added only
    inside the mask, and the result is clamped to [0, 1] there. Pixels outside the mask are returned
    bit-identical. Returns a new (3, H, W) tensor; the input is not modified.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    if region_mask.shape != image.shape[1:]:
        raise ValueError(f"region_mask must be {tuple(image.shape[1:])}, got {tuple(region_mask.shape)}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    noise = torch.randn(image.shape, generator=generator, device=generator.device, dtype=torch.float32)
    noisy = (image + sigma * noise.to(device=image.device, dtype=image.dtype)).clamp(0.0, 1.0)
    return torch.where(region_mask.to(device=image.device, dtype=torch.bool)[None], noisy, image)


# --------------------------------------------------------------------------------------- object masks


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


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int = 4) -> np.ndarray:
    """(h, w) float in [0, 1]: a `cells` x `cells` uniform grid, bilinearly upsampled."""
    return resize(rng.random((cells, cells)), (h, w), order=1, mode="edge", anti_aliasing=False)


def random_blobs(
    object_mask: np.ndarray,
    rng: np.random.Generator,
    max_blobs: int = 3,
    size_range: tuple[float, float] = (0.08, 0.3),
    max_tries: int = 20,
) -> np.ndarray:
    """(H, W) bool object mask -> (H, W) bool union of 1..max_blobs random blobs, inside the object.

    Each blob is an ellipse centred on a random object pixel, with semi-axes a random fraction
    (`size_range`) of sqrt(object area), random orientation, and a boundary made irregular by smooth
    noise (a pixel is in if its normalised ellipse radius is below 0.7 + 0.6 * noise). The union is
    intersected with the object. Redrawn (up to `max_tries`) until it covers a fraction strictly
    between 0 and 1 of the object; the last draw's centre pixels are the floor.
    """
    h, w = object_mask.shape
    ys, xs = np.nonzero(object_mask)
    if len(ys) == 0:
        raise ValueError("random_blobs needs a non-empty object mask")
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    extent = math.sqrt(len(ys))
    blobs = np.zeros((h, w), dtype=bool)
    for _ in range(max_tries):
        blobs = np.zeros((h, w), dtype=bool)
        centres = []
        for _ in range(int(rng.integers(1, max_blobs + 1))):
            i = int(rng.integers(len(ys)))
            cy, cx = float(ys[i]), float(xs[i])
            a, b = (max(1.0, extent * rng.uniform(*size_range)) for _ in range(2))
            theta = rng.uniform(0.0, math.pi)
            dy, dx = yy - cy, xx - cx
            u = (dx * math.cos(theta) + dy * math.sin(theta)) / a
            v = (-dx * math.sin(theta) + dy * math.cos(theta)) / b
            radius = np.sqrt(u**2 + v**2)
            blobs |= radius <= 0.7 + 0.6 * _smooth_noise(rng, h, w)
            centres.append((ys[i], xs[i]))
        blobs &= object_mask
        for cy, cx in centres:
            blobs[cy, cx] = True
        covered = blobs.sum()
        if 0 < covered < len(ys):
            break
    return blobs


@dataclass
class SynthesizedSample:
    """One x' and its M'_a. image: (H, W, 3) uint8. mask: (H, W) bool, True exactly where noise was added."""

    image: np.ndarray
    mask: np.ndarray

    @property
    def anomalous_fraction(self) -> float:
        return float(self.mask.mean())


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 (rounded)."""
    arr = (image.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(arr)


def synthesize(
    image: torch.Tensor,
    object_mask: np.ndarray,
    samples: int,
    sigma: float,
    rng: np.random.Generator,
    generator: torch.Generator,
    region: str = "blobs",
    enabled: bool = True,
    clean_fraction: float = 0.0,
) -> list[SynthesizedSample]:
    """`samples` synthesized anomalies (x', M'_a) from one shot.

    image: (3, H, W) float in [0, 1], already at the model's input size. object_mask: (H, W) bool M_obj.
    region: `object` (noise on the whole object) or `blobs` (random blobs inside it). enabled False: the
    object mask is ignored (the region is drawn in the whole image). round(clean_fraction * samples)
    samples, chosen at random, get no noise (all-False mask; the image is the quantised shot). The draws
    come from `rng` (regions, clean picks) and `generator` (noise) only.
    """
    if region not in REGIONS:
        raise ValueError(f"oagm.region must be one of {REGIONS}, got {region!r}")
    if not 0.0 <= clean_fraction <= 1.0:
        raise ValueError(f"oagm.clean_fraction must be in [0, 1], got {clean_fraction}")
    if samples < 0:
        raise ValueError(f"oagm.samples must be >= 0, got {samples}")
    h, w = image.shape[1:]
    if object_mask.shape != (h, w):
        raise ValueError(f"object mask is {object_mask.shape}, image is {(h, w)}")
    support = object_mask.astype(bool) if enabled else np.ones((h, w), dtype=bool)
    n_clean = round(clean_fraction * samples)
    clean = set(rng.permutation(samples)[:n_clean].tolist())
    out = []
    for index in range(samples):
        if index in clean:
            out.append(SynthesizedSample(to_uint8(image), np.zeros((h, w), dtype=bool)))
            continue
        mask = support if region == "object" else random_blobs(support, rng)
        noisy = add_noise(image, torch.from_numpy(mask), sigma, generator)
        out.append(SynthesizedSample(to_uint8(noisy), mask.copy()))
    return out


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


def synthesize_set(
    images: torch.Tensor, masks: Sequence[ObjectMask], category: str, oagm: OagmConfig
) -> Iterator[list[SynthesizedSample]]:
    """Per shot, in order, its `oagm.samples` synthesized anomalies (`synthesize`), lazily.

    images: (K, 3, H, W) float in [0, 1] at the model's input size; masks: their K object masks. One
    numpy Generator seeded by (oagm.seed, category) draws regions and clean picks for all shots, and one
    torch Generator seeded from it the noise: the same config and shots give the same set on any machine.
    """
    if len(masks) != len(images):
        raise ValueError(f"{len(images)} shot images but {len(masks)} object masks")
    rng = np.random.default_rng([oagm.seed, stable_hash(category)])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    for image, obj in zip(images, masks, strict=True):
        yield synthesize(
            image,
            obj.mask,
            oagm.samples,
            oagm.sigma,
            rng=rng,
            generator=generator,
            region=oagm.region,
            enabled=oagm.enabled,
            clean_fraction=oagm.clean_fraction,
        )
