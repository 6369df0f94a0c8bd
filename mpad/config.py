"""Typed, validated settings: one frozen dataclass per section of params.yaml, checked once, in one place.

`Section.from_params(values)` reads a section's mapping: a missing key takes the field's default (the
defaults are params.yaml's values; a test keeps the two equal), an unknown key or a bad value is a
`ConfigError` whose message has one line per problem, naming the key, the value and what is allowed.
Library functions take these objects, not dicts. Light module (numpy at most): no torch import (the stages that need no
model use it too).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from mpad.data.mvtec import MVTEC_CATEGORIES, MVTEC_TEXTURES

DATASETS = ("mvtec", "visa", "folder", "synthetic")
PRECISIONS = ("fp32", "fp16", "bf16")
ATTENTIONS = ("vv", "qk")
CLS_MODES = ("neighbor-cls", "neighbor")
MASK_METHODS = ("clip", "border")
REGIONS = ("object", "blobs")
TEXTURE_MASKS = ("mask_method", "whole")
IMAGE_SCORES = ("max", "topk_mean", "global")
FUSIONS = ("harmonic", "arithmetic")
CALIBRATIONS = ("projection", "literal", "literal-rms")
STOPS = ("fixed", "converged")

# MVTec AD's categories in the paper's Table 1 order: the textures, then the objects.
TABLE_ORDER = MVTEC_TEXTURES + tuple(c for c in MVTEC_CATEGORIES if c not in MVTEC_TEXTURES)
MVTEC_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/"
    "mvtec_anomaly_detection.tar.xz"
)
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
VISA_URL = "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar"
VISA_CATEGORIES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)
# What a null dataset.root / url / sha256 stands for, per dataset.name: (root, url, sha256), so that one
# `-S dataset.name=visa` (plus categories) switches datasets. VisA's sha256 is unknown to us: anomalib pins
# the tar with an MD5 only (ef908989b6dc701fc218f643c127a4de), so no sha256 is checked unless you set one.
DATASET_DEFAULTS: dict[str, tuple[str | None, str, str | None]] = {
    "mvtec": ("data/mvtec", MVTEC_URL, MVTEC_SHA256),
    "visa": ("data/visa", VISA_URL, None),
    "synthetic": ("data/synthetic", "", None),
    "folder": (None, "", None),  # the user's own tree: root must be given
}


class ConfigError(ValueError):
    """Bad settings; the message has one line per problem."""


_MISSING = object()


class _Reader:
    """Reads one section's keys, collecting one error line per bad value."""

    def __init__(self, section: str, values: Any) -> None:
        if not isinstance(values, Mapping):
            raise ConfigError(f"section '{section}' missing or not a mapping of keys (got {values!r})")
        self.section, self.values, self.errors = section, values, []

    def get(self, key: str, default: Any, check: Callable[[Any], bool], allowed: str) -> Any:
        value = self.values.get(key, _MISSING)
        if value is _MISSING:
            return default
        if not check(value):
            self.errors.append(f"{self.section}.{key} = {value!r}: {allowed}")
            return default
        return value

    def done(self, known: tuple[str, ...]) -> None:
        unknown = sorted(set(self.values) - set(known))
        if unknown:
            self.errors.append(
                f"{self.section}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(known)})"
            )
        if self.errors:
            raise ConfigError("\n".join(self.errors))


def _is_int(low: int | None = None) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)


def _is_number(low: float, high: float = math.inf, open_low: bool = False) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > low if open_low else v >= low) and v <= high

    return check


def _is_choice(choices: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in choices


def _is_names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v) and len(set(v)) == len(v)


# A category is a folder name, a DVC matrix key (stage `sample@<name>`), a quoted shell word in dvc.yaml's
# commands ('${item.category}') and part of output paths: letters, digits, _ . + - and single inner spaces.
_CATEGORY = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*( [A-Za-z0-9_.+-]+)*")


def _is_categories(v: Any) -> bool:
    return _is_names(v) and bool(v) and all(_CATEGORY.fullmatch(x) for x in v)


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_device(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    kind, _, index = v.partition(":")
    return v in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit())


