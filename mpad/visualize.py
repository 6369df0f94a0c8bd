"""Pictures a user looks at: anomaly heat maps and side-by-side overlays (numpy only, no plotting library)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Anchor colours of a perceptually ordered map (close to matplotlib's "inferno"), from low to high.
_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def heatmap(values: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """(H, W) scores -> (H, W, 3) uint8 colours; `low`..`high` spans the colour map (clipped outside)."""
    span = max(high - low, 1e-12)
    t = np.clip((np.asarray(values, dtype=np.float64) - low) / span, 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(t.astype(np.int64), len(_ANCHORS) - 2)
    frac = (t - i)[..., None]
    return np.rint(_ANCHORS[i] * (1 - frac) + _ANCHORS[i + 1] * frac).astype(np.uint8)


def blend(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Mix two (H, W, 3) uint8 pictures: (1 - alpha) * image + alpha * colours."""
    mixed = (1 - alpha) * image.astype(np.float64) + alpha * colours.astype(np.float64)
    return np.rint(mixed).astype(np.uint8)


def outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """Draw the boundary of the bool (H, W) `mask` on a copy of `image` (H, W, 3) uint8."""
    out = image.copy()
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    out[m & ~inner] = colour
    return out


def overlay_panel(image: np.ndarray, mask: np.ndarray | None, amap: np.ndarray, low: float, high: float) -> np.ndarray:
    """[image | image with the ground truth outlined | anomaly heat map over the image], (H, 3W + 8, 3) uint8.

    image (H, W, 3) uint8, mask (H, W) bool or None, amap (H, W) scores coloured over `low`..`high`.
    """
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    truth = outline(image, mask) if mask is not None else image
    return np.concatenate([image, gap, truth, gap, blend(image, heatmap(amap, low, high))], axis=1)


def output_size(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(H, W) of a written map: the image's own size, its longer side scaled down to `max_size` if larger."""
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def render_map(
    image: np.ndarray, amap: np.ndarray, max_size: int, low: float, high: float
) -> tuple[np.ndarray, np.ndarray]:
    """An image (H, W, 3) uint8 and its anomaly map (R, R) -> (overlay (h, w, 3), grayscale map (h, w)) uint8.

    Both at `output_size` of the image; the map is resized bilinearly and coloured / scaled over low..high.
    """
    h, w = output_size(image.shape[0], image.shape[1], max_size)
    big = F.interpolate(
        torch.as_tensor(amap, dtype=torch.float32)[None, None], size=(h, w), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    picture = image if (h, w) == image.shape[:2] else np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
    gray = np.rint(np.clip((big - low) / max(high - low, 1e-12), 0.0, 1.0) * 255).astype(np.uint8)
    return blend(picture, heatmap(big, low, high)), gray
