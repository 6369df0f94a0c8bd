"""Command `predict`: score new images with learned prompts; anomaly maps, overlays and decisions.

    mpad predict --prompts data/prompts/<category>.pt IMAGES... --out DIR
                 [--threshold T] [--thresholds-file data/thresholds/<category>.json]
                 [--batch-size 8] [--device auto] [--precision fp32] [--model-pretrained PATH]
                 [--resolution R] [--max-size 1024]

Independent of params.yaml: the backbone (name, weights), encoder settings, text embeddings and
visual memory all come from the self-describing prompts file; scoring settings (smoothing_sigma,
image_score, topk, and the map resolution when stored) and the decision threshold / colour range
come from the thresholds file that `mpad evaluate` writes. Without `--thresholds-file`,
`data/thresholds/<category>.json` (relative to the working directory) is used when it exists.

IMAGES: image files; folders (the image files directly inside, sorted, NOT recursive: pass a
glob like 'dir/**/*.png' for a recursive search); globs (expanded here too, so quoting them is
fine; `**` matches sub-folders). Paths are taken in the given order, duplicates once. A path
that does not exist, or a file that cannot be decoded, is reported on stderr and in the outputs
and skipped; the other images are still scored.

Writes into --out (each file atomically):
  <stem>_overlay.png   the heat map (colour range map_low..map_high of the thresholds file, else 0..1)
                       blended over the image, at the image's size (longer side capped at --max-size)
  <stem>_map.png       8-bit grayscale of the map scaled to the same range, same size
                       (a stem seen twice gets `_2`, `_3`... appended)
  predictions.csv      one row per image: path, image_score, max_pixel_score, threshold, decision,
                       status, overlay, map
  predictions.json     the same rows plus the model, scoring, threshold and threshold_source

Decision: anomalous when image_score >= threshold (`--threshold`, else the thresholds file's
image_threshold, the F1-max threshold of evaluate); with neither, "n/a" and a warning.

Exit status: 0 all images scored; 1 some image failed (or the prompts / model / thresholds file
could not be used, or the prompts were made for another backbone); 2 no image found (or bad usage).
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer
from PIL import Image
from tqdm import tqdm

from mpad.clip import ClipBundle, ModelLoadError, is_random, load_clip, model_fingerprint
from mpad.data.mvtec import IMAGE_SUFFIXES, DatasetError, load_image
from mpad.detector import Detector
from mpad.features import stack_images
from mpad.io import atomic_path, write_csv, write_json
from mpad.notes import RANDOM_WEIGHTS_NOTE
from mpad.prompt_file import PromptFileError, check_backbone, load_prompts
from mpad.visualize import render_map
from stages.common import fail

# What evaluate uses with the default params.yaml, for when no thresholds file says otherwise.
DEFAULT_SCORING: dict[str, Any] = {"smoothing_sigma": 4.0, "image_score": "max", "topk": 0.01}
DEFAULT_RESOLUTION = 256
THRESHOLDS_ROOT = Path("data/thresholds")
COLUMNS = ("path", "image_score", "max_pixel_score", "threshold", "decision", "status", "overlay", "map")
_GLOB_CHARS = set("*?[")


def main(
    images: list[str] = typer.Argument(..., help="Image files, folders (not recursive) or globs.", show_default=False),
    prompts: Path = typer.Option(..., "--prompts", help="Prompts file written by `mpad train`."),
    out: Path = typer.Option(..., "--out", help="Output folder (created)."),
    threshold: float | None = typer.Option(
        None, "--threshold", help="Image-score threshold; default: image_threshold of the thresholds file."
    ),
    thresholds_file: Path | None = typer.Option(
        None, "--thresholds-file", help="From `mpad evaluate`; default data/thresholds/<category>.json if present."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | bf16 (half precision: GPU)."),
    model_pretrained: str | None = typer.Option(
        None, "--model-pretrained", help="Weights to load instead of the stored ones (e.g. a moved checkpoint file)."
    ),
    resolution: int | None = typer.Option(
        None, "--resolution", min=8, help="Map size the scores are computed at (default: thresholds file, else 256)."
    ),
    max_size: int = typer.Option(1024, "--max-size", min=8, help="Longer side cap of the written maps."),
) -> None:
    """Score IMAGES with the learned prompts: maps, overlays, scores and decisions into --out."""
    paths, missing_globs = expand_images(images)
    for pattern in missing_globs:
        typer.secho(f"warning: {pattern}: no image matches", err=True, fg=typer.colors.YELLOW)
    if not paths:
        typer.secho(f"error: no image found in {' '.join(images)}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=2)

    try:
        record = load_prompts(prompts)
        bundle = _load_backbone(record, prompts, model_pretrained, device, precision)
    except (PromptFileError, ModelLoadError) as err:
        fail(str(err))
    if bundle.random_weights or is_random(record["model"].get("pretrained")):
        typer.secho(f"note: {RANDOM_WEIGHTS_NOTE}", err=True, fg=typer.colors.YELLOW)

    category = str(record.get("category", ""))
    if thresholds_file is None and category and (THRESHOLDS_ROOT / f"{category}.json").is_file():
        thresholds_file = THRESHOLDS_ROOT / f"{category}.json"
    info = _read_thresholds(thresholds_file) if thresholds_file is not None else {}
    scoring = {key: info.get(key, default) for key, default in DEFAULT_SCORING.items()}
    size = int(resolution or info.get("resolution", DEFAULT_RESOLUTION))
    low, high = float(info.get("map_low", 0.0)), float(info.get("map_high", 1.0))
    if not high > low:
        low, high = 0.0, 1.0
    used, source = _pick_threshold(threshold, info, thresholds_file)

    try:
        detector = Detector.from_record(bundle, record, scoring)
    except (ValueError, KeyError) as err:
        fail(f"{prompts}: cannot build the detector from it: {err}")
    out.mkdir(parents=True, exist_ok=True)
    rows = _predict_all(detector, bundle, paths, out, batch_size, size, max_size, (low, high), used)

    _write_tables(out, rows, {
        "prompts": str(prompts),
        "category": category,
        "model": record["model"],
        "random_weights": bundle.random_weights,
        **({"note": RANDOM_WEIGHTS_NOTE} if bundle.random_weights else {}),
        "memory": detector.memory is not None,
        "thresholds_file": None if thresholds_file is None else str(thresholds_file),
        "threshold": used,
        "threshold_source": source,
        "scoring": scoring,
        "resolution": size,
        "map_range": [low, high],
    })
    failed = sum(r["status"] != "ok" for r in rows)
    counts = {d: sum(r["decision"] == d for r in rows if r["status"] == "ok") for d in ("anomalous", "normal", "n/a")}
    shown = ", ".join(f"{n} {d}" for d, n in counts.items() if n)
    typer.echo(f"{len(rows)} images: {shown or 'none scored'}" + (f", {failed} failed" if failed else "")
               + f"; see {out / 'predictions.csv'}")
    if failed:
        raise typer.Exit(code=1)


def expand_images(args: list[str]) -> tuple[list[Path], list[str]]:
    """Arguments -> (image paths in order without duplicates, glob patterns that matched nothing).

    A folder gives its image files (IMAGE_SUFFIXES, hidden skipped), sorted, not recursive; a glob its
    matching image files, sorted (`**` recursive); anything else is taken as a file path as is, even
    when it does not exist (it is then reported as failed when read).
    """
    paths: list[Path] = []
    unmatched: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_image(p))
        elif not path.exists() and _GLOB_CHARS & set(arg):
            found = sorted(Path(p) for p in glob.glob(arg, recursive=True) if _is_image(Path(p)))
            if not found:
                unmatched.append(arg)
        else:
            found = [path]
        paths.extend(found)
    return list(dict.fromkeys(paths)), unmatched


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def _load_backbone(
    record: dict[str, Any], prompts: Path, override: str | None, device: str, precision: str
) -> ClipBundle:
    """Build the backbone the record names (or with `override` weights); refuse one it was not made for."""
    made = record.get("model")
    if not isinstance(made, dict) or "name" not in made:
        raise PromptFileError(f"{prompts}: the prompts file does not say which model it was made for")
    weights = override if override is not None else made.get("pretrained")
    bundle = load_clip(str(made["name"]), weights, device, precision)
    fingerprint = model_fingerprint(bundle)
    stored = str(made.get("pretrained"))
    if override is not None and Path(override).is_file() and Path(override).name == Path(stored).name:
        fingerprint["pretrained"] = stored  # the same checkpoint file, moved elsewhere
    check_backbone(record, fingerprint, prompts)
    text_dim = int(record["text"].shape[-1])
    if text_dim != fingerprint["embed_dim"]:
        raise PromptFileError(
            f"{prompts}: its text embeddings have {text_dim} dimensions, {bundle.name} embeds in "
            f"{fingerprint['embed_dim']}; the file is inconsistent or made for another model"
        )
    return bundle


def _read_thresholds(path: Path) -> dict[str, Any]:
    """The thresholds JSON of `mpad evaluate`; a missing or malformed file stops the command."""
    if not path.is_file():
        fail(f"{path}: thresholds file not found (run `mpad evaluate` or omit --thresholds-file)")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        fail(f"{path}: not a readable thresholds JSON file ({err})")
    if not isinstance(info, dict):
        fail(f"{path}: expected a JSON object of thresholds")
    return info


def _pick_threshold(
    threshold: float | None, info: dict[str, Any], thresholds_file: Path | None
) -> tuple[float | None, str | None]:
    """(threshold, where it came from), announced on stdout; (None, None) with a warning when there is none."""
    if threshold is not None:
        used, source = float(threshold), "--threshold"
    elif info.get("image_threshold") is not None:
        used, source = float(info["image_threshold"]), f"{thresholds_file} (image_threshold)"
    else:
        typer.secho(
            "warning: no threshold (no --threshold, and no image_threshold in a thresholds file): "
            "decisions are n/a, scores are still written",
            err=True,
            fg=typer.colors.YELLOW,
        )
        return None, None
    typer.echo(f"threshold {used:.6g} from {source}")
    return used, source


def _predict_all(
    detector: Detector,
    bundle: ClipBundle,
    paths: list[Path],
    out: Path,
    batch_size: int,
    size: int,
    max_size: int,
    colour_range: tuple[float, float],
    threshold: float | None,
) -> list[dict[str, Any]]:
    """Decode, score in batches and write each image's maps; one row per path, in order."""
    rows: list[dict[str, Any] | None] = [None] * len(paths)
    stems: dict[str, int] = {}
    batch: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        tensor = stack_images([image for _, image in batch], bundle.image_size)
        detection = detector(tensor, (size, size))
        for (i, image), amap, score in zip(batch, detection.maps, detection.scores, strict=True):
            names = _write_maps(out, _unique_stem(paths[i].stem, stems), image, amap, max_size, colour_range)
            score_f, peak = float(score), float(amap.max())
            decision = "n/a" if threshold is None else ("anomalous" if score_f >= threshold else "normal")
            rows[i] = _row(paths[i], score_f, peak, threshold, decision, "ok", *names)
        batch.clear()

    with tqdm(total=len(paths), desc="predict", unit="img") as bar:
        for i, path in enumerate(paths):
            try:
                batch.append((i, load_image(path)))
            except (DatasetError, OSError) as err:
                message = str(err) if str(path) in str(err) else f"{path}: {err}"
                tqdm.write(f"error: skipped {message}", file=sys.stderr)
                rows[i] = _row(path, None, None, threshold, "n/a", f"error: {err}", "", "")
            if len(batch) == batch_size:
                flush()
            bar.update(1)
        flush()
    return [r for r in rows if r is not None]


