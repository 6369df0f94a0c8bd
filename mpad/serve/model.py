"""The model a server serves: an `mpad export` file on onnxruntime, read and checked as `mpad predict
--backend onnx` reads it, and the per-image work around the model call, done as predict does it.

Identity: what the sidecar says the model is (category, backbone fingerprint, random_weights, the .onnx
file's SHA-256, and every other `*identity` / `*_sha256` field it records, such as the prompts' and the
thresholds'), returned with every answer so that a decision can be traced to the files that made it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpad.deploy import OnnxScorer, load_sidecar
from mpad.features import stack_images
from mpad.io import png_bytes
from mpad.prediction import Scorer, decide
from mpad.thresholds import colour_range
from mpad.visualize import render_map

IDENTITY_KEYS = ("category", "model", "random_weights", "sha256")


def identity_of(sidecar: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's identity fields (module docstring)."""
    return {
        key: value for key, value in sidecar.items() if key in IDENTITY_KEYS or key.endswith(("identity", "_sha256"))
    }


@dataclass(frozen=True)
class ServedModel:
    """An exported model, its sidecar and the decision threshold in use (None: decisions are "n/a")."""

    path: Path
    sidecar: dict[str, Any]
    scorer: Scorer
    threshold: float | None
    threshold_source: str | None

    @property
    def input_size(self) -> tuple[int, int]:
        height, width = self.sidecar["input_size"]
        return int(height), int(width)

    @property
    def colour_range(self) -> tuple[float, float]:
        low, high = self.sidecar["map_range"]
        return colour_range({"map_low": low, "map_high": high})

    @property
    def identity(self) -> dict[str, Any]:
        return identity_of(self.sidecar)

    def describe(self) -> dict[str, Any]:
        """GET /v1/model: the sidecar, the threshold in use and where it came from, the identity."""
        return {
            **self.sidecar,
            "onnx_model": str(self.path),
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "identity": self.identity,
        }

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """A decoded image (H, W, 3) uint8 -> the model's input (1, 3, H', W'), resized as predict resizes."""
        return stack_images([image], self.input_size)

    def answer(self, image: np.ndarray, amap: torch.Tensor, score: float, max_size: int | None) -> dict[str, Any]:
        """The JSON answer for one image: predict's row values (image_score, max_pixel_score, decision,
        threshold), the identity, and with a `max_size`, predict's overlay and map PNGs (base64) with the
        longer side capped at it."""
        out = {
            "image_score": score,
            "max_pixel_score": float(amap.max()),
            "decision": decide(score, self.threshold),
            "threshold": self.threshold,
            "model": self.identity,
        }
        if max_size is not None:
            overlay, gray = render_map(image, amap.float().numpy(), max_size, *self.colour_range)
            out["overlay_png"] = base64.b64encode(png_bytes(overlay)).decode("ascii")
            out["map_png"] = base64.b64encode(png_bytes(gray)).decode("ascii")
            out["map_size"] = list(gray.shape)
        return out


def load_model(
    path: str | Path, threshold: float | None = None, device: str = "cpu", threads: int | None = None
) -> ServedModel:
    """The exported model at `path` on onnxruntime, after load_sidecar's checks (mpad.deploy.DeployFileError
    naming the file otherwise). The threshold: `threshold` when given, else the sidecar's image_threshold."""
    path = Path(path)
    sidecar = load_sidecar(path)
    scorer = OnnxScorer(path, device, threads, spinning=False)  # idle threads would spin on the decoders' cores
    if threshold is not None:
        used, source = float(threshold), "--threshold"
    elif sidecar["image_threshold"] is not None:
        used, source = float(sidecar["image_threshold"]), "sidecar image_threshold"
    else:
        used, source = None, None
    return ServedModel(path, sidecar, scorer, used, source)
