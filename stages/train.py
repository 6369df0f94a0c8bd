"""Stage `train`: learn the category's prompts with MPTS (paper sec. 3.3) on the synthesized images.

Reads params sections `model`, `laa`, `prompts`, `mpts`, `memory` and `data/synth/<category>/manifest.json`
(plus, with `memory.enabled`, the shots of `data/shots/<category>.json` under `dataset.root`, whose patch
features become the visual memory saved with the prompts);
writes `data/prompts/<category>.pt` and logs per-step training curves with dvclive to
`dvclive/train/<category>` (no DVC experiment, no dvc.yaml of its own: DVC runs this stage).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer
from dvclive import Live
from PIL import Image

from mpad.clip import ModelLoadError, load_clip, model_fingerprint
from mpad.data import DatasetError, load_image
from mpad.features import build_encoder, encode, stack_images
from mpad.memory import build_memory
from mpad.mpts import MptsConfig, anomaly_loss, score_maps, train_prompts
from mpad.notes import RANDOM_WEIGHTS_NOTE
from mpad.prompt_file import prompt_record, save_prompts
from mpad.prompts import PromptLearner, TextEncoder, meta_text_embeddings
from mpad.text_cache import TextCache
from stages.common import PARAMS_OPTION, SHOTS_DIR, StageProgress, fail, load_params, read_shots, section

SYNTH_ROOT = Path("data/synth")
PROMPTS_ROOT = Path("data/prompts")
LIVE_ROOT = Path("dvclive/train")
ENCODE_BATCH = 32


def main(category: str = typer.Option(..., "--category", help="Category to train prompts for."),
         params: Path = PARAMS_OPTION) -> None:
    """Learn the normal / anomaly prompts of CATEGORY with MPTS on its synthesized images."""
    p = load_params(params)
    model_p, laa, prompts_p, mpts_p = (section(p, name, params) for name in ("model", "laa", "prompts", "mpts"))
    try:
        config = MptsConfig(
            lam=float(mpts_p["lambda"]),
            calibration=str(mpts_p.get("calibration", "projection")),
            meta_epochs=int(mpts_p["meta_epochs"]),
            steps=int(mpts_p["steps"]),
            lr=float(mpts_p["lr"]),
            batch_size=int(mpts_p["batch_size"]),
            seed=int(mpts_p["seed"]),
        )
        sizes = (int(prompts_p["n_general"]), int(prompts_p["n_normal"]), int(prompts_p["n_anomaly"]))
    except (KeyError, TypeError, ValueError) as err:
        fail(f"{params}: bad mpts/prompts parameters: {err}")
    laa_settings = {key: laa.get(key) for key in ("attention", "k", "layers", "cls")}

    manifest_path = SYNTH_ROOT / category / "manifest.json"
    images, masks = _read_synth(manifest_path)
    _seed_everything(config.seed)

    try:
        bundle = load_clip(str(model_p["name"]), model_p.get("pretrained"), str(model_p.get("device", "auto")),
                           str(model_p.get("precision", "fp32")))
        encoder = build_encoder(bundle, laa_settings)
    except (ModelLoadError, ValueError, KeyError) as err:
        fail(str(err))
    if bundle.random_weights:
        typer.secho(f"note: {RANDOM_WEIGHTS_NOTE}", err=True, fg=typer.colors.YELLOW)

    # The image encoder is frozen: the features of every synthesized image are computed once.
    pixels = stack_images(images, bundle.image_size)
    features = torch.cat(
        [encode(encoder, bundle, pixels[i : i + ENCODE_BATCH]).patch_features for i in range(0, len(pixels),
                                                                                            ENCODE_BATCH)]
    )
    masks_t = torch.from_numpy(np.stack(masks)).to(bundle.device)

    learner = PromptLearner(bundle.model, bundle.tokenizer, category, *sizes,
                            generator=torch.Generator().manual_seed(config.seed))
    text_encoder = TextEncoder(bundle.model)
    meta_text = meta_text_embeddings(bundle.model, bundle.tokenizer, category, TextCache.for_bundle(bundle))
    logit_scale = float(bundle.model.logit_scale.exp())

    live_dir = LIVE_ROOT / category
    total = config.meta_epochs * config.steps
    calibrated_count = 0
    with Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None) as live, \
            StageProgress(total=total, desc=f"train {category}", unit="step") as bar:
        live.log_params({"category": category, **{f"mpts.{k}": v for k, v in mpts_p.items()}})

        def on_step(record: dict[str, float]) -> None:
            nonlocal calibrated_count
            calibrated_count += record["calibrated"]
            live.log_metric("loss_ano", record["loss_ano"])
            live.log_metric("loss_div", record["loss_div"])
            live.log_metric("cos", record["cos"])
            live.log_metric("calibrated_fraction", calibrated_count / (record["step"] + 1))
            live.log_metric("meta_epoch", record["meta_epoch"], plot=False)
            live.next_step()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss_ano']:.4f}", round=record["meta_epoch"])

        result = train_prompts(learner, text_encoder, features, masks_t, meta_text, logit_scale, config, on_step)
        if not result.history:  # mpts.meta_epochs = 0: nothing learned; log the hand-written prompts' loss once
            with torch.no_grad():
                maps = score_maps(features, result.text.to(features.device), logit_scale, tuple(masks_t.shape[-2:]))
                loss = float(anomaly_loss(maps, masks_t))
            result.history.append({"step": 0, "meta_epoch": 0, "loss_ano": loss, "loss_div": 0.0, "cos": 0.0,
                                   "calibrated": 0})
            on_step(result.history[0])

    extra: dict[str, Any] = {}
    memory_p = p.get("memory") or {}
    if memory_p.get("enabled"):
        root = Path(str(section(p, "dataset", params)["root"]))
        shots = read_shots(SHOTS_DIR / f"{category}.json", root, category)
        try:
            shot_images = stack_images([load_image(path) for _, path in shots], bundle.image_size)
            memory = build_memory(bundle, laa_settings, shot_images, memory_p["layers"], memory_p["fusion"])
        except (DatasetError, ValueError, KeyError) as err:
            fail(f"memory branch: {err}")
        extra["memory"] = memory.to_record()
    record = prompt_record(
        category=category,
        model=model_fingerprint(bundle),
        sizes=sizes,
        vectors={"general": learner.general, "normal": learner.normal, "anomaly": learner.anomaly},
        text=result.text,
        laa=laa_settings,
        extra={
            **extra,
            "train": {
                "final_loss": result.final_loss,
                "steps": config.meta_epochs * config.steps,
                "meta_epochs": config.meta_epochs,
                "lambda": config.lam,
                "calibration": config.calibration,
                "calibrated_fraction": calibrated_count / max(1, len(result.history)),
                "images": len(images),
                "random_weights": bundle.random_weights,
            }
        },
    )
    out = PROMPTS_ROOT / f"{category}.pt"
    save_prompts(out, record)
    steps = config.meta_epochs * config.steps
    typer.echo(f"{category}: {steps} optimiser steps, final loss {result.final_loss:.4f} -> {out}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _read_synth(manifest_path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The synthesized images (H, W, 3) uint8 and their masks (H, W) float32 in {0, 1} (mask > 127)."""
    if not manifest_path.is_file():
        fail(f"{manifest_path}: manifest not found (run the synthesize stage first: dvc repro)")
    try:
        manifest = json.loads(manifest_path.read_text())
        samples = manifest["samples"]
        size = tuple(int(v) for v in manifest["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        fail(f"{manifest_path}: not a valid synthesis manifest ({err})")
    if not isinstance(samples, list) or not samples or len(size) != 2:
        fail(f"{manifest_path}: no samples or bad image_size")
    if manifest.get("category") not in (None, manifest_path.parent.name):
        fail(f"{manifest_path}: made for category {manifest.get('category')!r}, not {manifest_path.parent.name!r}")
    root = manifest_path.parent
    images, masks = [], []
    for sample in samples:
        try:
            image_path, mask_path = root / sample["image"], root / sample["mask"]
        except (KeyError, TypeError):
            fail(f"{manifest_path}: a sample lacks 'image' or 'mask': {sample!r}")
        image = _read_png(image_path, "RGB")
        mask = _read_png(mask_path, "L")
        if image.shape[:2] != size:
            fail(f"{image_path}: image is {image.shape[1]}x{image.shape[0]}, the manifest says {size[1]}x{size[0]}")
        if mask.shape != size:
            fail(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, the manifest says {size[1]}x{size[0]}")
        images.append(image)
        masks.append((mask > 127).astype(np.float32))
    return images, masks


def _read_png(path: Path, mode: str) -> np.ndarray:
    if not path.is_file():
        fail(f"{path}: file listed in the manifest is missing")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert(mode))
    except (OSError, ValueError) as err:
        fail(f"{path}: not a readable image ({err})")
