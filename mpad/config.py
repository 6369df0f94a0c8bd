"""Typed, validated settings: one frozen pydantic model per section of params.yaml, checked once, in one place.

`Section.from_params(values)` reads a section's mapping: a missing key takes the field's default (params.yaml's
values; a test keeps the two equal), an unknown key or a bad value is a `ConfigError` with one line per problem,
naming the key, the value and what is allowed (a bad entry of a list by its index). Types are strict: no string
read as a number, no boolean as an integer or a number, no NaN or infinity. `load_sections` validates several
sections, every problem said; the file's parsing and its JSON Schema are in mpad/params_file.py. Library
functions take these objects, not dicts. Light module (pydantic, no torch): the stages that need no model use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from mpad.data.catalog import CATALOG, DATASETS, TABLE_ORDER, VISA_CATEGORIES

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
RANDOM_WEIGHTS_NOTE = (
    "RANDOM WEIGHTS (model.pretrained = none): these numbers exercise the pipeline and say nothing about the "
    "method's real quality"
)


class ConfigError(ValueError):
    """Bad settings; the message has one line per problem."""


def is_random(pretrained: str | None) -> bool:
    """True for the spellings of 'no weights' (model.pretrained)."""
    return pretrained is None or str(pretrained).strip().lower() in ("", "none", "null", "random")


def _one_of(choices: tuple[str, ...]) -> str:
    return f"must be one of {', '.join(choices)}"


def knob(default: Any, allowed: str, entry: str | None = None, **constraints: Any) -> Any:
    """A params key: its default (= params.yaml's value), what a bad value is told (`allowed`; `entry`: what a
    bad entry of a list is told, when it differs) and its pydantic constraints (ge, gt, le, alias...)."""
    told = {"allowed": allowed} | ({"entry": entry} if entry else {})
    return Field(default, json_schema_extra=told, **constraints)


# A category is a folder name, a DVC matrix key (stage `sample@<name>`), a quoted shell word in dvc.yaml's
# commands ('${item.category}') and part of output paths: letters, digits, _ . + - and single inner spaces.
_CATEGORY = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*( [A-Za-z0-9_.+-]+)*")
CATEGORY = (
    "must be a name of ASCII letters, digits, _ . + - and single inner spaces (a folder name, a DVC stage name and "
    "a quoted shell word in dvc.yaml)"
)
NAMES = "must be a list of distinct non-empty names"
CATEGORIES = (
    "must be a non-empty list of distinct names (letters, digits, _ . + -, single inner spaces); not null, which "
    f"DVC cannot expand: write the list (mvtec: [{', '.join(TABLE_ORDER)}]; visa: [{', '.join(VISA_CATEGORIES)}]; "
    "synthetic: [stripes, weave, disc]; folder: the category folders under dataset.root)"
)


def _distinct(names: list[Any]) -> list[Any]:
    if len(set(names)) != len(names):
        raise ValueError("repeated names")  # the field's `allowed` text is what the user reads
    return names


Distinct = AfterValidator(_distinct)
UNIQUE = Field(json_schema_extra={"uniqueItems": True})
Text = Annotated[str, Field(pattern=r"\S")]  # not empty, not only blanks
Names = Annotated[list[Text], UNIQUE, Distinct]
Category = Annotated[str, Field(pattern=f"^{_CATEGORY.pattern}$")]
Categories = Annotated[list[Category], Field(min_length=1), UNIQUE, Distinct]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")]
Blocks = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]


class Section(BaseModel):
    """A section of params.yaml (SECTION: its name)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)
    SECTION: ClassVar[str]
    NOT_PARAMS: ClassVar[tuple[str, ...]] = ()  # fields for library callers only, never read from params.yaml

    @classmethod
    def from_params(cls, values: Any) -> Any:
        """The section's settings from its params.yaml mapping; ConfigError (one line per problem) otherwise."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"section '{cls.SECTION}' missing or not a mapping of keys (got {values!r})")
        known = cls.params_keys()
        unknown = sorted(str(key) for key in values if key not in known)
        lines = [f"{cls.SECTION}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})"] if unknown else []
        try:
            config = cls.model_validate({key: value for key, value in values.items() if key in known})
        except ValidationError as err:
            lines = _problems(cls, values, err) + lines
        if lines:
            raise ConfigError("\n".join(lines))
        return config

    @classmethod
    def params_keys(cls) -> tuple[str, ...]:
        """The keys params.yaml may hold, in order."""
        return tuple(f.alias or name for name, f in cls.model_fields.items() if name not in cls.NOT_PARAMS)


def _problems(cls: type[Section], values: Mapping[str, Any], err: ValidationError) -> list[str]:
    """One line per key that failed, or per bad entry of a list (named by its index): a union type fails once
    per member, said once."""
    lines: dict[str, str] = {}
    fields = {f.alias or name: f for name, f in cls.model_fields.items()}
    entries = {str(e["loc"][0]) for e in err.errors() if e["loc"] and _index(e["loc"]) is not None}
    for error in err.errors():
        key = str(error["loc"][0]) if error["loc"] else ""
        if key not in fields:  # a whole-model check: its message is the line
            lines.setdefault(key, f"{cls.SECTION}.{error['msg'].removeprefix('Value error, ')}")
            continue
        extra = fields[key].json_schema_extra
        told = extra if isinstance(extra, dict) else {}
        index = _index(error["loc"])
        if index is not None:  # one entry of a list: name it, so that a long list's culprit is found
            label = f"{key}[{index}]"
            lines.setdefault(
                label, f"{cls.SECTION}.{label} = {values[key][index]!r}: {told.get('entry', told.get('allowed'))}"
            )
        elif key not in entries:  # the key's other failures (e.g. a union's `null` member) are said by its entries
            lines.setdefault(key, f"{cls.SECTION}.{key} = {values.get(key)!r}: {told.get('allowed', error['msg'])}")
    return list(lines.values())


def _index(loc: tuple[int | str, ...]) -> int | None:
    """The list index in a pydantic error location (the key, then union member names, then the index), if any."""
    return next((part for part in loc[1:] if isinstance(part, int)), None)


class DatasetConfig(Section):
    """`dataset`: which data, where. categories: a non-empty list (DVC's matrix cannot iterate null);
    textures None = the dataset's default texture categories. root / url / sha256 None (or absent) = the
    dataset's own (mpad.data.catalog; sha256 only when url is also the dataset's own): resolved on
    construction."""

    SECTION: ClassVar[str] = "dataset"
    name: Literal[DATASETS] = knob("mvtec", _one_of(DATASETS))  # type: ignore[valid-type]
    root: Text | None = knob(None, "must be a folder path (or null: data/<name>)")
    url: str | None = knob(None, "must be a URL (or null: the official archive)")
    sha256: Sha256 | None = knob(None, "must be 64 hex digits or null")
    categories: Categories = knob(list(TABLE_ORDER), CATEGORIES, entry=CATEGORY)
    textures: Names | None = knob(list(CATALOG["mvtec"].textures), NAMES + " (or null: the dataset's default)")
    seed: int = knob(0, "must be an integer >= 0", ge=0)

    @model_validator(mode="before")
    @classmethod
    def _the_datasets_own(cls, values: Any) -> Any:
        if not isinstance(values, Mapping):
            return values
        entry = CATALOG.get(values.get("name", "mvtec"), CATALOG["folder"])
        resolved = dict(values)
        if resolved.get("url") is None:
            resolved["url"] = entry.url
            if resolved.get("sha256") is None:
                resolved["sha256"] = entry.sha256
        if resolved.get("root") is None:
            resolved["root"] = entry.root
        return resolved

    @model_validator(mode="after")
    def _root_known(self) -> DatasetConfig:
        if self.root is None:
            raise ValueError(f"root = None: must be set to your folder for dataset.name = {self.name}")
        return self

    @property
    def path(self) -> Path:
        """Where the dataset is read (and fetched to): `root` by mpad.workspace.data_root, so that a queued
        experiment's temporary copy reads the original workspace's dataset instead of lacking it."""
        from mpad.workspace import data_root

        return data_root(self.root or "")

    @property
    def texture_categories(self) -> tuple[str, ...]:
        """dataset.textures, or when null the dataset's own texture categories (the catalog's)."""
        return tuple(CATALOG[self.name].textures if self.textures is None else self.textures)


class ShotsConfig(Section):
    """`shots`: k normal training images per category, drawn with seed."""

    SECTION: ClassVar[str] = "shots"
    k: int = knob(1, "must be an integer >= 1", ge=1)
    seed: int = knob(0, "must be an integer >= 0", ge=0)


class ModelConfig(Section):
    """`model`: the open_clip backbone, its weights (tag | checkpoint path | none), device and precision."""

    SECTION: ClassVar[str] = "model"
    name: Text = knob("ViT-B-16-plus-240", "must be an open_clip architecture name or mpad-tiny")
    pretrained: Annotated[Text, BeforeValidator(lambda v: "none" if v is None else v)] = knob(
        "laion400m_e32", "must be an open_clip tag, a checkpoint file path, or none"
    )  # YAML null: random weights, like 'none'
    device: Device = knob("auto", "must be auto, cpu, cuda or cuda:N")
    precision: Literal[PRECISIONS] = knob("fp32", _one_of(PRECISIONS))  # type: ignore[valid-type]


class LaaConfig(Section):
    """`laa` (eq. 11-12): attention of the second path, neighbour distance k (None: no mask), the number of
    last blocks with the second path, and the CLS treatment."""

    SECTION: ClassVar[str] = "laa"
    attention: Literal[ATTENTIONS] = knob("vv", _one_of(ATTENTIONS))  # type: ignore[valid-type]
    k: float | None = knob(2, "must be a number (<= 0 or null: no mask)")
    layers: int = knob(6, "must be an integer >= 1", ge=1)
    cls: Literal[CLS_MODES] = knob("neighbor-cls", _one_of(CLS_MODES))  # type: ignore[valid-type]

    def as_dict(self) -> dict[str, Any]:
        """What is stored with learned prompts."""
        return {"attention": self.attention, "k": self.k, "layers": self.layers, "cls": self.cls}


class PromptsConfig(Section):
    """`prompts` (eq. 1): learnable token counts of the shared prefix and the normal / anomaly suffixes."""

    SECTION: ClassVar[str] = "prompts"
    n_general: int = knob(4, "must be an integer >= 0", ge=0)
    n_normal: int = knob(2, "must be an integer >= 1", ge=1)
    n_anomaly: int = knob(2, "must be an integer >= 1", ge=1)

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.n_general, self.n_normal, self.n_anomaly)


FRACTION = "must be a number in [0, 1]"
NON_NEGATIVE = "must be a number >= 0"


class OagmConfig(Section):
    """`oagm` (sec. 3.4): synthesized anomalies."""

    SECTION: ClassVar[str] = "oagm"
    enabled: bool = knob(True, "must be true or false")
    region: Literal[REGIONS] = knob("blobs", _one_of(REGIONS))  # type: ignore[valid-type]
    samples: int = knob(32, "must be an integer >= 1", ge=1)
    sigma: float = knob(0.25, NON_NEGATIVE, ge=0)
    clean_fraction: float = knob(0.2, FRACTION, ge=0, le=1)
    mask_method: Literal[MASK_METHODS] = knob("clip", _one_of(MASK_METHODS))  # type: ignore[valid-type]
    texture_mask: Literal[TEXTURE_MASKS] = knob("mask_method", _one_of(TEXTURE_MASKS))  # type: ignore[valid-type]
    mask_threshold: float = knob(0.5, FRACTION, ge=0, le=1)
    mask_layers: int = knob(6, "must be an integer >= 1", ge=1)
    seed: int = knob(0, "must be an integer >= 0", ge=0)


class ScoringConfig(Section):
    """`scoring`: map smoothing (pixels at evaluate.resolution; 0 = off) and the image score."""

    SECTION: ClassVar[str] = "scoring"
    smoothing_sigma: float = knob(4.0, NON_NEGATIVE, ge=0)
    image_score: Literal[IMAGE_SCORES] = knob("max", _one_of(IMAGE_SCORES))  # type: ignore[valid-type]
    topk: float = knob(0.01, "must be a fraction in (0, 1]", gt=0, le=1)


class EvaluateConfig(Section):
    """`evaluate`: map resolution, batch size, DataLoader workers, overlay count."""

    SECTION: ClassVar[str] = "evaluate"
    resolution: int = knob(256, "must be an integer >= 8", ge=8)
    batch_size: int = knob(16, "must be an integer >= 1", ge=1)
    workers: int = knob(2, "must be an integer >= 0", ge=0)
    overlays: int = knob(6, "must be an integer >= 0", ge=0)


class MemoryConfig(Section):
    """`memory`: the few-shot visual memory branch (beyond the paper)."""

    SECTION: ClassVar[str] = "memory"
    enabled: bool = knob(False, "must be true or false")
    layers: Blocks = knob([6, 9, 12], "must be a non-empty list of block numbers >= 1")
    fusion: Literal[FUSIONS] = knob("harmonic", _one_of(FUSIONS))  # type: ignore[valid-type]


class MptsConfig(Section):
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

    SECTION: ClassVar[str] = "mpts"
    NOT_PARAMS: ClassVar[tuple[str, ...]] = ("divergence",)
    lam: float = knob(1.0, NON_NEGATIVE, ge=0, alias="lambda")
    calibration: Literal[CALIBRATIONS] = knob("projection", _one_of(CALIBRATIONS))  # type: ignore[valid-type]
    meta_epochs: int = knob(3, "must be an integer >= 0", ge=0)
    steps: int = knob(100, "must be an integer >= 1", ge=1)
    lr: float = knob(0.002, "must be a number > 0", gt=0)
    stop: Literal[STOPS] = knob("fixed", _one_of(STOPS))  # type: ignore[valid-type]
    tolerance: float = knob(0.01, FRACTION, ge=0, le=1)
    window: int = knob(10, "must be an integer >= 1", ge=1)
    batch_size: int = knob(16, "must be an integer >= 1", ge=1)
    seed: int = knob(0, "must be an integer >= 0", ge=0)
    divergence: bool = Field(True, exclude=True)

    def params(self) -> dict[str, Any]:
        """{params key: value}, as params.yaml spells them (for logs)."""
        return self.model_dump(by_alias=True)


SECTIONS: dict[str, type[Section]] = {
    cls.SECTION: cls
    for cls in (
        DatasetConfig, ShotsConfig, ModelConfig, LaaConfig, PromptsConfig, OagmConfig, MptsConfig, ScoringConfig,
        EvaluateConfig, MemoryConfig,
    )
}  # fmt: skip


def load_sections(params: Mapping[str, Any], *names: str) -> list[Any]:
    """The settings of sections `names` of params.yaml's values, in that order; ConfigError with one line per
    bad value of any of them."""
    found, errors = [], []
    for name in names:
        try:
            found.append(SECTIONS[name].from_params(params.get(name)))
        except ConfigError as err:
            errors += str(err).splitlines()
    if errors:
        raise ConfigError("\n".join(errors))
    return found
