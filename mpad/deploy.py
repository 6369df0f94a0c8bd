"""The exported detector at inference: its sidecar JSON and the ONNX Runtime scorer predict's onnx backend uses.

`mpad export` (mpad.export) writes `<name>.onnx` and `<name>.onnx.json`. The sidecar says what the model
was made from and how to feed it: the input size (H, W) the caller resizes to, the map resolution R, the
scoring settings baked into the graph, the threshold and colour range from evaluate's thresholds file, the
category, the backbone fingerprint, the SHA-256 of the .onnx file (a sidecar of another export is
refused) and those of the prompts and thresholds files it was made from (prompts_sha256, thresholds_sha256:
predict refuses a --thresholds-file measured for other prompts). This module imports neither open_clip
nor the model code: predict's onnx backend runs without them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpad.config import ConfigError, ScoringConfig
from mpad.io import check_format, read_json_object, sha256_file, write_json

FORMAT = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("maps", "scores")
REQUIRED = ("format", "category", "model", "input_size", "resolution", "scoring", "image_threshold", "map_range",
            "sha256")  # fmt: skip


class DeployFileError(ValueError):
    """An ONNX model or its sidecar that is missing, unreadable or inconsistent; the message names the file."""


def sidecar_path(model: str | Path) -> Path:
    """`x.onnx` -> `x.onnx.json`."""
    return Path(f"{model}.json")


def save_sidecar(model: str | Path, info: dict[str, Any]) -> Path:
    """Write `info` plus the format and the model file's SHA-256 beside `model`; returns the sidecar's path."""
    path = sidecar_path(model)
    write_json(path, {**info, "format": FORMAT, "sha256": sha256_file(model)})
    return path


def load_sidecar(model: str | Path) -> dict[str, Any]:
    """Read and check the sidecar of `model` (and that it describes this very file); DeployFileError otherwise."""
    model, path = Path(model), sidecar_path(model)
    if not model.is_file():
        raise DeployFileError(f"{model}: ONNX model not found (write one with `mpad export`)")
    with open(model, "rb") as f:
        if f.read(4) == b"PK\x03\x04":  # a zip: what torch.save writes, e.g. a prompts file
            raise DeployFileError(
                f"{model}: not an ONNX model but a torch file (a prompts file?): score it with --backend torch "
                f"--prompts {model}, or export it first with `mpad export --prompts {model} --out <name>.onnx`"
            )
    if not path.is_file():
        raise DeployFileError(f"{path}: the model's sidecar JSON is missing (`mpad export` writes both)")
    info = read_json_object(path, DeployFileError, "sidecar JSON")
    check_format(info, path, DeployFileError, "export sidecar", FORMAT, REQUIRED, "export again")
    if info["sha256"] != sha256_file(model):
        raise DeployFileError(f"{path}: describes another export than {model} (its SHA-256 differs); export again")
    threshold = info["image_threshold"]
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise DeployFileError(f"{path}: image_threshold {threshold!r} is not a finite number")
    try:
        scoring_from(info)
    except ConfigError as err:
        raise DeployFileError(f"{path}: bad scoring settings: {err}") from err
    return info


def scoring_from(info: dict[str, Any]) -> ScoringConfig:
    """The scoring settings baked into the exported graph."""
    return ScoringConfig.from_params(info["scoring"])


class OnnxScorer:
    """Scores image batches with an exported model on ONNX Runtime (the optional extra `export`).

    device: "cpu", "auto" (CUDA when onnxruntime has it, else CPU) or "cuda"/"cuda:N".
    threads: intra-op threads (None: onnxruntime's default, one per physical core).
    spinning: whether idle intra-op threads spin-wait for the next call (onnxruntime's default: the fastest
    alone, but spinning threads take the cores from the process's other threads, such as a server's decoding).
    """

    def __init__(
        self, model: str | Path, device: str = "cpu", threads: int | None = None, spinning: bool = True
    ) -> None:
        try:
            import onnxruntime as ort  # optional: `pip install -e '.[export]'`
        except ImportError as err:
            raise DeployFileError("the onnx backend needs onnxruntime: pip install -e '.[export]'") from err
        available = ort.get_available_providers()
        wants_gpu = device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available)
        if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
            raise DeployFileError(f"--device {device}: this onnxruntime has no CUDA provider ({', '.join(available)})")
        providers: list[Any] = ["CPUExecutionProvider"]
        if wants_gpu:
            index = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        try:
            options = ort.SessionOptions()
            if threads is not None:
                options.intra_op_num_threads = threads
            if not spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(str(model), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types for a bad file
            raise DeployFileError(f"{model}: onnxruntime cannot load it ({err})") from err

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) float in [0, 1] at the model's input size -> (maps (B, R, R), scores (B,)), CPU."""
        feed = {INPUT_NAME: np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)}
        maps, scores = self.session.run(list(OUTPUT_NAMES), feed)
        return torch.from_numpy(maps), torch.from_numpy(scores)