INT = "must be an integer"
NAMES = "must be a list of distinct non-empty names"
CATEGORIES = (
    "must be a non-empty list of distinct names (letters, digits, _ . + -, single inner spaces); not null, which "
    f"DVC cannot expand: write the list (mvtec: [{', '.join(TABLE_ORDER)}]; visa: [{', '.join(VISA_CATEGORIES)}]; "
    "synthetic: [stripes, weave, disc]; folder: the category folders under dataset.root)"
)
Rule = tuple[Callable[[Any], bool], str]


def _int(low: int) -> Rule:
    return _is_int(low), f"{INT} >= {low}"


def _choice(choices: tuple[str, ...]) -> Rule:
    return _is_choice(choices), f"must be one of {', '.join(choices)}"


def _fraction() -> Rule:
    return _is_number(0, 1), "must be a number in [0, 1]"


def _non_negative() -> Rule:
    return _is_number(0), "must be a number >= 0"


S = TypeVar("S")


def _read(cls: type[S], section: str, values: Any, rules: dict[str, Rule]) -> S:
    """Build `cls` from `values` with one (check, allowed) rule per field; defaults from the dataclass."""
    reader = _Reader(section, values)
    defaults = cls()  # type: ignore[call-arg]
    params = [f for f in fields(cls) if f.name in rules]  # type: ignore[arg-type]
    kwargs = {
        f.name: reader.get(f.metadata.get("key", f.name), getattr(defaults, f.name), *rules[f.name]) for f in params
    }
    reader.done(tuple(f.metadata.get("key", f.name) for f in params))
    return cls(**kwargs)


@dataclass(frozen=True)
class DatasetConfig:
    """`dataset`: which data, where. categories: a non-empty list (DVC's matrix cannot iterate null);
    textures None = the dataset's default texture categories. root / url / sha256 None = the dataset's own
    (DATASET_DEFAULTS; sha256 only when url is also the dataset's own): they are resolved on construction."""

    name: str = "mvtec"
    root: str | None = None
    url: str | None = None
    sha256: str | None = None
    categories: list[str] = field(default_factory=lambda: list(TABLE_ORDER))
    textures: list[str] | None = field(default_factory=lambda: list(MVTEC_TEXTURES))
    seed: int = 0

    def __post_init__(self) -> None:
        root, url, sha256 = DATASET_DEFAULTS.get(self.name, (None, "", None))
        if self.url is None:
            object.__setattr__(self, "url", url)
            if self.sha256 is None:
                object.__setattr__(self, "sha256", sha256)
        if self.root is None:
            object.__setattr__(self, "root", root)

    @classmethod
    def from_params(cls, values: Any) -> DatasetConfig:
        if isinstance(values, Mapping):  # an absent key means null (the dataset's own), not mvtec's value
            values = {"root": None, "url": None, "sha256": None, **values}
        rules = {
            "name": _choice(DATASETS),
            "root": (lambda v: v is None or _is_text(v), "must be a folder path (or null: data/<name>)"),
            "url": (lambda v: v is None or isinstance(v, str), "must be a URL (or null: the official archive)"),
            "sha256": (
                lambda v: v is None or (isinstance(v, str) and len(v) == 64),
                "must be 64 hex digits or null",
            ),
            "categories": (_is_categories, CATEGORIES),
            "textures": (lambda v: v is None or _is_names(v), NAMES + " (or null: the dataset's default)"),
            "seed": _int(0),
        }
        config = _read(cls, "dataset", values, rules)
        if config.root is None:
            raise ConfigError(f"dataset.root = None: must be set to your folder for dataset.name = {config.name}")
        return config

    @property
    def path(self) -> Path:
        """Where the dataset is read (and fetched to): `root` by mpad.workspace.data_root, so that a queued
        experiment's temporary copy reads the original workspace's dataset instead of lacking it."""
        from mpad.workspace import data_root

        return data_root(self.root or "")


@dataclass(frozen=True)
class ShotsConfig:
    """`shots`: k normal training images per category, drawn with seed."""

    k: int = 1
    seed: int = 0

    @classmethod
    def from_params(cls, values: Any) -> ShotsConfig:
        return _read(cls, "shots", values, {"k": _int(1), "seed": _int(0)})


