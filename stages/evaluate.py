"""Stage `evaluate`: anomaly maps for every test image of one category, metrics, curves and overlays.

Writes (all atomically; paths: mpad.layout):
  metrics/<category>.json          pixel/image AUROC, AP, F1-max, AUPRO@0.3 in %, declared as DVC metrics;
                                   null, with `null_reason` and a warning on stderr, where the test split
                                   has one class only (no defect image, only empty masks, no good image)
  plots/roc_pixel/<category>.csv   pixel-level ROC curve (fpr, tpr); plots/roc_image/: image-level
  plots/pro/<category>.csv         PRO curve up to FPR 1 (fpr, pro)
  plots/overlays/<category>/*.png  [image | ground truth | anomaly map] for a few test images
  data/thresholds/<category>.json  F1-max thresholds, the map colour range and the SHA-256 of the prompts file
                                   they were measured with, read by `mpad predict` and `mpad export`

`evaluate.workers` DataLoader processes decode the test images alongside a model on a GPU. On the CPU they would
take cores from the model's threads, so there the stage decodes each batch in threads between the model's batches
instead (mpad.evaluation.batches), whatever `workers` says: the same maps, bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer

from mpad import layout
from mpad.clip import ModelLoadError, backbone_identity, load_clip
from mpad.config import RANDOM_WEIGHTS_NOTE
from mpad.curves import curve_points, save_curves
from mpad.data import DatasetError, list_split
from mpad.detector import Detector
from mpad.evaluation import category_metrics, run_detector, unmeasured
from mpad.overlays import pick_overlays, save_overlays
from mpad.prompt_file import PromptFileError, PromptsFile
from mpad.summary import save_category_metrics
from mpad.thresholds import colour_range, save_thresholds, thresholds_record
from stages.common import PARAMS_OPTION, StageProgress, ensure_space, fail, load_config


def main(
    category: str = typer.Option(..., "--category", help="Category to evaluate."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Evaluate the learned prompts of CATEGORY on its test split."""
    model, scoring, settings, dataset = load_config(params, "model", "scoring", "evaluate", "dataset")
    ensure_space(layout.overlays_dir(category))  # its largest output, before scoring the whole test split
    torch.manual_seed(0)
    try:
        bundle = load_clip(model.name, model.pretrained, model.device, model.precision)
        prompts = PromptsFile.load(layout.prompts_file(category), expect_model=backbone_identity(bundle))
        samples = list_split(dataset.path, category, "test")
        detector = Detector.from_prompts(bundle, prompts, scoring)
        # DataLoader processes decode alongside a model on a GPU; on the CPU they would take cores from the model's
        # threads, so there the images are decoded in threads between batches (mpad.evaluation.batches).
        workers = settings.workers if bundle.device.type != "cpu" else 0
        with StageProgress(total=len(samples), desc=f"evaluate {category}", unit="img") as bar:
            result = run_detector(detector, samples, settings.resolution, settings.batch_size, workers, bar.update)
        thresholds = thresholds_record(result, scoring, category, str(prompts.sha256))
        picks = pick_overlays([s.defect for s in samples], settings.overlays)
        shown_range = colour_range(thresholds)
        save_overlays(layout.overlays_dir(category), samples, result.maps, picks, shown_range)
    except (DatasetError, ModelLoadError, PromptFileError) as err:
        fail(str(err))
    metrics: dict[str, Any] = category_metrics(result)
    if reasons := unmeasured(result):  # null metrics with the reason, never a number from one class
        metrics["null_reason"] = "; ".join(reasons)
        typer.secho(
            f"warning: {category} cannot be fully measured: {metrics['null_reason']}; those metrics are "
            f"null in {layout.metrics_file(category)} and left out of the means",
            err=True,
            fg=typer.colors.YELLOW,
        )
    # random_weights stays a boolean here; its long note is in metrics.json and metrics.md once (summarize),
    # not repeated in every category's column of `dvc exp show` / `dvc metrics diff`.
    metrics.update(n_test=len(samples), n_defect=int(result.labels.sum()), random_weights=bundle.random_weights)
    save_category_metrics(layout.metrics_file(category), metrics)
    save_curves(category, curve_points(result))
    save_thresholds(layout.thresholds_file(category), thresholds)
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
    typer.echo(f"{category}: {shown}" + (f"\n  {RANDOM_WEIGHTS_NOTE}" if bundle.random_weights else ""))
