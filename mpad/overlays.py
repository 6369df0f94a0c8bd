"""The overlay folder `plots/overlays/<category>` of evaluate (mpad.layout.overlays_dir): a few test images as
[image | ground truth | anomaly map] panels, named `<rank>_<defect>_<stem>.png`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mpad.data.mvtec import Sample, load_image, load_mask
from mpad.evaluation import resize_mask
from mpad.io import atomic_path, write_png
from mpad.visualize import overlay_panel


def pick_overlays(defects: Sequence[str], count: int) -> list[int]:
    """Indices of at most `count` images given each one's defect type: the defect types in sorted order, one
    image each in turn (first seen first), "good" last in each round; so every type shows before any repeats."""
    by_defect: dict[str, list[int]] = {}
    for i, defect in enumerate(defects):
        by_defect.setdefault(defect, []).append(i)
    order = [d for d in sorted(by_defect) if d != "good"] + (["good"] if "good" in by_defect else [])
    picks: list[int] = []
    while len(picks) < min(count, len(defects)):
        for d in order:
            left = [i for i in by_defect[d] if i not in picks]
            if left and len(picks) < count:
                picks.append(left[0])
    return picks


def save_overlays(
    folder: Path, samples: Sequence[Sample], maps: torch.Tensor, picks: Sequence[int], colour_range: tuple[float, float]
) -> None:
    """Replace `folder` by the panels of samples[picks] with their maps (N, R, R) coloured over colour_range;
    images and masks are resized to R x R."""
    resolution = int(maps.shape[-1])
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for rank, i in enumerate(picks):
            s = samples[i]
            image = load_image(s.image)
            small = np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.BICUBIC))
            mask = resize_mask(load_mask(s, image.shape[:2]), resolution).numpy() if s.label else None
            panel = overlay_panel(small, mask, maps[i].numpy(), *colour_range)
            write_png(tmp / f"{rank:02d}_{s.defect}_{s.image.stem}.png", panel)
