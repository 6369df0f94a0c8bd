"""A small generated dataset in the MVTec AD layout, for offline runs and tests.

Three categories, chosen to exercise what real data exercises:

- `stripes` (texture): fine oriented stripes, RGB, 96x96 (HxW);
- `weave` (texture): a woven grid with structured noise, 8-bit GRAYSCALE png, 80x112 (not square);
- `disc` (object): a coloured disc at a varying position on a plain background, RGB, 112x96.

Test defects: scratch, hole, stain on the textures; scratch, stain, missing piece on the disc (always on
the disc). Each mask is exactly the set of pixels the defect changed (binary PNG, 0/255). The same
seed gives byte-identical files. Numbers measured on it say nothing about MVTec AD.

Held out (`render` only, never written by `generate`, so the dataset above is unchanged): `grain`, a
wood-like ring texture at 192x192 (three times mpad-tiny's input, as MVTec's 1024 px are four times
ViT-B-16+'s), with other defect kinds (`HELD_OUT_DEFECTS`): thin dark scratches, small colour spots, and
Gaussian noise added at full resolution (so the resize to the model's input averages it). The same
kinds can be asked of the other textures with `render(..., defect=kind)`. The former `bench/learning.py` used
them to measure whether learned prompts generalise beyond the generated defects (docs/decisions.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpad.data.catalog import SYNTHETIC_CATEGORIES
from mpad.data.mvtec import DatasetError
from mpad.io import atomic_path, write_png

SIZES: dict[str, tuple[int, int]] = {"stripes": (96, 96), "weave": (80, 112), "disc": (112, 96)}  # (H, W)
DEFECTS: dict[str, tuple[str, ...]] = {
    "stripes": ("scratch", "hole", "stain"),
    "weave": ("scratch", "hole", "stain"),
    "disc": ("scratch", "stain", "missing_piece"),
}
# Held out from the generated dataset: a texture and defect kinds that `generate` never writes.
HELD_OUT_CATEGORIES: tuple[str, ...] = ("grain",)
HELD_OUT_DEFECTS: tuple[str, ...] = ("dark_scratch", "spots", "fine_noise")
SIZES["grain"] = (192, 192)
DEFECTS["grain"] = HELD_OUT_DEFECTS
# fine_noise: std of the Gaussian noise (0..255 scale) added at full resolution inside an irregular blob.
FINE_NOISE_STD = 60.0
MARKER = ".mpad-synthetic"
_VERSION = 1  # bump when the generated images change, so fetch regenerates old trees

_DISC_BG = np.array([205.0, 205.0, 198.0])


@dataclass(frozen=True)
class Rendered:
    """One generated image. image: uint8 (H, W, 3) RGB, or (H, W) for grayscale categories.
    mask: bool (H, W), the pixels the defect changed (all False for good images).
    object: bool (H, W), the object's pixels before any defect (all True for textures)."""

    image: np.ndarray
    mask: np.ndarray
    object: np.ndarray


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly. Shape (H, W)."""
    coarse = rng.uniform(-1.0, 1.0, size=(h // cell + 2, w // cell + 2))
    yy, xx = _grid(h, w)
    gy, gx = yy / cell, xx / cell
    y0, x0 = gy.astype(int), gx.astype(int)
    fy, fx = gy - y0, gx - x0
    top = coarse[y0, x0] * (1 - fx) + coarse[y0, x0 + 1] * fx
    bottom = coarse[y0 + 1, x0] * (1 - fx) + coarse[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Float RGB (H, W, 3) in about [70, 185]: stripes at ~30 degrees, period ~6 px."""
    yy, xx = _grid(h, w)
    theta = math.radians(30.0 + rng.normal(0.0, 2.0))
    period = 6.0 + rng.uniform(-0.3, 0.3)
    phase = rng.uniform(0, 2 * np.pi)
    v = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period + phase)
    v = np.clip(v + 0.06 * rng.standard_normal((h, w)), 0.0, 1.0)
    c0, c1 = np.array([70.0, 90.0, 150.0]), np.array([180.0, 170.0, 120.0])
    return c0 + v[..., None] * (c1 - c0)


