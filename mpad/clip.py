"""Build an open_clip model from a name: one factory for pretrained tags, local checkpoints and random weights.

`pretrained` is read as
- `none` (or empty): random initialisation. Every number computed with it says nothing about real
  quality; `ClipBundle.random_weights` is True so that outputs can say so, and a warning is logged.
- a path to an existing file: a checkpoint (a state dict, as saved by `torch.save(model.state_dict())`
  or open_clip's training checkpoints), loaded through open_clip's file code path.
- anything else: an open_clip pretrained tag (e.g. `laion400m_e32`), which open_clip downloads on
  first use into its cache. With no network that fails; the error says how to use a local file.

`precision` is fp32, fp16 or bf16, cast as open_clip's own `precision` option does (`convert_weights_to_lp`):
the weights of linear, convolution and attention layers and the projections in half precision; LayerNorm
(open_clip's `LayerNormFp32`), the embeddings (class, positional, token) and the logit scale stay fp32.
`compute_dtype` is the dtype inputs are fed in; callers keep losses, calibration and metrics in fp32.

The tiny architecture `mpad-tiny` (64 px, patch 8, 4+3 layers of width 128) ships with the package for
tests and the offline preset; it is registered with open_clip on first use, not at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from mpad.config import is_random

RANDOM_INIT_SEED = 0
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CONFIG_DIR = Path(__file__).with_name("model_configs")


class ModelLoadError(RuntimeError):
    """The model or its weights could not be built or loaded; the message says what to do."""


@dataclass
class ClipBundle:
    """An open_clip model ready for inference, with what is needed around it.

    model: the open_clip `CLIP` (eval mode, on `device`, in `precision`).
    tokenizer: text -> (N, context_length) int64 token ids.
    mean, std: the per-channel normalisation the weights expect (3-tuples).
    image_size: (H, W) the vision tower takes.
    name, pretrained: how it was built (recorded with learned prompts so they can be rebuilt).
    random_weights: True when no weights were loaded.
    precision: fp32 | fp16 | bf16; `compute_dtype` is the matching torch dtype.
    """

    model: torch.nn.Module
    tokenizer: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: tuple[int, int]
    name: str
    pretrained: str
    device: torch.device
    random_weights: bool
    precision: str = "fp32"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the towers compute in: what images and token embeddings are cast to."""
        return PRECISIONS[self.precision]


def register_configs() -> None:
    """Make the shipped configs (`mpad-tiny`) known to open_clip; idempotent."""
    if "mpad-tiny" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available else cpu; otherwise torch's own parsing (`cpu`, `cuda:1`)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device = {device!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return resolved


def check_precision(precision: str) -> str:
    """`precision` itself when it is one of PRECISIONS, else a ModelLoadError naming the choices."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"model.precision = {precision!r}: must be one of {', '.join(PRECISIONS)}")
    return precision


def load_clip(name: str, pretrained: str | None, device: str = "cpu", precision: str = "fp32") -> ClipBundle:
    """Build `name` with `pretrained` weights (tag, checkpoint path, or none), in eval mode, frozen."""
    check_precision(precision)
    register_configs()
    if name not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown model.name {name!r}: not an open_clip architecture (see open_clip.list_models())"
        )
    torch_device = resolve_device(device)
    random_weights = is_random(pretrained)  # the stages say so once (ClipBundle.random_weights), not us
    if not random_weights:
        _check_pretrained(name, str(pretrained))
    try:
        # Random weights come from a fixed seed, so every stage that builds the model gets the same one;
        # weights that are loaded are not initialised first (open_clip loads them strictly: every one is set).
        with (
            torch.random.fork_rng(devices=[]),
            _quiet_random_init() if random_weights else _mapped_weights(),
        ):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(
                name,
                pretrained=None if random_weights else str(pretrained),
                precision=precision,
                device=torch_device,
            )
    except Exception as err:  # torch / open_clip raise many types for an unreadable or foreign file
        if Path(str(pretrained)).is_file():
            raise ModelLoadError(
                f"model.pretrained = {pretrained!r}: not a checkpoint of {name} ({_why_unreadable(err, pretrained)}). "
                f"Give a state dict saved from this architecture."
            ) from err
        raise ModelLoadError(
            f"could not load weights {pretrained!r} for {name}: {err}. Without network access, download the "
            f"checkpoint elsewhere and set model.pretrained to its local file path."
        ) from err
    model.eval().requires_grad_(False)
    image_size = model.visual.image_size
    image_size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    cfg = getattr(model.visual, "preprocess_cfg", {})
    return ClipBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        image_size=image_size,
        name=name,
        pretrained="none" if random_weights else str(pretrained),
        device=torch_device,
        random_weights=random_weights,
        precision=precision,
    )


_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "zeros_",
    "ones_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
)
_RESETS = (
    (torch.nn.Linear, "reset_parameters"),
    (torch.nn.Conv2d, "reset_parameters"),
    (torch.nn.LayerNorm, "reset_parameters"),
    (torch.nn.Embedding, "reset_parameters"),
    (torch.nn.MultiheadAttention, "_reset_parameters"),
)


def _why_unreadable(err: Exception, path: str | Path) -> str:
    """A short reason a checkpoint file failed to load: its kind when it is no torch file at all (torch's own
    message then is a paragraph about weights_only), else the error's first line, capped."""
    with open(path, "rb") as f:
        head = f.read(9)
    torch_file = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch.save's zip, or a pickle
    if not (torch_file or head[8:9] == b"{"):  # safetensors: an 8-byte length, then its JSON header
        return "neither a torch zip archive, a pickle nor a safetensors file"
    first = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {first[:160]}"


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" log line: the stages say it once,
    in their own words."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


