"""The thresholds file `data/thresholds/<category>.json` (mpad.layout.thresholds_file): what `evaluate` learned
about a category that `predict` decides and draws with.

A record is a JSON object: the category it was measured on, the scoring settings the maps were made with
(smoothing_sigma, image_score, topk), their resolution R, the F1-max thresholds image_threshold /
pixel_threshold (with image_f1_max / pixel_f1_max; each absent when the test split cannot define it) and
the map colour range map_low..map_high (the 1st..99.9th percentile of the test maps).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpad.config import ConfigError, EvaluateConfig, ScoringConfig
from mpad.io import read_json_object, write_json
from mpad.metrics import f1_max_threshold

if TYPE_CHECKING:  # mpad.evaluation pulls in the model code; reading a record needs none of it
    from mpad.evaluation import CategoryResult

SCORING_KEYS = ("smoothing_sigma", "image_score", "topk")
_OPTIONAL = ("image_threshold", "pixel_threshold", "image_f1_max", "pixel_f1_max")  # null: undefined
_RANGE = ("map_low", "map_high")


class ThresholdsFileError(ValueError):
    """A thresholds file that is missing, unreadable or holds bad values; the message names the file."""


def map_range(maps: torch.Tensor) -> tuple[float, float]:
    """(1st, 99.9th) percentile of the values of `maps` (any shape), from a subsample of at most ~1M values."""
    flat = maps.flatten()
    sample = flat[:: max(1, flat.numel() // 1_000_000)]  # torch.quantile refuses inputs above 2**24 values
    low, high = torch.quantile(sample, torch.tensor([0.01, 0.999]))
    return float(low), float(high)


def thresholds_record(result: CategoryResult, scoring: ScoringConfig, category: str) -> dict[str, Any]:
    """The record of `category`'s `result` (maps (N, R, R) made with `scoring`): F1-max thresholds, range,
    settings."""
    record: dict[str, Any] = {
        "category": category,
        "image_score": scoring.image_score,
        "smoothing_sigma": scoring.smoothing_sigma,
        "topk": scoring.topk,
        "resolution": int(result.maps.shape[-1]),
    }
    if 0 < int(result.labels.sum()) < len(result.labels):
        record["image_f1_max"], record["image_threshold"] = f1_max_threshold(result.scores, result.labels)
    if result.masks.any():
        record["pixel_f1_max"], record["pixel_threshold"] = f1_max_threshold(result.maps, result.masks)
    record["map_low"], record["map_high"] = map_range(result.maps)
    return record


def save_thresholds(path: str | Path, record: dict[str, Any]) -> None:
    """Write `record` atomically as sorted, indented JSON (stable bytes for DVC)."""
    write_json(path, record)


def load_thresholds(path: str | Path) -> dict[str, Any]:
    """Read and check a thresholds file; any problem is a ThresholdsFileError naming `path`."""
    path = Path(path)
    if not path.is_file():
        raise ThresholdsFileError(f"{path}: thresholds file not found (run `mpad evaluate` or omit --thresholds-file)")
    record = read_json_object(path, ThresholdsFileError, "thresholds JSON file")
    problems = [
        f"{key} = {record[key]!r}: must be a finite number"
        for key in _OPTIONAL + _RANGE
        if key in record and not (_is_finite(record[key]) or (key in _OPTIONAL and record[key] is None))
    ]
    if "category" in record and not isinstance(record["category"], str):
        problems.append(f"category = {record['category']!r}: must be a string")
    if "resolution" in record and not (isinstance(record["resolution"], int) and record["resolution"] >= 8):
        problems.append(f"resolution = {record['resolution']!r}: must be an integer >= 8")
    try:
        scoring_of(record)
    except ConfigError as err:
        problems += str(err).splitlines()
    if problems:
        raise ThresholdsFileError(f"{path}: bad thresholds file: " + "; ".join(problems))
    return record


def scoring_of(record: dict[str, Any]) -> ScoringConfig:
    """The scoring settings of a record; a setting it lacks takes ScoringConfig's default (= params.yaml)."""
    return ScoringConfig.from_params({key: record[key] for key in SCORING_KEYS if key in record})


def resolution_of(record: dict[str, Any]) -> int:
    """The map resolution R of a record, else EvaluateConfig's default."""
    return int(record.get("resolution", EvaluateConfig().resolution))


def colour_range(record: dict[str, Any]) -> tuple[float, float]:
    """(map_low, map_high) of a record; (0, 1) when it has none or an empty range."""
    low, high = float(record.get("map_low", 0.0)), float(record.get("map_high", 1.0))
    return (low, high) if high > low else (0.0, 1.0)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
