"""Evaluate a detector on one category's test split: maps, image scores, and the metrics users compare.

Maps and masks are compared at `resolution` x `resolution` (masks area-resized then thresholded at 0.5,
so thin defects survive the downscale as well as they can). Everything is kept in memory as float32 /
bool: a 500-image category at 256 px is about 130 MB of maps. Decoding, resizing and masks take a few percent of
the model's time on the CPU (bench/evaluate.py), as long as they do not compete with its threads (`batches`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from mpad.data.mvtec import DatasetError, Sample, load_image, load_mask
from mpad.detector import Detector
from mpad.features import stack_images
from mpad.metrics import aupro, auroc, average_precision, both_classes, f1_max_threshold


class TestImages(Dataset):
    """Decodes one test sample: (image (3, *model_size) in [0, 1], mask (R, R) bool, label, index)."""

    def __init__(self, samples: Sequence[Sample], model_size: Sequence[int], resolution: int) -> None:
        self.samples = list(samples)
        self.model_size = tuple(model_size)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        sample = self.samples[index]
        image = load_image(sample.image)
        if sample.label:
            mask = resize_mask(load_mask(sample, image.shape[:2]), self.resolution)
        else:  # what resize_mask makes of a good sample's all-False mask, without the full-size one
            mask = torch.zeros(self.resolution, self.resolution, dtype=torch.bool)
        return stack_images([image], self.model_size)[0], mask, sample.label, index


def resize_mask(mask: np.ndarray, resolution: int) -> torch.Tensor:
    """(H, W) bool -> (R, R) bool: area-average then >= 0.5."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(m, size=(resolution, resolution), mode="area")[0, 0] >= 0.5


@dataclass
class CategoryResult:
    """maps (N, R, R) float32; masks (N, R, R) bool; labels (N,) int; scores (N,) float32 (image scores)."""

    maps: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor


def batches(dataset: TestImages, batch_size: int, workers: int) -> Iterator[Any]:
    """The dataset's items in order, collated in batches of `batch_size` (images (B, 3, *model_size), masks
    (B, R, R), labels (B,), indices (B,)).

    workers > 0: decoded ahead of the model by that many DataLoader processes, for a model on a GPU, which
    leaves the CPU cores to them. workers 0: decoded in this process between the model's batches by as many
    threads as torch uses, each with one torch thread (PIL and torch release the GIL): all cores decode, then
    all cores run the model, so that decoding neither leaves a core idle nor takes one from the model's threads.
    """
    if workers > 0:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
        return
    # torch.set_num_threads is per thread (OpenMP): the pool's threads get one each, the caller keeps its own.
    with ThreadPoolExecutor(torch.get_num_threads(), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for start in range(0, len(dataset), batch_size):
            items = pool.map(dataset.__getitem__, range(start, min(start + batch_size, len(dataset))))
            yield default_collate(list(items))


def run_detector(
    detector: Detector,
    samples: Sequence[Sample],
    resolution: int,
    batch_size: int = 16,
    workers: int = 0,
    on_batch: Callable[[int], Any] | None = None,
) -> CategoryResult:
    """Score every sample, batched, decoding as `batches` says for `workers`; `on_batch(n)` after each batch
    of n images (for a progress bar)."""
    dataset = TestImages(samples, detector.bundle.image_size, resolution)
    n = len(dataset)
    maps = torch.empty(n, resolution, resolution, dtype=torch.float32)
    masks = torch.empty(n, resolution, resolution, dtype=torch.bool)
    labels = torch.empty(n, dtype=torch.long)
    scores = torch.empty(n, dtype=torch.float32)
    try:
        for images, batch_masks, batch_labels, index in batches(dataset, batch_size, workers):
            found = detector(images, (resolution, resolution))
            maps[index] = found.maps.float()
            scores[index] = found.scores.float()
            masks[index] = batch_masks
            labels[index] = batch_labels
            if on_batch is not None:
                on_batch(len(index))
    except DatasetError as err:
        # A worker process re-raises with its whole traceback in the message: keep the original line.
        last = str(err).strip().splitlines()[-1]
        raise DatasetError(last.split("DatasetError: ", 1)[-1]) from None
    return CategoryResult(maps, masks, labels, scores)


PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")


def category_metrics(result: CategoryResult, fpr_limit: float = 0.3) -> dict[str, float | None]:
    """Pixel/image AUROC, AP, F1-max and AUPRO@fpr_limit (normalised), as percentages like the paper's tables.

    Every key of PIXEL_METRICS and IMAGE_METRICS is present; a metric the split cannot define (one class
    only: no defect image, only empty masks, no good image) is None, never a number from one class
    (`unmeasured` says why).
    """
    out: dict[str, float | None] = dict.fromkeys(PIXEL_METRICS + IMAGE_METRICS)
    pixels, truth = result.maps, result.masks
    if both_classes(truth):
        out["pixel_auroc"] = auroc(pixels, truth)
        out["pixel_ap"] = average_precision(pixels, truth)
        out["pixel_f1_max"] = f1_max_threshold(pixels, truth)[0]
        out["aupro"] = aupro(pixels, truth, fpr_limit=fpr_limit)
    if both_classes(result.labels):
        out["image_auroc"] = auroc(result.scores, result.labels)
        out["image_ap"] = average_precision(result.scores, result.labels)
        out["image_f1_max"] = f1_max_threshold(result.scores, result.labels)[0]
    return {k: None if v is None else round(100.0 * float(v), 4) for k, v in out.items()}


def unmeasured(result: CategoryResult) -> list[str]:
    """Why the pixel / image metrics of `result` are undefined: one sentence each, [] when both are defined."""
    reasons = []
    if not both_classes(result.masks):
        has = "no defect pixel (no defect image, or only empty masks)" if not result.masks.any() else "no normal pixel"
        reasons.append(f"pixel metrics: the test masks hold {has}")
    if not both_classes(result.labels):
        has = "no defect image" if not result.labels.any() else "no good image"
        reasons.append(f"image metrics: the test split holds {has}")
    return reasons
