"""Stage `synthesize`: OAGM (paper sec. 3.4), synthesized anomalies from the shots of one category.

Reads `data/shots/<category>.json` (written by `sample`), checks each shot's sha256, resizes the shots to
the model's input size, computes an object mask per shot, and writes `data/synth/<category>/`
(one folder, atomically):

    images/NNNN.png          x' (uint8 RGB, model input size)
    masks/NNNN.png           M'_a (0/255): exactly where noise was added
    object_masks/<shot>.png  M_obj of each shot (0/255), to look at
    manifest.json            {"category", "image_size", "samples": [{"image", "mask", "shot",
                             "anomalous_fraction"}], "object_mask_method", "texture",
                             "object_masks", "random_weights", "note"}

Params read: dataset.root, dataset.name, dataset.textures (null: the default of dataset.name),
model.{name, pretrained, device, precision},
oagm.{enabled, region, samples, sigma, clean_fraction, mask_method, mask_threshold, mask_layers, seed}.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer
from PIL import Image

from mpad.clip import ModelLoadError, load_clip
from mpad.data.mvtec import MVTEC_TEXTURES, DatasetError, load_image
from mpad.data.shots import stable_hash
from mpad.features import stack_images
from mpad.io import atomic_path
from mpad.notes import RANDOM_WEIGHTS_NOTE
from mpad.oagm import object_masks, synthesize
from mpad.synthetic import SYNTHETIC_TEXTURES
from mpad.text_cache import TextCache
from stages.common import PARAMS_OPTION, SHOTS_DIR, StageProgress, fail, load_params, read_shots

DEFAULT_TEXTURES = {"mvtec": MVTEC_TEXTURES, "synthetic": SYNTHETIC_TEXTURES, "folder": ()}
SYNTH_DIR = Path("data/synth")


def _textures(dataset: dict[str, Any]) -> set[str]:
    """dataset.textures; null means the dataset's default (MVTec AD's five, the generated two, none)."""
    textures = dataset.get("textures")
    if textures is None:
        return set(DEFAULT_TEXTURES.get(str(dataset.get("name", "mvtec")), ()))
    if not isinstance(textures, list):
        raise ValueError(f"dataset.textures must be a list of names or null, got {textures!r}")
    return {str(t) for t in textures}


def _save_png(arr: np.ndarray, path: Path) -> None:
    """Deterministic PNG bytes (no metadata, fixed settings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=6)


def main(
    category: str = typer.Option(..., "--category", help="Category whose shots get synthesized anomalies."),
    params: Path = PARAMS_OPTION,
) -> None:
    """OAGM: synthesize anomalous training images and their masks from the shots (paper sec. 3.4)."""
    p = load_params(params)
    try:
        dataset, model, oagm = p["dataset"], p["model"], p["oagm"]
        root = Path(dataset["root"])
        textures = _textures(dataset)
        settings: dict[str, Any] = {
            "enabled": bool(oagm["enabled"]),
            "region": str(oagm["region"]),
            "samples": int(oagm["samples"]),
            "sigma": float(oagm["sigma"]),
            "clean_fraction": float(oagm["clean_fraction"]),
        }
        method = str(oagm.get("mask_method", "clip"))
        threshold = float(oagm["mask_threshold"])
        layers = int(oagm.get("mask_layers", 6))
        seed = int(oagm["seed"])
    except (KeyError, TypeError, ValueError) as err:
        fail(f"{params}: missing or invalid dataset/model/oagm setting ({err!r})")

    shots_file = SHOTS_DIR / f"{category}.json"
    shots = read_shots(shots_file, root, category)
    try:
        bundle = load_clip(str(model["name"]), model.get("pretrained"), str(model["device"]), str(model["precision"]))
        images = stack_images([load_image(path) for _, path in shots], bundle.image_size)
    except (DatasetError, ModelLoadError) as err:
        fail(str(err))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            masks = object_masks(
                images, category, method, threshold, texture=category in textures, bundle=bundle, layers=layers,
                cache=TextCache.for_bundle(bundle),
            )
        except ValueError as err:
            fail(f"{params}: {err}")
    for warning in caught:
        typer.secho(f"warning: {warning.message}", err=True, fg=typer.colors.YELLOW)

    rng = np.random.default_rng([seed, stable_hash(category)])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    samples_meta: list[dict[str, Any]] = []
    object_meta: list[dict[str, Any]] = []
    out_dir = SYNTH_DIR / category
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for shot_index, ((shot_name, _), image, obj) in enumerate(
            StageProgress(list(zip(shots, images, masks, strict=True)), desc=f"synthesize {category}", unit="shot")
        ):
            mask_name = f"object_masks/{shot_index}.png"
            _save_png(obj.mask.astype(np.uint8) * 255, tmp / mask_name)
            object_meta.append(
                {"shot": shot_name, "mask": mask_name, "fraction": obj.fraction, "fallback": obj.fallback}
            )
            try:
                synthesized = synthesize(image, obj.mask, rng=rng, generator=generator, **settings)
            except ValueError as err:
                fail(f"{params}: {err}")
            for sample in synthesized:
                n = len(samples_meta)
                image_name, sample_mask = f"images/{n:04d}.png", f"masks/{n:04d}.png"
                _save_png(sample.image, tmp / image_name)
                _save_png(sample.mask.astype(np.uint8) * 255, tmp / sample_mask)
                samples_meta.append(
                    {
                        "image": image_name,
                        "mask": sample_mask,
                        "shot": shot_name,
                        "anomalous_fraction": sample.anomalous_fraction,
                    }
                )
        manifest = {
            "category": category,
            "image_size": list(bundle.image_size),
            "samples": samples_meta,
            "object_mask_method": method,
            "texture": category in textures,
            "object_masks": object_meta,
            "random_weights": bundle.random_weights,
            "note": RANDOM_WEIGHTS_NOTE if bundle.random_weights else None,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    mean = float(np.mean([s["anomalous_fraction"] for s in samples_meta])) if samples_meta else 0.0
    summary = f"{category}: {len(samples_meta)} images in {out_dir}, mean anomalous fraction {mean:.3f}"
    if bundle.random_weights:
        summary += f" [{RANDOM_WEIGHTS_NOTE}]"
    typer.echo(summary)
