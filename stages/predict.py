"""Command `predict`: score new images with learned prompts; anomaly maps, overlays and decisions.

    mpad predict --prompts data/prompts/<category>.pt IMAGES... --out DIR
                 [--threshold T] [--thresholds-file data/thresholds/<category>.json] [--force]
                 [--batch-size 8] [--device auto] [--precision fp32] [--model-pretrained PATH]
                 [--resolution R] [--max-size 1024]
    mpad predict --backend onnx --model <file>.onnx IMAGES... --out DIR [--threshold T] [--batch-size 8]
                 [--thresholds-file F] [--device auto] [--max-size 1024]

Independent of params.yaml: the backbone (name, weights), encoder settings, text embeddings and
visual memory all come from the self-describing prompts file; scoring settings (smoothing_sigma,
image_score, topk, and the map resolution when stored) and the decision threshold / colour range
come from the thresholds file that `mpad evaluate` writes, so that predict reproduces evaluate's maps
wherever it runs. Without `--thresholds-file`, the category's file beside the prompts file
(`<p>/prompts/<category>.pt` -> `<p>/thresholds/<category>.json`: the project layout, found from any
working directory), else `data/thresholds/<category>.json` of the working directory; with neither, a
warning names the default scoring settings used instead. A thresholds file records its category and the
SHA-256 of the prompts file it was measured with: one of another category or of other prompts is refused
unless `--force` (one written before it recorded them is used with a warning that the pairing is unchecked).

`--backend onnx` scores with a model written by `mpad export` on onnxruntime (the optional extra `export`),
without open_clip or the checkpoint: the prompts, weights, scoring settings and resolution are baked into
the model; the threshold and colour range come from its sidecar `<file>.onnx.json` (or `--thresholds-file`,
if its scoring settings and resolution are the model's). The outputs are the torch backend's.

Checked before the model loads: --out must be a folder or creatable as one, and writable (not an
existing file, not under a file); --threshold must lie in [0, 1], where the scores lie.

IMAGES: image files; folders (the image files directly inside, sorted, NOT recursive: pass a
glob like 'dir/**/*.png' for a recursive search); globs (expanded here too, so quoting them is
fine; `**` matches sub-folders). Paths are taken in the given order, duplicates once. A path
that does not exist, or a file that cannot be decoded, is reported on stderr and in the outputs
and skipped; the other images are still scored.

Writes into --out (each file atomically):
  <stem>_overlay.png   the heat map (colour range map_low..map_high of the thresholds file, else 0..1)
                       blended over the image, at the image's size (longer side capped at --max-size)
  <stem>_map.png       8-bit grayscale of the map scaled to the same range, same size
                       (a stem already used in the run gets `_2`, `_3`..., skipping names taken:
                       x.png, x.jpg, x_2.png -> x, x_2, x_2_2; case-insensitively)
  predictions.csv      one row per image: path, image_score, max_pixel_score, threshold, decision,
                       status, overlay, map
  predictions.json     the same rows plus the backend, model, scoring, threshold and threshold_source

Decision: anomalous when image_score >= threshold (`--threshold`, else the thresholds file's
image_threshold, the F1-max threshold of evaluate); with neither, "n/a" and a warning.

Exit status: 0 all images scored; 1 some image failed (or the prompts / model / thresholds file
could not be used, or the prompts were made for another backbone); 2 no image found (or bad usage).
"""

from __future__ import annotations

import glob
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer
from tqdm import tqdm

from mpad.config import RANDOM_WEIGHTS_NOTE
from mpad.data import is_image_file
from mpad.deploy.runtime import OnnxScorer
from mpad.deploy.sidecar import DeployFileError, Sidecar, sidecar_path
from mpad.prediction import Scorer, predict_images, save_predictions
from mpad.prompt_file import PromptFileError
from mpad.thresholds import (
    ThresholdsFileError,
    check_pairing,
    colour_range,
    image_threshold_of,
    load_paired,
    load_thresholds,
    resolution_of,
    scoring_of,
)
from stages.common import StageProgress, fail, warn

_GLOB_CHARS = set("*?[")
BACKENDS = ("torch", "onnx")


def _finite(value: float | None) -> float | None:
    """--threshold: refuse nan / inf (nan would make every image "normal") and values outside [0, 1], where
    image scores lie (probabilities of the anomaly prompt): such a threshold decides every image alike."""
    if value is not None and not math.isfinite(value):
        _usage_error(f"--threshold {value}: not a finite number")
    if value is not None and not 0.0 <= value <= 1.0:
        every = "anomalous" if value < 0 else "normal"
        _usage_error(f"--threshold {value:g}: image scores lie in [0, 1], so it would call every image {every}")
    return value


