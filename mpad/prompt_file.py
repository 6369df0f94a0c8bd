"""The learned-prompt file `data/prompts/<category>.pt`: self-describing, machine-independent.

It holds the learned vectors, everything needed to rebuild the prompts (backbone name and weights tag,
class name, prompt sizes), the encoder settings they were learned with, and the (2, D) text embeddings
[normal, anomaly] ready for scoring. Tensors are saved on the CPU; no paths or devices inside.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from mpad.io import check_format, write_bytes

FORMAT = 1
REQUIRED = ("category", "model", "text", "laa")  # what load_prompts checks for: evaluate and predict read them


class PromptFileError(ValueError):
    """A prompts file that is missing, unreadable, or made for another backbone."""


def save_prompts(path: str | Path, record: dict[str, Any]) -> None:
    """Write `record` (see `prompt_record`) atomically with torch.save."""
    buffer = io.BytesIO()
    torch.save(_to_cpu(record), buffer)
    write_bytes(path, buffer.getvalue())


def prompt_record(
    *,
    category: str,
    model: dict[str, Any],
    sizes: tuple[int, int, int],
    vectors: dict[str, torch.Tensor],
    text: torch.Tensor,
    laa: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a prompts record.

    model: `mpad.clip.model_fingerprint` of the backbone; sizes: (n_general, n_normal, n_anomaly);
    vectors: {"general", "normal", "anomaly"} learned tensors; text: (2, D) normalised embeddings;
    laa: the encoder settings {attention, k, layers, cls}; extra: e.g. the memory bank, training info.
    """
    return {
        "format": FORMAT,
        "category": category,
        "model": dict(model),
        "sizes": list(sizes),
        "vectors": {k: v.detach() for k, v in vectors.items()},
        "text": text.detach(),
        "laa": dict(laa),
        **(extra or {}),
    }


def load_prompts(path: str | Path, expect_model: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a prompts file: format, REQUIRED keys, text (2, D); with `expect_model`, refuse one made for
    another backbone. Any problem is a PromptFileError naming `path`."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompts file not found (run the train stage first: dvc repro)")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt file
        raise PromptFileError(f"{path}: not a readable prompts file ({err})") from err
    check_format(record, path, PromptFileError, "prompts file", FORMAT, REQUIRED, "train again")
    text = record["text"]
    if not (isinstance(text, torch.Tensor) and text.ndim == 2 and text.shape[0] == 2):
        shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
        raise PromptFileError(f"{path}: text must be the (2, D) [normal, anomaly] embeddings, not {shape}")
    if expect_model is not None:
        check_backbone(record, expect_model, path)
    return record


def check_backbone(record: dict[str, Any], model: dict[str, Any], path: str | Path) -> None:
    """Raise PromptFileError when the prompts were learned with another backbone than `model`."""
    made = record["model"]
    differ = [
        f"{key} {made.get(key)!r} vs {model.get(key)!r}"
        for key in ("name", "pretrained", "embed_dim")
        if made.get(key) != model.get(key)
    ]
    if differ:
        raise PromptFileError(
            f"{path}: prompts were learned for another backbone than this one: {'; '.join(differ)} (learned "
            f"vs this). Use the model they were made for, or train prompts for this one."
        )


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
