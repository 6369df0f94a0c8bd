"""Command `export`: the learned detector as one ONNX model plus a sidecar JSON, for deployment.

    mpad export --prompts data/prompts/<category>.pt --out <file>.onnx
                [--thresholds-file data/thresholds/<category>.json] [--force] [--model-pretrained PATH]

Bakes into the graph (mpad.deploy.graph) the backbone's weights, the LAA settings, the text embeddings, the visual
memory if the prompts have one, the normalisation (mean / std) and the scoring settings and map resolution
of the thresholds file, found as `mpad predict` finds it (beside the prompts file, else data/thresholds/).
Writes <file>.onnx and <file>.onnx.json (input size, resolution, scoring, image_threshold and colour range,
category, backbone identity, the SHA-256 of the model, of the prompts file and of the thresholds file),
then checks the model on onnxruntime against torch.

Model input: images (N, 3, H, W) float32 in [0, 1], RGB, resized as a whole (no crop) to the sidecar's
input_size (mpad.features.stack_images: bicubic, antialiased); the graph clamps and normalises.
Outputs: maps (N, R, R) in [0, 1], scores (N,). Run it with `mpad predict --backend onnx --model <file>.onnx`.

Exit status: 0 written; 1 the prompts, thresholds or model cannot be used or exported (the reason is said).
"""

from __future__ import annotations

from pathlib import Path

import typer

from mpad.clip import ModelLoadError
from mpad.deploy.graph import OPSET, ExportError, export_onnx
from mpad.deploy.sidecar import DeployFileError, Sidecar
from mpad.detector import Detector
from mpad.io import require_space, sha256_file
from mpad.prediction import load_backbone
from mpad.prompt_file import PromptFileError
from mpad.thresholds import (
    ThresholdsFileError,
    colour_range,
    image_threshold_of,
    load_paired,
    resolution_of,
    scoring_of,
)
from stages.common import fail, warn


def main(
    prompts: Path = typer.Option(..., "--prompts", help="Prompts file written by `mpad train`."),
    out: Path = typer.Option(..., "--out", help="The .onnx file to write (its sidecar: <out>.json)."),
    thresholds_file: Path | None = typer.Option(
        None, "--thresholds-file", help="From `mpad evaluate`; default: the category's, beside the prompts or in data/."
    ),
    force: bool = typer.Option(
        False, "--force", help="Use a --thresholds-file measured on another category or for other prompts."
    ),
    model_pretrained: str | None = typer.Option(
        None, "--model-pretrained", help="Weights to load instead of the stored ones (e.g. a moved checkpoint file)."
    ),
) -> None:
    """Export the learned detector (prompts, memory, scoring) as one ONNX model and its sidecar JSON."""
    if out.suffix != ".onnx":
        fail(f"--out {out}: name the model file <name>.onnx")
    try:
        learned, pairing = load_paired(prompts, thresholds_file, force)
        for message in pairing.warnings:
            warn(message)
        info, thresholds_file, category = pairing.info, pairing.path, learned.category
        scoring, resolution = scoring_of(info), resolution_of(info)
        bundle = load_backbone(learned, prompts, "cpu", "fp32", weights=model_pretrained)
        detector = Detector.from_prompts(bundle, learned, scoring)
        # The graph holds the vision tower's weights (hundreds of MB for a ViT-B): refuse before tracing it;
        # stages.common.disk_errors prints NoSpaceError's line.
        weights = getattr(bundle.model, "visual", bundle.model).state_dict().values()
        require_space(out, sum(t.numel() * t.element_size() for t in weights), "the vision tower's weights")
        diff = export_onnx(detector, resolution, out)
    except (PromptFileError, ModelLoadError, ThresholdsFileError, DeployFileError) as err:
        fail(str(err))
    except (ExportError, ValueError, KeyError) as err:
        fail(f"{prompts}: cannot export it: {err}")
    sidecar = Sidecar(
        category=category, model=learned.model, random_weights=bundle.random_weights, prompts=str(prompts),
        prompts_sha256=learned.sha256, thresholds_file=None if thresholds_file is None else str(thresholds_file),
        thresholds_sha256=None if thresholds_file is None else sha256_file(thresholds_file),
        input_size=bundle.image_size, mean=tuple(bundle.mean), std=tuple(bundle.std), resolution=resolution,
        scoring=scoring, memory=detector.memory is not None, image_threshold=image_threshold_of(info),
        map_range=colour_range(info), opset=OPSET,
    ).save(out)  # fmt: skip
    size_mb = out.stat().st_size / 2**20
    typer.echo(
        f"wrote {out} ({size_mb:.1f} MiB, opset {OPSET}) and {sidecar}; onnxruntime matches torch within "
        f"{diff:.1g} on random images"
    )
