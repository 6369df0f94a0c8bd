"""The thresholds file `data/thresholds/<category>.json` (mpad.layout.thresholds_file): what `evaluate` learned
about a category that `predict` decides and draws with.

A record is a JSON object: the category it was measured on, the identity of the prompts file it was
measured with (prompts_sha256: the SHA-256 of its bytes), the scoring settings the maps were made with
(smoothing_sigma, image_score, topk), their resolution R, the F1-max thresholds image_threshold /
pixel_threshold (with image_f1_max / pixel_f1_max; each absent when the test split cannot define it) and
the map colour range map_low..map_high (the 1st..99.9th percentile of the test maps). A threshold lies
midway between two neighbouring test scores (mpad.metrics.f1_max_threshold), never on a score, so float
noise between backends cannot flip the decision on the image that defined it.

`pair_thresholds` finds the thresholds file of a prompts file and refuses one measured on another category
or for other prompts (unless forced): the one lookup `mpad predict` and `mpad export` share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpad import layout
from mpad.config import ConfigError, EvaluateConfig, ScoringConfig
from mpad.io import read_json_object, write_json
from mpad.metrics import f1_max_threshold
from mpad.prompt_file import PromptsFile

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


def thresholds_record(
    result: CategoryResult, scoring: ScoringConfig, category: str, prompts_sha256: str
) -> dict[str, Any]:
    """The record of `category`'s `result` (maps (N, R, R) made with `scoring` by the prompts file whose
    SHA-256 is `prompts_sha256`): F1-max thresholds, range, settings."""
    record: dict[str, Any] = {
        "category": category,
        "prompts_sha256": prompts_sha256,
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
    for key in ("category", "prompts_sha256"):
        if key in record and not isinstance(record[key], str):
            problems.append(f"{key} = {record[key]!r}: must be a string")
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


def image_threshold_of(record: dict[str, Any]) -> float | None:
    """The F1-max image threshold of a record; None when it has none (the test split defined none)."""
    value = record.get("image_threshold")
    return None if value is None else float(value)


def colour_range(record: dict[str, Any]) -> tuple[float, float]:
    """(map_low, map_high) of a record; (0, 1) when it has none or an empty range."""
    low, high = float(record.get("map_low", 0.0)), float(record.get("map_high", 1.0))
    return (low, high) if high > low else (0.0, 1.0)


@dataclass(frozen=True)
class Pairing:
    """The thresholds file paired with a prompts file: its path (None: there is none), its record ({} without
    one) and the one-line warnings for the user (no file found, pairing unchecked, --force used)."""

    path: Path | None
    info: dict[str, Any]
    warnings: tuple[str, ...]


def pair_thresholds(
    prompts: Path, category: str, prompts_sha256: str | None, thresholds_file: Path | None, force: bool
) -> Pairing:
    """The thresholds file for the prompts file `prompts` (of `category`, SHA-256 `prompts_sha256`): the given
    one, else evaluate's beside the prompts (<p>/prompts/<c>.pt -> <p>/thresholds/<c>.json: the project
    layout, found from any working directory), else data/thresholds/<c>.json of the working directory.
    ThresholdsFileError when it is unreadable, or measured on another category or for other prompts and not
    `force` (see `check_pairing`)."""
    warnings: list[str] = []
    if thresholds_file is None:
        looked = list(dict.fromkeys([prompts.parent.parent / "thresholds" / f"{category}.json",
                                     layout.thresholds_file(category)]))  # fmt: skip
        thresholds_file = next((path for path in looked if category and path.is_file()), None)
        if thresholds_file is None:
            default = scoring_of({})
            warnings.append(
                f"no thresholds file of {category or 'this category'} ({' or '.join(map(str, looked))}): scoring "
                f"with the defaults smoothing_sigma {default.smoothing_sigma:g}, image_score {default.image_score}, "
                f"{resolution_of({})} px, not necessarily those the prompts were evaluated with; pass --thresholds-file"
            )
            return Pairing(None, {}, tuple(warnings))
    info = load_thresholds(thresholds_file)
    warnings += check_pairing(info, thresholds_file, category, prompts_sha256, force)
    return Pairing(thresholds_file, info, tuple(warnings))


def load_paired(path: Path, thresholds_file: Path | None, force: bool) -> tuple[PromptsFile, Pairing]:
    """The prompts file at `path` and its thresholds pairing (`pair_thresholds`); PromptFileError /
    ThresholdsFileError when either is unusable."""
    prompts = PromptsFile.load(path)
    return prompts, pair_thresholds(path, prompts.category, prompts.sha256, thresholds_file, force)


def check_pairing(
    info: dict[str, Any], path: Path, category: str, prompts_sha256: str | None, force: bool
) -> list[str]:
    """Refuse (ThresholdsFileError) a thresholds record measured on another category than `category`, or for
    another prompts file than the one of SHA-256 `prompts_sha256`, unless `force`. Returns warnings: what
    cannot be checked (a record, or an export, older than that field) and what `force` let through."""
    warnings: list[str] = []
    measured_sha, given_sha = str(info.get("prompts_sha256"))[:12], str(prompts_sha256)[:12]
    checks = (
        ("category", category, f"thresholds of category {info.get('category')!r}, but the prompts are for "
                               f"{category!r}"),
        ("prompts_sha256", prompts_sha256, f"thresholds measured for other prompts (sha256 {measured_sha}...) than "
                                           f"these (sha256 {given_sha}...)"),
    )  # fmt: skip
    for key, want, differ in checks:
        measured = info.get(key)
        if measured is None:
            warnings.append(f"{path} records no {key}: cannot check that it belongs to these prompts "
                            f"(written before mpad recorded it; evaluate again to pair them)")  # fmt: skip
        elif want is None:
            warnings.append(f"cannot check that {path} belongs to these prompts: their {key} is unknown")
        elif measured != want and not force:
            raise ThresholdsFileError(
                f"{path}: {differ}; pass the thresholds file `mpad evaluate` wrote for them, or --force to use "
                f"this one anyway"
            )
        elif measured != want:
            warnings.append(f"--force: using {path}: {differ}")
    return warnings


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
