"""Reader for datasets in the MVTec AD layout (MVTec AD itself, or any "folder" dataset laid out alike).

Layout, per category::

    <root>/<category>/train/good/*.png            normal training images (the only train class)
    <root>/<category>/test/good/*                 normal test images
    <root>/<category>/test/<defect>/*             anomalous test images
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   their pixel masks

Every listing is sorted, so every consumer sees the same order on every machine. Nothing here is
MVTec-specific except the two name constants: users' own product lines use the same functions.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mpad.data.catalog import MVTEC_CATEGORIES

GOOD = "good"
SPLITS = ("train", "test")
# Extensions read as images (case-insensitive); other files (Thumbs.db, notes) are ignored.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# PIL errors a broken or truncated file can raise on open/load.
_PIL_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """A dataset problem the user must fix; the message names the file or folder concerned."""


@dataclass(frozen=True)
class Sample:
    """One image of a split.

    image: the image file. mask: its ground-truth mask file (None for good samples).
    label: 0 normal, 1 anomalous. defect: the defect folder name, "good" for normal samples.
    """

    image: Path
    mask: Path | None
    label: int
    defect: str


def is_image_file(path: Path) -> bool:
    """A file read as an image: an IMAGE_SUFFIXES extension, not hidden."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _images_in(folder: Path) -> list[Path]:
    """Sorted image files directly in `folder` (hidden files skipped)."""
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _find_mask(gt_dir: Path, image: Path) -> Path | None:
    """The mask of `image`: `<stem>_mask.png` first (MVTec), then `<stem>_mask` with another extension."""
    preferred = gt_dir / f"{image.stem}_mask.png"
    if preferred.is_file():
        return preferred
    if gt_dir.is_dir():
        for p in _images_in(gt_dir):
            if p.stem == f"{image.stem}_mask":
                return p
    return None


def _category_dir(root: Path, category: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"dataset root {root} does not exist or is not a folder (a dataset that the fetch stage downloaded "
            "or generated and that was deleted since comes back with `dvc repro -f fetch`)"
        )
    cat_dir = root / category
    if not cat_dir.is_dir():
        raise DatasetError(f"category folder {cat_dir} not found (category {category!r} under {root})")
    return cat_dir


def _reject_loose_images(folder: Path, where: str) -> None:
    # Images lying directly in train/ or test/ would be silently dropped: say so instead.
    loose = _images_in(folder)
    if loose:
        raise DatasetError(f"{loose[0]}: images must be inside a class folder ({where}), not directly in {folder}")


def list_split(root: Path, category: str, split: str) -> list[Sample]:
    """List the samples of `split` ("train" or "test") of `category` under `root`, sorted.

    train: only `train/good` (label 0); it must exist and hold at least one image.
    test: `test/good` first, then each defect folder in name order; every defect image needs its mask.
    Raises DatasetError naming the missing or offending file/folder.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    cat_dir = _category_dir(root, category)
    split_dir = cat_dir / split
    if not split_dir.is_dir():
        raise DatasetError(f"split folder {split_dir} not found")
    _reject_loose_images(split_dir, f"{split}/good/ or {split}/<defect>/")

    if split == "train":
        good = split_dir / GOOD
        if not good.is_dir():
            raise DatasetError(f"training folder {good} not found (normal training images go there)")
        others = [p.name for p in _subfolders(split_dir) if p.name != GOOD]
        if others:
            # Few-shot training assumes normal images only; a defect class here is a layout mistake.
            raise DatasetError(f"{split_dir} holds {others}: the training split may only contain good/")
        images = _images_in(good)
        if not images:
            raise DatasetError(f"training folder {good} holds no images")
        return [Sample(image=p, mask=None, label=0, defect=GOOD) for p in images]

    samples: list[Sample] = []
    for cls_dir in _subfolders(split_dir):
        images = _images_in(cls_dir)
        if cls_dir.name == GOOD:
            samples[:0] = [Sample(image=p, mask=None, label=0, defect=GOOD) for p in images]
            continue
        gt_dir = cat_dir / "ground_truth" / cls_dir.name
        for img in images:
            mask = _find_mask(gt_dir, img)
            if mask is None:
                raise DatasetError(f"defect image {img} has no mask: expected {gt_dir / (img.stem + '_mask.png')}")
            samples.append(Sample(image=img, mask=mask, label=1, defect=cls_dir.name))
    if not samples:
        raise DatasetError(f"test folder {split_dir} holds no images")
    return samples


def _open(path: Path) -> Image.Image:
    """Open and fully decode `path` (so a truncated file fails here, not later). An image above Pillow's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS, ~89 Mpx) is refused with one line, not Pillow's warning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: too large to decode safely ({str(err).split(',')[0]}); downscale it") from err
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: file not found") from err
    except _PIL_ERRORS as err:
        raise DatasetError(f"{path}: unreadable or truncated image ({err})") from err
    return im


