"""Object-Attention Anomaly Generation Module, OAGM (paper sec. 3.4).

OAGM makes the anomalous training samples (x', M'_a) that MPTS (sec. 3.3, eq. 4-5) tunes the prompts on:

1. an object mask M_obj per shot image (mpad.object_masks), so that noise lands on the item and not on the
   background;
2. Gaussian noise N(0, sigma^2) added where the chosen region is 1 (`add_noise`, the paper's equation
   for x'), clamped to [0, 1] and quantised to uint8 (ours); the anomaly mask M'_a is exactly that region,
   clipped pixels included (eq. 3 then gives M'_n = 1 - M'_a). See docs/method.md#oagm.

Regions: `object` noises the whole object mask (the paper's literal reading); `blobs` noises a union of
a few random irregular ellipses inside the object, so a sample holds both normal and anomalous pixels.
With `enabled = False` the object mask is ignored (noise anywhere: paper Table 3, "without OAGM").

`synthesize_set` runs the noise half for a category's shots from an `OagmConfig`, seeded by
(oagm.seed, category).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from skimage.transform import resize

from mpad.config import REGIONS, OagmConfig
from mpad.data.shots import stable_hash
from mpad.object_masks import ObjectMask


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
