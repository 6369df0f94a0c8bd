"""Scoring new images with a prompts file: the backbone it names, batched scoring, and the files written.

Into an output folder: `<stem>_overlay.png` (the heat map over the image) and `<stem>_map.png` (8-bit
grayscale map; a stem already used in the run gets `_2`, `_3`..., skipping names already taken), both at
the image's size with the longer side capped at max_size; `predictions.csv` (one row per image, COLUMNS)
and `predictions.json` (the same rows under a header saying how they were made).

The scoring is a callable (`Scorer`): the torch `Detector` (`torch_scorer`) or the exported model on
ONNX Runtime (mpad.deploy.runtime.OnnxScorer); the outputs are written by the same code either way. This module
imports open_clip only when `load_backbone` runs, so that the onnx backend works without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mpad.data.mvtec import DatasetError, load_image
from mpad.features import stack_images
from mpad.io import write_csv, write_json, write_png
from mpad.prompt_file import PromptFileError, PromptsFile
from mpad.visualize import render_map

if TYPE_CHECKING:
    from mpad.clip import ClipBundle
    from mpad.detector import Detector

# images (B, 3, H, W) float in [0, 1] at the model's input size -> (maps (B, R, R), scores (B,)) on the CPU
Scorer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
COLUMNS = ("path", "image_score", "max_pixel_score", "threshold", "decision", "status", "overlay", "map")


def load_backbone(
    prompts: PromptsFile, path: Path, device: str = "auto", precision: str = "fp32", weights: str | None = None
) -> ClipBundle:
    """The backbone `prompts` (read from `path`) name, with their stored weights or `weights`.

    Raises PromptFileError when the file names no model or the backbone is not the one it was made for
    (a checkpoint file named as the stored one counts as the same), mpad.clip.ModelLoadError when the
    model cannot be built.
    """
    from mpad.clip import backbone_identity, load_clip  # open_clip: the torch backend only

    made = prompts.model
    if "name" not in made:
        raise PromptFileError(f"{path}: the prompts file does not say which model it was made for")
    bundle = load_clip(str(made["name"]), weights if weights is not None else made.get("pretrained"), device, precision)
    identity = backbone_identity(bundle)
    stored = str(made.get("pretrained"))
    if weights is not None and Path(weights).is_file() and Path(weights).name == Path(stored).name:
        identity["pretrained"] = stored  # the same checkpoint file, moved elsewhere
    prompts.check_backbone(identity, path)
    text_dim = int(prompts.text.shape[-1])
    if text_dim != identity["embed_dim"]:
        raise PromptFileError(
            f"{path}: its text embeddings have {text_dim} dimensions, {bundle.name} embeds in "
            f"{identity['embed_dim']}; the file is inconsistent or made for another model"
        )
    return bundle


def torch_scorer(detector: Detector, resolution: int) -> Scorer:
    """The Scorer of the torch backend: `detector`'s maps at (resolution, resolution) and scores, on the CPU."""

    def score(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        detection = detector(images, (resolution, resolution))
        return detection.maps, detection.scores

    return score


def decide(score: float, threshold: float | None) -> str:
    """ "anomalous" when score >= threshold, else "normal"; "n/a" without a threshold."""
    return "n/a" if threshold is None else ("anomalous" if score >= threshold else "normal")


def predict_images(
    score: Scorer,
    input_size: Sequence[int],
    paths: Sequence[Path],
    out: Path,
    *,
    batch_size: int,
    max_size: int,
    colour_range: tuple[float, float],
    threshold: float | None,
    on_image: Callable[[int], Any] | None = None,
    on_skip: Callable[[str], Any] | None = None,
) -> list[dict[str, Any]]:
    """Decode, resize to `input_size` (H, W), score in batches of `batch_size`, write each image's two PNGs into `out`;
    one row (COLUMNS) per path, in order. A path that cannot be decoded gets an error row and
    `on_skip(message naming it)`; `on_image(1)` after each path is read (for a progress bar)."""
    rows: list[dict[str, Any] | None] = [None] * len(paths)
    used: set[str] = set()
    batch: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        maps, scores = score(stack_images([image for _, image in batch], input_size))
        for (i, image), amap, image_score in zip(batch, maps, scores, strict=True):
            names = _write_maps(out, _unique_stem(paths[i].stem, used), image, amap, max_size, colour_range)
            score_f, peak = float(image_score), float(amap.max())
            rows[i] = _row(paths[i], score_f, peak, threshold, decide(score_f, threshold), "ok", *names)
        batch.clear()

    for i, path in enumerate(paths):
        try:
            batch.append((i, load_image(path)))
        except (DatasetError, OSError) as err:
            if on_skip is not None:
                on_skip(str(err) if str(path) in str(err) else f"{path}: {err}")
            rows[i] = _row(path, None, None, threshold, "n/a", f"error: {err}", "", "")
        if len(batch) == batch_size:
            flush()
        if on_image is not None:
            on_image(1)
    flush()
    return [r for r in rows if r is not None]


def save_predictions(out: Path, rows: list[dict[str, Any]], header: dict[str, Any]) -> None:
    """predictions.csv (COLUMNS; None empty, floats as the shortest decimal that reads back exactly: the scores
    in float32, the model's precision, the threshold in float64, so a score and a threshold that decide
    differently never print alike) and predictions.json ({...header, "n_images", "n_failed", "predictions":
    rows}) in `out`."""
    cells = [[_cell(row[c], float64=c == "threshold") for c in COLUMNS] for row in rows]
    write_csv(out / "predictions.csv", COLUMNS, cells)
    write_json(
        out / "predictions.json",
        {**header, "n_images": len(rows), "n_failed": sum(r["status"] != "ok" for r in rows), "predictions": rows},
    )


def _cell(value: Any, float64: bool) -> Any:
    if value is None:
        return ""
    if not isinstance(value, float):
        return value
    return repr(value) if float64 else np.format_float_positional(np.float32(value), unique=True, trim="-")


def _row(
    path: Path,
    score: float | None,
    peak: float | None,
    threshold: float | None,
    decision: str,
    status: str,
    overlay: str,
    map_name: str,
) -> dict[str, Any]:
    return {
        "path": str(path), "image_score": score, "max_pixel_score": peak, "threshold": threshold,
        "decision": decision, "status": status, "overlay": overlay, "map": map_name,
    }  # fmt: skip


def _unique_stem(stem: str, used: set[str]) -> str:
    """`stem`, else the first of `stem_2`, `stem_3`... not in `used` (casefolded, added): unique among the
    run's names even for x.png, x.jpg, x_2.png (-> x, x_2, x_2_2), and on case-insensitive file systems."""
    name, n = stem, 1
    while name.casefold() in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name.casefold())
    return name


def _write_maps(
    out: Path, stem: str, image: np.ndarray, amap: torch.Tensor, max_size: int, colour_range: tuple[float, float]
) -> tuple[str, str]:
    """Write `<stem>_overlay.png` and `<stem>_map.png` for image (H, W, 3) uint8 and its map (R, R)."""
    names = (f"{stem}_overlay.png", f"{stem}_map.png")
    for name, pixels in zip(names, render_map(image, amap.float().numpy(), max_size, *colour_range), strict=True):
        write_png(out / name, pixels)
    return names