def load_image(path: Path) -> np.ndarray:
    """Read an image as uint8 RGB, shape (H, W, 3).

    Grayscale (MVTec's grid, screw, zipper) is replicated to 3 equal channels; alpha is dropped;
    palette images are expanded; 16-bit grayscale is scaled to 8 bits; 32-bit float (e.g. a float TIFF)
    with values in 0..1 is scaled by 255, other float values are refused (DatasetError: no range to assume).
    """
    return image_array(_open(Path(path)), path)


def image_array(im: Image.Image, name: object) -> np.ndarray:
    """A decoded PIL image -> uint8 RGB (H, W, 3), converted as `load_image` says; `name` (a path, or what an
    uploaded image is called) goes into the DatasetError of a float image out of range."""
    if im.mode == "F":  # PIL's own conversion clips at 0..255, so 0..1 data would read as black
        arr = np.asarray(im, dtype=np.float64)
        if not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise DatasetError(
                f"{name}: float image with values {arr.min():g}..{arr.max():g}; only 0..1 is read "
                "(scaled to 0..255): convert it to 8 or 16 bits"
            )
        im = Image.fromarray(np.rint(arr * 255.0).astype(np.uint8), "L")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def load_mask(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    """The ground-truth mask of `sample` as bool, shape `size` = (H, W) of its image.

    Good samples: all False. Defect samples: the mask file binarised (any channel > 0); its size must
    equal `size`, else DatasetError naming the image and the mask.
    """
    h, w = size
    if sample.label == 0:
        return np.zeros((h, w), dtype=bool)
    if sample.mask is None:
        raise DatasetError(f"defect image {sample.image} has no mask")
    im = _open(sample.mask)
    if (im.height, im.width) != (h, w):
        raise DatasetError(
            f"mask {sample.mask} is {im.height}x{im.width} (HxW) but its image {sample.image} is {h}x{w}"
        )
    arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return np.ascontiguousarray(arr > 0)


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, read from its header only (no decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: file not found") from err
    except _PIL_ERRORS as err:
        raise DatasetError(f"{path}: unreadable image ({err})") from err
    return h, w


def is_complete_mvtec(root: Path) -> bool:
    """True when `root` holds all 15 MVTec AD categories, each with train/good, test, ground_truth."""
    root = Path(root)
    return all(
        (root / c / "train" / GOOD).is_dir() and (root / c / sub).is_dir()
        for c in MVTEC_CATEGORIES
        for sub in ("test", "ground_truth")
    )


def list_categories(root: Path) -> list[str]:
    """Sorted names of the folders under `root` that look like categories (they hold `train/`)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    return [p.name for p in _subfolders(root) if (p / "train").is_dir()]


def fingerprint(root: Path, samples: list[Sample], mtimes: bool = True) -> str:
    """sha256 hex of the sorted (path relative to root, size in bytes, modification time in ns) listing of the
    samples' images and masks. Only `stat`, no file contents, since fetch computes it on every `dvc repro`:
    0.17 s on an MVTec AD-sized tree, where hashing the bytes took 2.7-6.3 s per 2.9 GB even from the page
    cache (docs/decisions.md). A replaced file shows by its size or mtime; a `touch` alone also changes it
    (a needless re-run, never a stale result). `mtimes=False`: paths and sizes only, which a copy of the
    dataset on another machine shares (mpad.data.manifest.pin)."""
    files = [p for s in samples for p in (s.image, s.mask) if p is not None]
    listing = sorted((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])
    digest = hashlib.sha256()
    for rel, nbytes, mtime in listing:
        digest.update((f"{rel}\t{nbytes}\t{mtime}\n" if mtimes else f"{rel}\t{nbytes}\n").encode())
    return digest.hexdigest()


def summarize_category(root: Path, category: str) -> dict[str, Any]:
    """Counts, image sizes and fingerprints of one category, validating it on the way.

    Returns {"train": n, "test": {"good": n, <defect>: n, ...}, "image_sizes": [[H, W], ...] (distinct,
    sorted), "fingerprint": {"train": hex, "test": hex} (`fingerprint` of each split)}. Each mask's header
    size must match its image (DatasetError otherwise). Only file headers are read, so this is cheap even
    for MVTec AD.
    """
    root = Path(root)
    train = list_split(root, category, "train")
    test = list_split(root, category, "test")
    counts: dict[str, int] = {}
    sizes: set[tuple[int, int]] = set()
    for s in test:
        counts[s.defect] = counts.get(s.defect, 0) + 1
    for s in train + test:
        size = image_size(s.image)
        sizes.add(size)
        if s.mask is not None:
            mask_size = image_size(s.mask)
            if mask_size != size:
                raise DatasetError(
                    f"mask {s.mask} is {mask_size[0]}x{mask_size[1]} (HxW) but its image {s.image} "
                    f"is {size[0]}x{size[1]}"
                )
    return {
        "train": len(train),
        "test": dict(sorted(counts.items())),
        "image_sizes": [list(s) for s in sorted(sizes)],
        "fingerprint": {"train": fingerprint(root, train), "test": fingerprint(root, test)},
    }