def _writable_folder(out: Path) -> Path:
    """--out: refuse, before any work, an existing file, a path under a file, or a folder we cannot write in."""
    if out.exists() and not out.is_dir():
        _usage_error(f"--out {out}: an existing file, not a folder")
    parent = out
    while not parent.exists():  # the nearest existing folder is where mkdir will need to write
        parent = parent.parent
    if not parent.is_dir():
        _usage_error(f"--out {out}: lies under {parent}, which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        _usage_error(f"--out {out}: cannot create or write it, {parent} is not writable")
    return out


def _usage_error(message: str) -> NoReturn:
    """One plain line on stderr (no box: the paths stay whole), exit status 2 (bad usage)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def main(
    images: list[str] = typer.Argument(..., help="Image files, folders (not recursive) or globs.", show_default=False),
    prompts: Path | None = typer.Option(None, "--prompts", help="Prompts file written by `mpad train` (torch)."),
    out: Path = typer.Option(..., "--out", callback=_writable_folder, help="Output folder (created)."),
    threshold: float | None = typer.Option(
        None, "--threshold", callback=_finite, help="Image-score threshold in [0, 1]; default: the thresholds file's."
    ),
    thresholds_file: Path | None = typer.Option(
        None, "--thresholds-file", help="From `mpad evaluate`; default: the category's, beside the prompts or in data/."
    ),
    force: bool = typer.Option(
        False, "--force", help="Use a --thresholds-file measured on another category or for other prompts."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | bf16 (half precision: GPU; torch)."),
    model_pretrained: str | None = typer.Option(
        None, "--model-pretrained", help="Weights to load instead of the stored ones (e.g. a moved checkpoint file)."
    ),
    resolution: int | None = typer.Option(
        None, "--resolution", min=8, help="Map size the scores are computed at (default: thresholds file, else 256)."
    ),
    max_size: int = typer.Option(1024, "--max-size", min=8, help="Longer side cap of the written maps."),
    backend: str = typer.Option("torch", "--backend", help="torch (the prompts file) | onnx (an `mpad export` model)."),
    model: Path | None = typer.Option(None, "--model", help="ONNX model written by `mpad export` (--backend onnx)."),
) -> None:
    """Score IMAGES with the learned prompts: maps, overlays, scores and decisions into --out."""
    _check_backend_options(backend, prompts, model, precision, model_pretrained)
    paths = _images_or_exit(images)
    if backend == "onnx":
        setup = _onnx_setup(model, thresholds_file, force, device, resolution)
    else:
        setup = _torch_setup(prompts, thresholds_file, force, device, precision, model_pretrained, resolution)
    score, input_size, header, stored, low_high, thresholds_file = setup
    used, source = _pick_threshold(threshold, stored, thresholds_file)
    out.mkdir(parents=True, exist_ok=True)
    with StageProgress(total=len(paths), desc="predict", unit="img") as bar:
        rows = predict_images(
            score,
            input_size,
            paths,
            out,
            batch_size=batch_size,
            max_size=max_size,
            colour_range=low_high,
            threshold=used,
            on_image=bar.update,
            on_skip=lambda message: tqdm.write(f"error: skipped {message}", file=sys.stderr),
        )
    save_predictions(out, rows, {
        "backend": backend, **header, **({"note": RANDOM_WEIGHTS_NOTE} if header["random_weights"] else {}),
        "thresholds_file": None if thresholds_file is None else str(thresholds_file),
        "threshold": used, "threshold_source": source, "map_range": list(low_high),
    })  # fmt: skip
    _report(rows, out)


# (scorer, input size (H, W), header of predictions.json, the stored image threshold (None: none), the colour
# range, the file they came from)
Setup = tuple[Scorer, tuple[int, int], dict[str, Any], float | None, tuple[float, float], Path | None]


def _check_backend_options(
    backend: str, prompts: Path | None, model: Path | None, precision: str, model_pretrained: str | None
) -> None:
    """Usage errors (exit 2) for options of the other backend, before any work."""
    if backend not in BACKENDS:
        _usage_error(f"--backend {backend}: must be one of {', '.join(BACKENDS)}")
    if backend == "torch" and (prompts is None or model is not None):
        _usage_error("--backend torch needs --prompts (and no --model; --model is the onnx backend's)")
    if backend == "onnx":
        extra = [name for name, given in (("--prompts", prompts is not None), ("--precision", precision != "fp32"),
                                          ("--model-pretrained", model_pretrained is not None)) if given]  # fmt: skip
        if model is None or extra:
            _usage_error(
                f"--backend onnx needs --model (an `mpad export` file) and takes no "
                f"{', '.join(extra or ['--prompts'])}: prompts, weights and precision are baked into it"
            )


def _torch_setup(
    prompts: Path, thresholds_file: Path | None, force: bool, device: str, precision: str,
    model_pretrained: str | None, resolution: int | None,
) -> Setup:  # fmt: skip
    """The prompts file's Detector on its backbone; its thresholds file (mpad.thresholds.pair_thresholds)."""
    from mpad.clip import ModelLoadError  # open_clip and the model code: this backend only
    from mpad.detector import Detector
    from mpad.prediction import load_backbone, torch_scorer

    try:  # the cheap checks first: the model loads only when prompts and thresholds are usable
        learned, pairing = load_paired(prompts, thresholds_file, force)
        for message in pairing.warnings:
            warn(message)
        info, thresholds_file, category = pairing.info, pairing.path, learned.category
        scoring = scoring_of(info)
        bundle = load_backbone(learned, prompts, device, precision, weights=model_pretrained)
        if bundle.random_weights or learned.random_weights:
            warn(RANDOM_WEIGHTS_NOTE, "note")
    except (PromptFileError, ModelLoadError, ThresholdsFileError) as err:
        fail(str(err))
    size = resolution or resolution_of(info)
    try:
        detector = Detector.from_prompts(bundle, learned, scoring)
    except (ValueError, KeyError) as err:
        fail(f"{prompts}: cannot build the detector from it: {err}")
    header = {"prompts": str(prompts), "prompts_sha256": learned.sha256, "category": category, "model": learned.model,
              "random_weights": bundle.random_weights, "memory": detector.memory is not None,
              "scoring": scoring.model_dump(), "resolution": size}  # fmt: skip
    stored = image_threshold_of(info)
    return torch_scorer(detector, size), bundle.image_size, header, stored, colour_range(info), thresholds_file


def _onnx_setup(model: Path, thresholds_file: Path | None, force: bool, device: str, resolution: int | None) -> Setup:
    """The exported model on onnxruntime; threshold and colour range from its sidecar, or from --thresholds-file
    when its scoring settings and resolution are those baked into the model."""
    try:
        sidecar = Sidecar.load(model)
        size, scoring = sidecar.resolution, sidecar.scoring
        if resolution is not None and resolution != size:
            _usage_error(f"--resolution {resolution}: {model} makes maps of {size} px (export again for another)")
        if thresholds_file is None:
            stored, low_high, thresholds_file = sidecar.image_threshold, sidecar.map_range, sidecar_path(model)
        else:
            info = load_thresholds(thresholds_file)
            for message in check_pairing(info, thresholds_file, sidecar.category, sidecar.prompts_sha256, force):
                warn(message)
            stored, low_high = image_threshold_of(info), colour_range(info)
            if (scoring_of(info), resolution_of(info)) != (scoring, size):
                raise ThresholdsFileError(
                    f"{thresholds_file}: made with other scoring settings or resolution than {model} bakes in "
                    f"({scoring.model_dump()}, {size} px); export again with this thresholds file"
                )
        scorer = OnnxScorer(model, device)
    except (DeployFileError, ThresholdsFileError) as err:
        fail(str(err))
    if sidecar.random_weights:
        warn(RANDOM_WEIGHTS_NOTE, "note")
    header = {
        "onnx_model": str(model),
        "prompts": sidecar.prompts,
        "prompts_sha256": sidecar.prompts_sha256,
        "category": sidecar.category,
        "model": sidecar.model,
        "random_weights": sidecar.random_weights,
        "memory": sidecar.memory,
        "scoring": scoring.model_dump(),
        "resolution": size,
    }
    return scorer, sidecar.input_size, header, stored, low_high, thresholds_file


def expand_images(args: list[str]) -> tuple[list[Path], list[str]]:
    """Arguments -> (image paths in order without duplicates, glob patterns that matched nothing).

    A folder gives its image files (mpad.data.is_image_file: known suffix, not hidden), sorted, not
    recursive; a glob its matching image files, sorted (`**` recursive); anything else is taken as a file path
    as is, even when it does not exist (it is then reported as failed when read).
    """
    paths: list[Path] = []
    unmatched: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if is_image_file(p))
        elif not path.exists() and _GLOB_CHARS & set(arg):
            found = sorted(Path(p) for p in glob.glob(arg, recursive=True) if is_image_file(Path(p)))
            if not found:
                unmatched.append(arg)
        else:
            found = [path]
        paths.extend(found)
    return list(dict.fromkeys(paths)), unmatched


