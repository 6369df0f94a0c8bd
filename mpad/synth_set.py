"""The synthesized training set `data/synth/<category>/` (OAGM's output, MPTS's input): its one owner.

One folder, written atomically:

    images/NNNN.png          x' (uint8 RGB, the model's input size)
    masks/NNNN.png           M'_a (0/255): exactly where noise was added
    object_masks/<i>.png     M_obj of shot i (0/255), to look at
    manifest.json            {"category", "image_size": [H, W], "samples": [{"image", "mask", "shot",
                             "anomalous_fraction"}], "object_masks": [{"shot", "mask", "fraction",
                             "fallback"}], plus the writer's `info` (e.g. "object_mask_method", "texture",
                             "random_weights", "note")}

`read_synth_set` checks everything train relies on and raises `SynthSetError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from mpad.io import atomic_path, write_png

MANIFEST = "manifest.json"


class ObjectMaskLike(Protocol):
    """What is stored of an M_obj (`mpad.oagm.ObjectMask`; not imported: reading a set needs no OAGM)."""

    mask: np.ndarray  # (H, W) bool
    fallback: str | None

    @property
    def fraction(self) -> float: ...


class SampleLike(Protocol):
    """What is stored of one (x', M'_a) (`mpad.oagm.SynthesizedSample`)."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool

    @property
    def anomalous_fraction(self) -> float: ...


class SynthSetError(ValueError):
    """A synthesized set that is missing, unreadable or inconsistent; the message names the file."""


def write_synth_set(
    folder: str | Path,
    category: str,
    image_size: Sequence[int],
    shots: Sequence[str],
    object_masks: Sequence[ObjectMaskLike],
    synthesized: Iterable[Sequence[SampleLike]],
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the set and return its manifest. shots: each shot's path (as listed in the shots file);
    object_masks: their M_obj; synthesized: per shot, in the same order, its samples (may be a lazy
    iterator: each shot's samples are written as they come). `folder` is replaced only if all of it was
    written (an exception leaves the previous set untouched)."""
    samples: list[dict[str, Any]] = []
    objects: list[dict[str, Any]] = []
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for index, (shot, obj, drawn) in enumerate(zip(shots, object_masks, synthesized, strict=True)):
            mask_name = f"object_masks/{index}.png"
            write_png(tmp / mask_name, obj.mask.astype(np.uint8) * 255)
            objects.append({"shot": shot, "mask": mask_name, "fraction": obj.fraction, "fallback": obj.fallback})
            for sample in drawn:
                n = len(samples)
                image_name, sample_mask = f"images/{n:04d}.png", f"masks/{n:04d}.png"
                write_png(tmp / image_name, sample.image)
                write_png(tmp / sample_mask, sample.mask.astype(np.uint8) * 255)
                samples.append(
                    {
                        "image": image_name,
                        "mask": sample_mask,
                        "shot": shot,
                        "anomalous_fraction": sample.anomalous_fraction,
                    }
                )
        manifest = {
            **(info or {}),
            "category": category,
            "image_size": list(image_size),
            "samples": samples,
            "object_masks": objects,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_synth_set(folder: str | Path) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]]:
    """The set's images (H, W, 3) uint8, masks (H, W) float32 in {0, 1} (stored value > 127) and manifest.

    Checks: the manifest exists and parses, lists samples and a 2-value image_size, names this folder's
    category (when it names one); each listed image and mask exists, is readable and has image_size.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise SynthSetError(f"{path}: manifest not found")
    try:
        manifest = json.loads(path.read_text())
        samples = manifest["samples"]
        size = tuple(int(v) for v in manifest["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SynthSetError(f"{path}: not a valid synthesis manifest ({err})") from err
    if not isinstance(samples, list) or not samples or len(size) != 2:
        raise SynthSetError(f"{path}: no samples or bad image_size")
    if manifest.get("category") not in (None, folder.name):
        raise SynthSetError(f"{path}: made for category {manifest.get('category')!r}, not {folder.name!r}")
    images, masks = [], []
    for sample in samples:
        try:
            image_path, mask_path = folder / sample["image"], folder / sample["mask"]
        except (KeyError, TypeError) as err:
            raise SynthSetError(f"{path}: a sample lacks 'image' or 'mask': {sample!r}") from err
        image, mask = _read_png(image_path, "RGB"), _read_png(mask_path, "L")
        if image.shape[:2] != size:
            raise SynthSetError(
                f"{image_path}: image is {image.shape[1]}x{image.shape[0]}, the manifest says {size[1]}x{size[0]}"
            )
        if mask.shape != size:
            raise SynthSetError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, the manifest says {size[1]}x{size[0]}"
            )
        images.append(image)
        masks.append((mask > 127).astype(np.float32))
    return images, masks, manifest


def _read_png(path: Path, mode: str) -> np.ndarray:
    if not path.is_file():
        raise SynthSetError(f"{path}: file listed in the manifest is missing")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode))
    except (OSError, ValueError) as err:
        raise SynthSetError(f"{path}: not a readable image ({err})") from err
