"""Stage `synthesize`: OAGM (paper sec. 3.4), synthesized anomalies from the shots of one category.

Reads `data/shots/<category>.json` (written by `sample`; each shot's sha256 checked), resizes the shots to
the model's input size, computes an object mask per shot (`mpad.oagm`), and writes the synthesized set
`data/synth/<category>/` atomically (format: `mpad.synth_set`).

Params read: dataset.root, dataset.name, dataset.textures (null: the default of dataset.name),
model.{name, pretrained, device, precision},
oagm.{enabled, region, samples, sigma, clean_fraction, mask_method, texture_mask, mask_threshold, mask_layers,
seed}.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from mpad import layout
from mpad.clip import ModelLoadError, load_clip
from mpad.config import RANDOM_WEIGHTS_NOTE
from mpad.data.mvtec import DatasetError, load_image
from mpad.features import stack_images
from mpad.oagm import synthesize_set
from mpad.object_masks import shot_object_masks
from mpad.synth_set import write_synth_set
from mpad.text_cache import TextCache
from stages.common import PARAMS_OPTION, StageProgress, ensure_space, fail, load_config, read_shots


def main(
    category: str = typer.Option(..., "--category", help="Category whose shots get synthesized anomalies."),
    params: Path = PARAMS_OPTION,
) -> None:
    """OAGM: synthesize anomalous training images and their masks from the shots (paper sec. 3.4)."""
    dataset, model, oagm = load_config(params, "dataset", "model", "oagm")
    ensure_space(layout.synth_dir(category))
    shots = read_shots(dataset.path, category)
    try:
        bundle = load_clip(model.name, model.pretrained, model.device, model.precision)
        images = stack_images([load_image(path) for _, path in shots], bundle.image_size)
        texture = category in dataset.texture_categories
        masks = shot_object_masks(images, category, oagm, texture, bundle, TextCache.for_bundle(bundle))
    except (DatasetError, ModelLoadError, ValueError) as err:
        fail(str(err))
    for obj in masks:
        if obj.fallback:
            typer.secho(f"warning: {obj.fallback}", err=True, fg=typer.colors.YELLOW)

    out = layout.synth_dir(category)
    info = {
        "object_mask_method": oagm.mask_method,
        "texture": texture,
        "texture_mask": oagm.texture_mask,
        "random_weights": bundle.random_weights,
        "note": RANDOM_WEIGHTS_NOTE if bundle.random_weights else None,
    }
    with StageProgress(
        synthesize_set(images, masks, category, oagm), total=len(shots), desc=f"synthesize {category}", unit="shot"
    ) as drawn:
        manifest = write_synth_set(out, category, bundle.image_size, [rel for rel, _ in shots], masks, drawn, info)

    samples = manifest["samples"]
    mean = float(np.mean([s["anomalous_fraction"] for s in samples])) if samples else 0.0
    summary = f"{category}: {len(samples)} images in {out}, mean anomalous fraction {mean:.3f}"
    if bundle.random_weights:
        summary += f" [{RANDOM_WEIGHTS_NOTE}]"
    typer.echo(summary)
