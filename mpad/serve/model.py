"""The model a server serves: an `mpad export` file on onnxruntime, read and checked as `mpad predict
--backend onnx` reads it, and the per-image work around the model call, done as predict does it.

Identity: what the sidecar says the model is (`Sidecar.identity`: category, backbone, random_weights, the
SHA-256 of the .onnx file and of the prompts and thresholds files it was made from), returned with every
answer so that a decision can be traced to the files that made it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpad.deploy.runtime import OnnxScorer
from mpad.deploy.sidecar import Sidecar
from mpad.io import png_bytes
from mpad.prediction import Scorer, decide
from mpad.visualize import render_map


@dataclass(frozen=True)
class ServedModel:
    """An exported model, its sidecar and the decision threshold in use (None: decisions are "n/a")."""

    path: Path
    sidecar: Sidecar
    scorer: Scorer
    threshold: float | None
    threshold_source: str | None

    @property
    def input_size(self) -> tuple[int, int]:
        return self.sidecar.input_size

    @property
    def colour_range(self) -> tuple[float, float]:
        return self.sidecar.map_range

    @cached_property
    def identity(self) -> dict[str, Any]:
        """`Sidecar.identity`, made once: it goes with every answer, and building it copies the whole sidecar."""
        return self.sidecar.identity()

    def describe(self) -> dict[str, Any]:
        """GET /v1/model: the sidecar, the threshold in use and where it came from, the identity. Files by their
        names only: the server's folders are none of a client's business."""
        record = self.sidecar.as_json()
        for key in ("prompts", "thresholds_file"):
            if record.get(key):
                record[key] = Path(record[key]).name
        return {
            **record,
            "onnx_model": self.path.name,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "identity": self.identity,
        }

    def answer(self, picture: np.ndarray | None, amap: torch.Tensor, score: float, max_size: int) -> dict[str, Any]:
        """The JSON answer for one image: predict's row values (image_score, max_pixel_score, decision,
        threshold), the identity, and with a `picture` (the image already at its overlay's size:
        mpad.serve.images.Decoded), predict's overlay and map PNGs (base64) with the longer side capped at
        `max_size`."""
        out = {
            "image_score": score,
            "max_pixel_score": float(amap.max()),
            "decision": decide(score, self.threshold),
            "threshold": self.threshold,
            "model": self.identity,
        }
        if picture is not None:
            overlay, gray = render_map(picture, amap.float().numpy(), max_size, *self.colour_range)
            out["overlay_png"] = base64.b64encode(png_bytes(overlay)).decode("ascii")
            out["map_png"] = base64.b64encode(png_bytes(gray)).decode("ascii")
            out["map_size"] = list(gray.shape)
        return out


def load_model(
    path: str | Path, threshold: float | None = None, device: str = "cpu", threads: int | None = None
) -> ServedModel:
    """The exported model at `path` on onnxruntime, after Sidecar.load's checks (mpad.deploy.sidecar.DeployFileError
    naming the file otherwise). The threshold: `threshold` when given, else the sidecar's image_threshold."""
    path = Path(path)
    sidecar = Sidecar.load(path)
    scorer = OnnxScorer(path, device, threads, spinning=False)  # idle threads would spin on the decoders' cores
    if threshold is not None:
        used, source = float(threshold), "--threshold"
    elif sidecar.image_threshold is not None:
        used, source = sidecar.image_threshold, "sidecar image_threshold"
    else:
        used, source = None, None
    return ServedModel(path, sidecar, scorer, used, source)