def _weave(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Float gray (H, W) in about [60, 200]: over/under threads on an 8 px grid plus smooth noise."""
    yy, xx = _grid(h, w)
    py, px = rng.uniform(0, 8, size=2)
    gx = np.abs(np.sin(np.pi * (xx + px) / 8.0))
    gy = np.abs(np.sin(np.pi * (yy + py) / 8.0))
    parity = ((np.floor((xx + px) / 8.0) + np.floor((yy + py) / 8.0)) % 2).astype(bool)
    v = np.where(parity, gx, gy)
    v = 0.75 * v + 0.15 * _smooth_noise(rng, h, w, 16) + 0.04 * rng.standard_normal((h, w))
    return 60.0 + 140.0 * np.clip(v, 0.0, 1.0)


def _grain(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Float RGB (H, W, 3): wood-like growth rings around an off-image centre, warped by smooth noise."""
    yy, xx = _grid(h, w)
    cy, cx = rng.uniform(-1.5, -0.5) * h, rng.uniform(0.2, 0.8) * w
    radius = np.hypot(yy - cy, xx - cx) + 6.0 * _smooth_noise(rng, h, w, 48)
    period = (11.0 + rng.uniform(-0.5, 0.5)) * h / 192
    v = 0.5 + 0.5 * np.sin(2 * np.pi * radius / period)
    v = np.clip(v**1.5 + 0.05 * rng.standard_normal((h, w)), 0.0, 1.0)
    c0, c1 = np.array([150.0, 100.0, 60.0]), np.array([215.0, 175.0, 120.0])
    return c0 + v[..., None] * (c1 - c0)


def _disc(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """(image, background, disc mask, (cy, cx, r)): a red-orange disc on a plain light background."""
    yy, xx = _grid(h, w)
    r = float(rng.uniform(24.0, 30.0))
    cy, cx = rng.uniform(r + 4, h - r - 4), rng.uniform(r + 4, w - r - 4)
    background = _DISC_BG + 2.0 * rng.standard_normal((h, w, 1))
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    colour = np.array([200.0, 60.0, 40.0]) + rng.uniform(-10, 10, size=3)
    # Gentle shading so the object is not a flat colour.
    shade = 1.0 - 0.15 * np.sqrt((yy - cy + r / 3) ** 2 + (xx - cx + r / 3) ** 2) / r
    image = np.where(disc[..., None], colour * shade[..., None], background)
    return image, background, disc, (cy, cx, r)


def _point(rng: np.random.Generator, h: int, w: int, disc: tuple | None, margin: float = 10.0) -> tuple:
    """A defect centre: anywhere (textures, away from the border) or well inside the disc."""
    if disc is None:
        return rng.uniform(margin, h - margin), rng.uniform(margin, w - margin)
    cy, cx, r = disc
    a, d = rng.uniform(0, 2 * np.pi), r * 0.6 * math.sqrt(rng.uniform())
    return cy + d * math.sin(a), cx + d * math.cos(a)


def _defect_region(
    kind: str, rng: np.random.Generator, h: int, w: int, disc: tuple | None
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(region bool (H, W), paint colour or None for "restore background", blend weight)."""
    yy, xx = _grid(h, w)
    if kind == "missing_piece":
        assert disc is not None, "missing_piece is an object defect"
        cy, cx, r = disc
        a, rr = rng.uniform(0, 2 * np.pi), rng.uniform(9.0, 14.0)
        by, bx = cy + r * math.sin(a), cx + r * math.cos(a)  # a bite centred on the rim
        return (yy - by) ** 2 + (xx - bx) ** 2 <= rr**2, None, 1.0
    py, px = _point(rng, h, w, disc)
    if kind == "scratch":
        a = rng.uniform(0, np.pi)
        half = rng.uniform(7.0, 14.0) if disc is None else rng.uniform(5.0, 9.0)
        dy, dx = math.sin(a), math.cos(a)
        t = np.clip((yy - py) * dy + (xx - px) * dx, -half, half)
        dist = np.hypot(yy - (py + t * dy), xx - (px + t * dx))
        return dist <= 1.0, np.array([250.0, 250.0, 245.0]), 1.0
    if kind == "hole":
        rr = rng.uniform(3.0, 6.0)
        return (yy - py) ** 2 + (xx - px) ** 2 <= rr**2, np.array([12.0, 10.0, 8.0]), 1.0
    if kind == "stain":
        ang = np.arctan2(yy - py, xx - px)
        wobble = 1.0 + 0.25 * np.sin(3 * ang + rng.uniform(0, 2 * np.pi))
        rr = rng.uniform(5.0, 8.0) * wobble
        colour = np.array([95.0, 60.0, 15.0]) if disc is None else np.array([40.0, 120.0, 30.0])
        return (yy - py) ** 2 + (xx - px) ** 2 <= rr**2, colour, 0.7
    scale = h / 96.0  # the held-out kinds are sized for 96 px and scale with the image
    if kind == "dark_scratch":  # thin and dark: a curve-free line about 2 px wide at 96 px
        a, half = rng.uniform(0, np.pi), rng.uniform(8.0, 16.0) * scale
        dy, dx = math.sin(a), math.cos(a)
        t = np.clip((yy - py) * dy + (xx - px) * dx, -half, half)
        dist = np.hypot(yy - (py + t * dy), xx - (px + t * dx))
        return dist <= 0.6 * scale, np.array([35.0, 28.0, 22.0]), 1.0
    if kind == "spots":  # 2-4 small saturated spots around the point
        region = np.zeros((h, w), dtype=bool)
        for _ in range(int(rng.integers(2, 5))):
            sy, sx = py + rng.normal(0, 6.0 * scale), px + rng.normal(0, 6.0 * scale)
            region |= (yy - sy) ** 2 + (xx - sx) ** 2 <= (rng.uniform(1.2, 2.5) * scale) ** 2
        return region, np.array([40.0, 150.0, 60.0]), 0.85
    if kind == "fine_noise":  # an irregular blob; the caller adds noise of FINE_NOISE_STD there
        ang = np.arctan2(yy - py, xx - px)
        rr = rng.uniform(5.0, 9.0) * scale * (1.0 + 0.3 * np.sin(2 * ang + rng.uniform(0, 2 * np.pi)))
        return (yy - py) ** 2 + (xx - px) ** 2 <= rr**2, None, 1.0
    raise ValueError(f"unknown defect kind {kind!r}")


def render(category: str, rng: np.random.Generator, defect: str | None = None) -> Rendered:
    """Generate one image of `category`, with a defect of kind `defect` (None: a good image)."""
    h, w = SIZES[category]
    background, disc = None, None
    if category == "stripes":
        image = _stripes(rng, h, w)
        obj = np.ones((h, w), dtype=bool)
    elif category == "weave":
        image = np.repeat(_weave(rng, h, w)[..., None], 3, axis=2)
        obj = np.ones((h, w), dtype=bool)
    elif category == "grain":
        image = _grain(rng, h, w)
        obj = np.ones((h, w), dtype=bool)
    elif category == "disc":
        image, background, obj, disc = _disc(rng, h, w)
    else:
        raise ValueError(
            f"unknown synthetic category {category!r}; expected one of {SYNTHETIC_CATEGORIES + HELD_OUT_CATEGORIES}"
        )
    clean = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    out = clean
    if defect is not None:
        allowed = DEFECTS[category] + (HELD_OUT_DEFECTS if disc is None else ())
        if defect not in allowed:
            raise ValueError(f"defect {defect!r} is not generated for {category!r}: {allowed}")
        region, paint, alpha = _defect_region(defect, rng, h, w, disc)
        region &= obj  # defects of the object lie on the object
        if defect == "fine_noise":
            target = image + FINE_NOISE_STD * rng.standard_normal(image.shape)
        else:
            target = background if paint is None else (1 - alpha) * image + alpha * paint
        out = np.clip(np.rint(np.where(region[..., None], target, image)), 0, 255).astype(np.uint8)
    if category == "weave":
        # Grayscale: keep the blue channel, where the brown stain is darkest (15 vs 60..200).
        clean, out = clean[..., 2], out[..., 2]
    changed = out != clean
    mask = changed.any(axis=2) if changed.ndim == 3 else changed
    return Rendered(image=out, mask=mask, object=obj)


def _marker(seed: int, n_train: int, n_test: int) -> dict[str, Any]:
    return {"generator": "mpad.data.synthetic", "version": _VERSION, "seed": seed, "n_train": n_train, "n_test": n_test}


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker of a generated dataset at `root` ({"generator", "version", "seed", ...}), or None."""
    path = Path(root) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_category(cat_dir: Path, category: str, rng: np.random.Generator, n_train: int, n_test: int) -> None:
    for i in range(n_train):
        write_png(cat_dir / "train" / "good" / f"{i:03d}.png", render(category, rng).image)
    n_good = n_test // 2
    for i in range(n_good):
        write_png(cat_dir / "test" / "good" / f"{i:03d}.png", render(category, rng).image)
    kinds = DEFECTS[category]
    counters = dict.fromkeys(kinds, 0)
    for j in range(n_test - n_good):
        kind = kinds[j % len(kinds)]
        r = render(category, rng, kind)
        while not r.mask.any():  # cannot happen with the sizes above; guards the "non-empty mask" promise
            r = render(category, rng, kind)
        idx = counters[kind]
        counters[kind] += 1
        write_png(cat_dir / "test" / kind / f"{idx:03d}.png", r.image)
        write_png(cat_dir / "ground_truth" / kind / f"{idx:03d}_mask.png", r.mask.astype(np.uint8) * 255)


def generate(root: Path, seed: int, n_train: int = 8, n_test: int = 12) -> None:
    """Write the generated dataset at `root` (MVTec layout), replacing a previous generated one.

    Per category: `n_train` good training images; `n_test` test images, n_test // 2 good, the rest
    defects cycling through the category's kinds. Written into a temporary folder, then renamed; a
    marker file `<root>/.mpad-synthetic` records the seed. Refuses (DatasetError) to replace a
    non-empty folder that has no marker, so it never deletes a user's data.
    """
    root = Path(root)
    if n_train < 1 or n_test < 2:
        raise DatasetError(f"synthetic dataset needs n_train >= 1 and n_test >= 2, got {n_train}, {n_test}")
    if root.exists():
        if not root.is_dir():
            raise DatasetError(f"{root} exists and is not a folder; choose another dataset.root")
        if read_marker(root) is None and any(root.iterdir()):
            raise DatasetError(
                f"{root} is not empty and was not generated by mpad (no {MARKER} file): refusing to "
                "overwrite it; choose another dataset.root"
            )
    with atomic_path(root) as tmp:
        tmp.mkdir()
        for index, category in enumerate(SYNTHETIC_CATEGORIES):
            rng = np.random.default_rng([seed, index])
            _write_category(tmp / category, category, rng, n_train, n_test)
        (tmp / MARKER).write_text(json.dumps(_marker(seed, n_train, n_test), indent=2, sort_keys=True) + "\n")


def ensure(root: Path, seed: int) -> bool:
    """Generate the default-size dataset at `root` unless one with this seed is already there.

    Returns True when it (re)generated. Same overwrite rule as `generate`.
    """
    if read_marker(root) == _marker(seed, 8, 12) and all((Path(root) / c).is_dir() for c in SYNTHETIC_CATEGORIES):
        return False
    generate(root, seed)
    return True
