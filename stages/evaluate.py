"""Stage `evaluate`: anomaly maps for every test image of one category, metrics, curves and overlays.

Writes (all atomically):
  metrics/<category>.json          pixel/image AUROC, AP, F1-max, AUPRO@0.3 in %, declared as DVC metrics
  plots/roc_pixel/<category>.csv   pixel-level ROC curve (fpr, tpr); plots/roc_image/: image-level
  plots/pro/<category>.csv         PRO curve up to FPR 1 (fpr, pro)
  plots/overlays/<category>/*.png  [image | ground truth | anomaly map] for a few test images
  data/thresholds/<category>.json  F1-max thresholds and the map colour range, read by `mpad predict`
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer
from PIL import Image

from mpad.clip import ModelLoadError, load_clip, model_fingerprint
from mpad.data import DatasetError, list_split, load_image, load_mask
from mpad.detector import Detector
from mpad.evaluation import CategoryResult, category_metrics, resize_mask, run_detector
from mpad.io import atomic_path, write_csv, write_json
from mpad.metrics import f1_max_threshold, pro_curve, roc_curve
from mpad.notes import RANDOM_WEIGHTS_NOTE
from mpad.prompt_file import PromptFileError, load_prompts
from mpad.visualize import overlay_panel
from stages.common import PARAMS_OPTION, StageProgress, fail, load_params, section


def main(
    category: str = typer.Option(..., "--category", help="Category to evaluate."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Evaluate the learned prompts of CATEGORY on its test split."""
    cfg = load_params(params)
    model_cfg = section(cfg, "model", params, ("name", "pretrained", "device", "precision"))
    scoring = section(cfg, "scoring", params, ("smoothing_sigma", "image_score", "topk"))
    settings = section(cfg, "evaluate", params, ("resolution", "batch_size", "workers", "overlays"))
    root = Path(str(section(cfg, "dataset", params, ("root",))["root"]))
    resolution = int(settings["resolution"])
    torch.manual_seed(0)
    try:
        bundle = load_clip(model_cfg["name"], model_cfg["pretrained"], model_cfg["device"], model_cfg["precision"])
        record = load_prompts(Path("data/prompts") / f"{category}.pt", expect_model=model_fingerprint(bundle))
        samples = list_split(root, category, "test")
        detector = Detector.from_record(bundle, record, scoring)
        with StageProgress(total=len(samples), desc=f"evaluate {category}", unit="img") as bar:
            result = run_detector(
                detector, samples, resolution, int(settings["batch_size"]), int(settings["workers"]), bar.update
            )
        _write_overlays(category, samples, result, resolution, int(settings["overlays"]), map_range(result.maps))
    except (DatasetError, ModelLoadError, PromptFileError) as err:
        fail(str(err))
        return
    metrics: dict[str, Any] = category_metrics(result)
    metrics.update(n_test=len(samples), n_defect=int(result.labels.sum()), random_weights=bundle.random_weights)
    if bundle.random_weights:
        metrics["note"] = RANDOM_WEIGHTS_NOTE
    write_json(Path("metrics") / f"{category}.json", metrics)
    _write_curves(category, result)
    _write_thresholds(category, result, scoring)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
    typer.echo(f"{category}: {shown}" + (f"\n  {RANDOM_WEIGHTS_NOTE}" if bundle.random_weights else ""))


def _write_curves(category: str, result: CategoryResult) -> None:
    # One file per curve: DVC's line templates draw every row of a file as one line.
    for level, scores, labels in (("pixel", result.maps, result.masks), ("image", result.scores, result.labels)):
        rows: list[tuple] = []
        if 0 < int(labels.sum()) < labels.numel():
            fpr, tpr, _ = roc_curve(scores, labels, max_points=500)
            rows = [(f"{f:.6f}", f"{t:.6f}") for f, t in zip(fpr, tpr, strict=True)]
        write_csv(Path(f"plots/roc_{level}") / f"{category}.csv", ("fpr", "tpr"), rows)
    pro_rows: list[tuple] = []
    if result.masks.any():
        fpr, pro = pro_curve(result.maps, result.masks, max_points=500)
        pro_rows = [(f"{f:.6f}", f"{p:.6f}") for f, p in zip(fpr, pro, strict=True)]
    write_csv(Path("plots/pro") / f"{category}.csv", ("fpr", "pro"), pro_rows)


def _write_thresholds(category: str, result: CategoryResult, scoring: dict[str, Any]) -> None:
    """F1-max thresholds (what predict decides with) and the 1st-99.9th percentile map range (its colours)."""
    info: dict[str, Any] = {
        "image_score": scoring["image_score"],
        "smoothing_sigma": scoring["smoothing_sigma"],
        "topk": scoring["topk"],
        "resolution": int(result.maps.shape[-1]),
    }
    if 0 < int(result.labels.sum()) < len(result.labels):
        info["image_f1_max"], info["image_threshold"] = f1_max_threshold(result.scores, result.labels)
    if result.masks.any():
        info["pixel_f1_max"], info["pixel_threshold"] = f1_max_threshold(result.maps, result.masks)
    info["map_low"], info["map_high"] = map_range(result.maps)
    write_json(Path("data/thresholds") / f"{category}.json", info)


def map_range(maps: torch.Tensor) -> tuple[float, float]:
    """The 1st and 99.9th percentiles of the map values (from a subsample of at most ~1M pixels)."""
    flat = maps.flatten()
    sample = flat[:: max(1, flat.numel() // 1_000_000)]
    low, high = torch.quantile(sample, torch.tensor([0.01, 0.999]))
    return float(low), float(high)


def _write_overlays(
    category: str, samples: list, result: CategoryResult, resolution: int, count: int, colour_range: tuple[float, float]
) -> None:
    """A few panels: defect images first, one per defect type in turn, then a good one."""
    by_defect: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_defect.setdefault(s.defect, []).append(i)
    order = [d for d in sorted(by_defect) if d != "good"] + (["good"] if "good" in by_defect else [])
    picks: list[int] = []
    while len(picks) < min(count, len(samples)):
        for d in order:
            taken = [i for i in by_defect[d] if i not in picks]
            if taken and len(picks) < count:
                picks.append(taken[0])
    low, high = colour_range
    with atomic_path(Path("plots/overlays") / category) as folder:
        folder.mkdir()
        for rank, i in enumerate(picks):
            s = samples[i]
            image = load_image(s.image)
            small = np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.BICUBIC))
            mask = resize_mask(load_mask(s, image.shape[:2]), resolution).numpy() if s.label else None
            panel = overlay_panel(small, mask, result.maps[i].numpy(), low, high)
            Image.fromarray(panel).save(folder / f"{rank:02d}_{s.defect}_{s.image.stem}.png")