@contextmanager
def _no_weight_init() -> Iterator[None]:
    """While building a model whose weights are all loaded next, `torch.nn.init` and the layers' own
    reset methods do nothing (the idea of transformers' `no_init_weights`): ~1 s saved per stage process for
    ViT-B-16-plus-240 on 2 CPU cores, and the tensors hold whatever memory held until they are loaded."""
    saved = [(torch.nn.init, name, getattr(torch.nn.init, name)) for name in _INIT_FUNCTIONS]
    owners = [(next(c for c in cls.__mro__ if name in c.__dict__), name) for cls, name in _RESETS]  # e.g. _ConvNd
    saved += [(owner, name, owner.__dict__[name]) for owner, name in owners]
    try:
        for owner, name, _ in saved:
            setattr(owner, name, _skip)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _skip(tensor_or_module: object, *args: object, **kwargs: object) -> object:
    return tensor_or_module


@contextmanager
def _mapped_weights() -> Iterator[None]:
    """While open_clip builds a model and loads its checkpoint: no random initialisation (`_no_weight_init`),
    `torch.load` memory-maps the file instead of reading it into new memory, and `load_state_dict` makes
    each mapped tensor the model's own where dtype, device and shape already match (assign), else casts or
    moves it first, so the weights are not copied a second time. The pages are read on first use and
    shared by every process that maps the file (parallel workers). A file torch cannot map (the legacy,
    non-zip format) is read as before. ViT-B-16-plus-240 (830 MB) on 2 CPU cores: about 4 s less per
    stage process."""
    load, load_state_dict = torch.load, torch.nn.Module.load_state_dict

    def mapped_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return load(f, *args, **{**kwargs, "mmap": True})
        except RuntimeError:  # "mmap can only be used with files saved with ... zipfile serialization"
            return load(f, *args, **kwargs)

    def assigning_load(module: torch.nn.Module, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        own = module.state_dict(keep_vars=True)
        ready = {}
        for key, value in state_dict.items():
            target = own.get(key)
            if isinstance(value, torch.Tensor) and target is not None and value.shape == target.shape:
                value = value.to(dtype=target.dtype, device=target.device)  # the same tensor where they match
            ready[key] = value
        return load_state_dict(module, ready, strict=strict, assign=True)

    with _no_weight_init():
        torch.load, torch.nn.Module.load_state_dict = mapped_load, assigning_load
        try:
            yield
        finally:
            torch.load, torch.nn.Module.load_state_dict = load, load_state_dict


def _check_pretrained(name: str, pretrained: str) -> None:
    """Fail early, with the choices, when `pretrained` is neither a file nor a tag of `name`."""
    if Path(pretrained).is_file():
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        looks_like_path = "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        what = "checkpoint file not found" if looks_like_path else "not a pretrained tag of this model"
        raise ModelLoadError(
            f"model.pretrained = {pretrained!r}: {what}. Tags for {name}: {tags or 'none'}; "
            f"or give a local checkpoint path, or 'none' for random weights."
        )


def backbone_identity(bundle: ClipBundle) -> dict[str, Any]:
    """What identifies the backbone a prompt was learned for (stored with prompts; compared by predict)."""
    return {
        "name": bundle.name,
        "pretrained": bundle.pretrained,
        "embed_dim": int(bundle.model.text_projection.shape[1]),
        "image_size": list(bundle.image_size),
    }
