"""An MVTec-AD-shaped stand-in dataset, for timing the pipeline at full scale without MVTec AD.

The 15 MVTec AD category names at their real image sizes (grid, screw, zipper grayscale), test splits
with MVTec's good / defective counts times `fraction` (at least one of each), three defect types with
exact masks, in the MVTec layout (`<root>/<c>/train/good`, `test/<defect>`,
`ground_truth/<defect>/<stem>_mask.png`). Textures are noisy stripes, objects a disc on a plain
background. Only the shapes are MVTec's: numbers measured on it say nothing about detection quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mpad.data import MVTEC_CATEGORIES, MVTEC_TEXTURES

SIZES = {
    "bottle": 900,
    "cable": 1024,
    "capsule": 1000,
    "carpet": 1024,
    "grid": 1024,
    "hazelnut": 1024,
    "leather": 1024,
    "metal_nut": 700,
    "pill": 800,
    "screw": 1024,
    "tile": 840,
    "toothbrush": 1024,
    "transistor": 1024,
    "wood": 1024,
    "zipper": 1024,
}
GRAYSCALE = ("grid", "screw", "zipper")
# MVTec AD's test split per category: (good, defective); 467 + 1258 = 1725 images. Train: normal images.
TEST = {
    "bottle": (20, 63),
    "cable": (58, 92),
    "capsule": (23, 109),
    "carpet": (28, 89),
    "grid": (21, 57),
    "hazelnut": (40, 70),
    "leather": (32, 92),
    "metal_nut": (22, 93),
    "pill": (26, 141),
    "screw": (41, 119),
    "tile": (33, 84),
    "toothbrush": (12, 30),
    "transistor": (60, 40),
    "wood": (19, 60),
    "zipper": (32, 119),
}
TRAIN = {
    "bottle": 209,
    "cable": 224,
    "capsule": 219,
    "carpet": 280,
    "grid": 264,
    "hazelnut": 391,
    "leather": 245,
    "metal_nut": 220,
    "pill": 267,
    "screw": 320,
    "tile": 230,
    "toothbrush": 60,
    "transistor": 213,
    "wood": 247,
    "zipper": 240,
}
DEFECTS = ("scratch", "hole", "stain")
assert set(SIZES) == set(TEST) == set(TRAIN) == set(MVTEC_CATEGORIES)


def counts(category: str, fraction: float) -> tuple[int, int, int]:
    """(train, test good, test defective) images of `category` at `fraction` of MVTec's, each at least 1."""
    good, bad = TEST[category]
    return tuple(max(1, round(fraction * n)) for n in (TRAIN[category], good, bad))


def _base(rng: np.random.Generator, size: int, texture: bool) -> tuple[np.ndarray, np.ndarray]:
    """The category's clean look, float32 (S, S, 3), and where the object is (bool (S, S))."""
    y, x = np.ogrid[:size, :size]
    c0, c1 = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    period, angle = rng.uniform(8, 30), rng.uniform(0, np.pi)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    look = (c0 + wave[..., None] * (c1 - c0)).astype(np.float32)
    if texture:
        return look, np.ones((size, size), bool)
    disc = (y - size / 2) ** 2 + (x - size / 2) ** 2 <= (0.35 * size) ** 2
    return np.where(disc[..., None], look, np.float32(200)), disc


def _defect(rng: np.random.Generator, obj: np.ndarray, kind: str) -> np.ndarray:
    """A bool mask of one defect of `kind` centred on a random object pixel."""
    size = obj.shape[0]
    ys, xs = np.nonzero(obj[::16, ::16])
    i = rng.integers(len(ys))
    cy, cx = ys[i] * 16, xs[i] * 16
    y, x = np.ogrid[:size, :size]
    a = rng.uniform(0, np.pi)
    u, v = (x - cx) * np.cos(a) + (y - cy) * np.sin(a), -(x - cx) * np.sin(a) + (y - cy) * np.cos(a)
    r = size * rng.uniform(0.02, 0.06)
    shape = (np.abs(v) < 3) & (np.abs(u) < 3 * r) if kind == "scratch" else u**2 + (v * 1.5) ** 2 < r**2
    return shape & obj


def _save(arr: np.ndarray, path: Path, gray: bool) -> None:
    img = np.clip(arr, 0, 255).astype(np.uint8)
    Image.fromarray(img.mean(-1).astype(np.uint8) if gray and img.ndim == 3 else img).save(path, compress_level=1)


def generate(root: Path, categories: list[str], fraction: float, seed: int = 0) -> dict[str, tuple[int, int, int]]:
    """Write the stand-in for `categories` under `root`; return their (train, good, defective) counts."""
    return {c: _category(root / c, c, counts(c, fraction), seed) for c in categories}


def _category(folder: Path, category: str, n: tuple[int, int, int], seed: int) -> tuple[int, int, int]:
    rng = np.random.default_rng([seed, MVTEC_CATEGORIES.index(category)])
    size, gray = SIZES[category], category in GRAYSCALE
    base, obj = _base(rng, size, category in MVTEC_TEXTURES)
    bank = rng.normal(0, 6, (size + 64, size + 64, 1)).astype(np.float32)  # sensor noise, cropped at random

    def noisy() -> np.ndarray:
        dy, dx = rng.integers(64, size=2)
        return base + bank[dy : dy + size, dx : dx + size]

    for split, count in (("train", n[0]), ("test", n[1])):
        (folder / split / "good").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _save(noisy(), folder / split / "good" / f"{i:03d}.png", gray)
    for i in range(n[2]):
        kind = DEFECTS[i % len(DEFECTS)]
        mask = _defect(rng, obj, kind)
        image = noisy()
        image[mask] = 30.0 if kind == "hole" else image[mask] * 0.5 + np.float32([160, 60, 40]) * 0.5
        for sub in ("test", "ground_truth"):
            (folder / sub / kind).mkdir(parents=True, exist_ok=True)
        _save(image, folder / "test" / kind / f"{i:03d}.png", gray)
        _save(mask.astype(np.uint8) * 255, folder / "ground_truth" / kind / f"{i:03d}_mask.png", True)
    return n
