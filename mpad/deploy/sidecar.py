"""The sidecar `<name>.onnx.json` of an exported model, and its one owner `Sidecar`.

It says what the model was made from and how to feed it: the input size (H, W) the caller resizes to, the
mean / std the graph normalises with, the map resolution R, the scoring settings baked into the graph, the
threshold and colour range from evaluate's thresholds file, the category, the backbone identity, and the
SHA-256 of the .onnx file (a sidecar of another export is refused) and of the prompts and thresholds files
it was made from (`prompts_sha256`, `thresholds_sha256`: predict refuses a --thresholds-file measured for
other prompts). JSON, sorted keys (stable bytes), format 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mpad.config import ConfigError, ScoringConfig
from mpad.io import check_format, read_json_object, sha256_file, write_json

FORMAT = 1
_REQUIRED = ("category", "model", "input_size", "resolution", "scoring", "image_threshold", "map_range", "sha256")
_IDENTITY = ("category", "model", "random_weights", "sha256", "prompts_sha256", "thresholds_sha256")


class DeployFileError(ValueError):
    """An ONNX model or its sidecar that is missing, unreadable or inconsistent; the message names the file."""


def sidecar_path(model: str | Path) -> Path:
    """`x.onnx` -> `x.onnx.json`."""
    return Path(f"{model}.json")


@dataclass(frozen=True)
class Sidecar:
    """What an exported model is. input_size: (H, W); mean, std: per channel; map_range: (low, high) colour
    range of the maps; image_threshold: the F1-max threshold, None when the test split defined none;
    sha256: the .onnx file's (set by `save`); prompts / thresholds_file: where they were read (information)."""

    category: str
    model: dict[str, Any]
    input_size: tuple[int, int]
    resolution: int
    scoring: ScoringConfig
    image_threshold: float | None
    map_range: tuple[float, float]
    random_weights: bool = False
    memory: bool = False
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    opset: int | None = None
    prompts: str | None = None
    prompts_sha256: str | None = None
    thresholds_file: str | None = None
    thresholds_sha256: str | None = None
    sha256: str | None = field(default=None, compare=False)

    def save(self, model: str | Path) -> Path:
        """Write beside `model` (with its SHA-256, and what the model's input and outputs are, in words);
        returns the sidecar's path."""
        height, width = self.input_size
        record = {
            **self.as_json(),
            "format": FORMAT,
            "sha256": sha256_file(model),
            "input": f"images (N, 3, {height}, {width}) float32 RGB in [0, 1], the whole image resized (bicubic, "
            "antialiased); the model clamps and normalises",
            "outputs": f"maps (N, {self.resolution}, {self.resolution}) anomaly maps in [0, 1]; scores (N,) image "
            "scores",
        }
        path = sidecar_path(model)
        write_json(path, record)
        return path

    @classmethod
    def load(cls, model: str | Path) -> Sidecar:
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
        check_format(info, path, DeployFileError, "export sidecar", FORMAT, _REQUIRED, "export again")
        if info["sha256"] != sha256_file(model):
            raise DeployFileError(f"{path}: describes another export than {model} (its SHA-256 differs); export again")
        threshold = info["image_threshold"]
        if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise DeployFileError(f"{path}: image_threshold {threshold!r} is not a finite number")
        try:
            scoring = ScoringConfig.from_params(info["scoring"])
        except ConfigError as err:
            raise DeployFileError(f"{path}: bad scoring settings: {err}") from err
        known = {f for f in cls.__dataclass_fields__} - {"scoring"}
        values = {key: value for key, value in info.items() if key in known}
        for key in ("input_size", "map_range", "mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values, scoring=scoring)

    def as_json(self) -> dict[str, Any]:
        """The record as JSON values (what GET /v1/model of `mpad serve` shows)."""
        record = asdict(self)
        record["scoring"] = self.scoring.model_dump()
        return {key: list(value) if isinstance(value, tuple) else value for key, value in record.items()}

    def identity(self) -> dict[str, Any]:
        """What the model is, to trace a decision to the files that made it: category, backbone, whether its
        weights were random, and the SHA-256 of the .onnx, prompts and thresholds files."""
        record = self.as_json()
        return {key: record[key] for key in _IDENTITY}