@dataclass(frozen=True)
class ModelConfig:
    """`model`: the open_clip backbone, its weights (tag | checkpoint path | none), device and precision."""

    name: str = "ViT-B-16-plus-240"
    pretrained: str = "laion400m_e32"
    device: str = "auto"
    precision: str = "fp32"

    @classmethod
    def from_params(cls, values: Any) -> ModelConfig:
        if isinstance(values, Mapping) and values.get("pretrained", "") is None:
            values = {**values, "pretrained": "none"}  # YAML null: random weights, like 'none'
        rules = {
            "name": (_is_text, "must be an open_clip architecture name or mpad-tiny"),
            "pretrained": (_is_text, "must be an open_clip tag, a checkpoint file path, or none"),
            "device": (_is_device, "must be auto, cpu, cuda or cuda:N"),
            "precision": _choice(PRECISIONS),
        }
        return _read(cls, "model", values, rules)


@dataclass(frozen=True)
class LaaConfig:
    """`laa` (eq. 11-12): attention of the second path, neighbour distance k (None: no mask), the number of
    last blocks with the second path, and the CLS treatment."""

    attention: str = "vv"
    k: float | None = 2
    layers: int = 6
    cls: str = "neighbor-cls"

    @classmethod
    def from_params(cls, values: Any) -> LaaConfig:
        rules = {
            "attention": _choice(ATTENTIONS),
            "k": (lambda v: v is None or _is_number(-math.inf)(v), "must be a number (<= 0 or null: no mask)"),
            "layers": _int(1),
            "cls": _choice(CLS_MODES),
        }
        config = _read(cls, "laa", values, rules)
        return config

    def as_dict(self) -> dict[str, Any]:
        """What is stored with learned prompts."""
        return {"attention": self.attention, "k": self.k, "layers": self.layers, "cls": self.cls}


@dataclass(frozen=True)
class PromptsConfig:
    """`prompts` (eq. 1): learnable token counts of the shared prefix and the normal / anomaly suffixes."""

    n_general: int = 4
    n_normal: int = 2
    n_anomaly: int = 2

    @classmethod
    def from_params(cls, values: Any) -> PromptsConfig:
        return _read(cls, "prompts", values, {"n_general": _int(0), "n_normal": _int(1), "n_anomaly": _int(1)})

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.n_general, self.n_normal, self.n_anomaly)


@dataclass(frozen=True)
class OagmConfig:
    """`oagm` (sec. 3.4): synthesized anomalies."""

    enabled: bool = True
    region: str = "blobs"
    samples: int = 32
    sigma: float = 0.25
    clean_fraction: float = 0.2
    mask_method: str = "clip"
    texture_mask: str = "mask_method"
    mask_threshold: float = 0.5
    mask_layers: int = 6
    seed: int = 0

    @classmethod
    def from_params(cls, values: Any) -> OagmConfig:
        rules = {
            "enabled": (_is_bool, "must be true or false"),
            "region": _choice(REGIONS),
            "samples": _int(1),
            "sigma": _non_negative(),
            "clean_fraction": _fraction(),
            "mask_method": _choice(MASK_METHODS),
            "texture_mask": _choice(TEXTURE_MASKS),
            "mask_threshold": _fraction(),
            "mask_layers": _int(1),
            "seed": _int(0),
        }
        return _read(cls, "oagm", values, rules)


@dataclass(frozen=True)
class ScoringConfig:
    """`scoring`: map smoothing (pixels at evaluate.resolution; 0 = off) and the image score."""

    smoothing_sigma: float = 4.0
    image_score: str = "max"
    topk: float = 0.01

    @classmethod
    def from_params(cls, values: Any) -> ScoringConfig:
        rules = {
            "smoothing_sigma": _non_negative(),
            "image_score": _choice(IMAGE_SCORES),
            "topk": (_is_number(0, 1, open_low=True), "must be a fraction in (0, 1]"),
        }
        return _read(cls, "scoring", values, rules)