def _row(
    path: Path, score: float | None, peak: float | None, threshold: float | None, decision: str, status: str,
    overlay: str, map_name: str,
) -> dict[str, Any]:
    return {
        "path": str(path), "image_score": score, "max_pixel_score": peak, "threshold": threshold,
        "decision": decision, "status": status, "overlay": overlay, "map": map_name,
    }  # fmt: skip


def _unique_stem(stem: str, seen: dict[str, int]) -> str:
    """`stem`, or `stem_2`, `stem_3`... when an earlier image of the run had the same stem."""
    seen[stem] = seen.get(stem, 0) + 1
    return stem if seen[stem] == 1 else f"{stem}_{seen[stem]}"


def _write_maps(
    out: Path, stem: str, image: np.ndarray, amap: torch.Tensor, max_size: int, colour_range: tuple[float, float]
) -> tuple[str, str]:
    """Write `<stem>_overlay.png` and `<stem>_map.png` for image (H, W, 3) uint8 and its map (R, R)."""
    names = (f"{stem}_overlay.png", f"{stem}_map.png")
    for name, pixels in zip(names, render_map(image, amap.float().numpy(), max_size, *colour_range), strict=True):
        with atomic_path(out / name) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
    return names


def _write_tables(out: Path, rows: list[dict[str, Any]], header: dict[str, Any]) -> None:
    """predictions.csv (COLUMNS) and predictions.json ({...header, "predictions": rows})."""
    cells = [["" if row[c] is None else f"{row[c]:.6f}" if isinstance(row[c], float) else row[c] for c in COLUMNS]
             for row in rows]
    write_csv(out / "predictions.csv", COLUMNS, cells)
    write_json(out / "predictions.json", {**header, "n_images": len(rows),
                                          "n_failed": sum(r["status"] != "ok" for r in rows), "predictions": rows})