def _images_or_exit(args: list[str]) -> list[Path]:
    """The image paths of `args`, a warning per glob that matched nothing; exit status 2 when there is none."""
    paths, missing_globs = expand_images(args)
    for pattern in missing_globs:
        warn(f"{pattern}: no image matches")
    if not paths:
        _usage_error(f"no image found in {' '.join(args)}")
    return paths


def _pick_threshold(
    threshold: float | None, stored: float | None, thresholds_file: Path | None
) -> tuple[float | None, str | None]:
    """(threshold, where it came from), announced on stdout; (None, None) with a warning when there is none."""
    if threshold is not None:
        used, source = float(threshold), "--threshold"
    elif stored is not None:
        used, source = stored, f"{thresholds_file} (image_threshold)"
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


def _report(rows: list[dict[str, Any]], out: Path) -> None:
    """One line of counts on stdout; exit status 1 when some image failed."""
    failed = sum(r["status"] != "ok" for r in rows)
    counts = {d: sum(r["decision"] == d for r in rows if r["status"] == "ok") for d in ("anomalous", "normal", "n/a")}
    shown = ", ".join(f"{n} {d}" for d, n in counts.items() if n)
    typer.echo(
        f"{len(rows)} images: {shown or 'none scored'}"
        + (f", {failed} failed" if failed else "")
        + f"; see {out / 'predictions.csv'}"
    )
    if failed:
        raise typer.Exit(code=1)