@dataclass(frozen=True)
class EvaluateConfig:
    """`evaluate`: map resolution, batch size, DataLoader workers, overlay count."""

    resolution: int = 256
    batch_size: int = 16
    workers: int = 2
    overlays: int = 6

    @classmethod
    def from_params(cls, values: Any) -> EvaluateConfig:
        rules = {"resolution": _int(8), "batch_size": _int(1), "workers": _int(0), "overlays": _int(0)}
        return _read(cls, "evaluate", values, rules)


@dataclass(frozen=True)
class MemoryConfig:
    """`memory`: the few-shot visual memory branch (beyond the paper)."""

    enabled: bool = False
    layers: list[int] = field(default_factory=lambda: [6, 9, 12])
    fusion: str = "harmonic"

    @classmethod
    def from_params(cls, values: Any) -> MemoryConfig:
        rules = {
            "enabled": (_is_bool, "must be true or false"),
            "layers": (
                lambda v: isinstance(v, list) and bool(v) and all(_is_int(1)(x) for x in v),
                "must be a non-empty list of block numbers >= 1",
            ),
            "fusion": _choice(FUSIONS),
        }
        return _read(cls, "memory", values, rules)


@dataclass(frozen=True)
class MptsConfig:
    """`mpts` (sec. 3.3): the MPTS loop.

    lam: guiding level lambda of eq. 10 (params key `lambda`; 0: plain BCE training).
    calibration: "projection", "literal" or "literal-rms", see `mpad.mpts.calibrate`.
    meta_epochs: number of rounds (0: no learning at all; the result is the initial meta prompt, i.e.
        the hand-written template ensemble: the paper's "human-semantic prompt" baseline of Table 1);
        steps: Adam steps per round (with stop "converged", the most a round takes); lr: Adam learning rate.
    stop: "fixed" (every round takes `steps`) or "converged": a round also ends once the smoothed anomaly loss
        has stopped improving: the mean of its last `window` steps is at most `tolerance` (relative) below
        the mean of the `window` before (`mpad.mpts.converged`).
    batch_size: images per minibatch, drawn without replacement (reshuffled when exhausted) from a
        torch.Generator seeded by `seed`.
    divergence: not a params key. False skips the divergence loss and its gradient altogether (plain BCE
        training; the prompts are then bit-identical to a run with lam = 0).
    """

    lam: float = field(default=1.0, metadata={"key": "lambda"})
    calibration: str = "projection"
    meta_epochs: int = 3
    steps: int = 100
    lr: float = 0.002
    stop: str = "fixed"
    tolerance: float = 0.01
    window: int = 10
    batch_size: int = 16
    seed: int = 0
    divergence: bool = True

    def __post_init__(self) -> None:  # guards for library callers; params are checked by from_params
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"mpts.calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if self.meta_epochs < 0 or self.steps < 1 or self.batch_size < 1 or self.window < 1:
            raise ValueError("mpts.meta_epochs must be >= 0, mpts.steps, mpts.batch_size and mpts.window >= 1")
        if self.stop not in STOPS:
            raise ValueError(f"mpts.stop must be one of {STOPS}, got {self.stop!r}")
        if not self.lam >= 0:
            raise ValueError(f"mpts.lambda must be >= 0, got {self.lam}")

    @classmethod
    def from_params(cls, values: Any) -> MptsConfig:
        rules = {
            "lam": _non_negative(),
            "calibration": _choice(CALIBRATIONS),
            "meta_epochs": _int(0),
            "steps": _int(1),
            "lr": (_is_number(0, open_low=True), "must be a number > 0"),
            "stop": _choice(STOPS),
            "tolerance": _fraction(),
            "window": _int(1),
            "batch_size": _int(1),
            "seed": _int(0),
        }
        return _read(cls, "mpts", values, rules)


SECTIONS: dict[str, Any] = {
    "dataset": DatasetConfig,
    "shots": ShotsConfig,
    "model": ModelConfig,
    "laa": LaaConfig,
    "prompts": PromptsConfig,
    "oagm": OagmConfig,
    "mpts": MptsConfig,
    "scoring": ScoringConfig,
    "evaluate": EvaluateConfig,
    "memory": MemoryConfig,
}
