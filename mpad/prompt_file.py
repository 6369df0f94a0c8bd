"""The learned-prompt file `data/prompts/<category>.pt` and its one owner, `PromptsFile`: self-describing,
machine-independent.

It holds the learned vectors, everything needed to rebuild the prompts (backbone identity, class name,
prompt sizes), the LAA settings they were learned with, the (2, D) text embeddings [normal, anomaly] ready
for scoring, the visual memory (mpad.memory's record) when the memory branch was on, and a summary of the
training. Tensors are saved on the CPU; no paths or devices inside. On disk it is a torch.save'd mapping
(format 1), written to memory first, so the same content always gives the same bytes.

Its content identity is the SHA-256 of those bytes (`PromptsFile.sha256`, set by `save` and `load`): the
thresholds file records the identity of the prompts it was measured with, and the ONNX sidecar both.
No other module reads or writes the file's keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpad.config import ConfigError, LaaConfig, is_random
from mpad.io import check_format, write_bytes

FORMAT = 1
_REQUIRED = ("category", "model", "text", "laa")
_BACKBONE_KEYS = ("name", "pretrained", "embed_dim")


class PromptFileError(ValueError):
    """A prompts file that is missing, unreadable, or made for another backbone."""


@dataclass(frozen=True)
class PromptsFile:
    """Learned prompts of one category.

    model: the backbone identity (`mpad.clip.backbone_identity`: name, pretrained, embed_dim, image_size);
    sizes: (n_general, n_normal, n_anomaly); vectors: {"general", "normal", "anomaly"} learned context
    (n, width) tensors; text: (2, D) normalised embeddings [normal, anomaly]; laa: the encoder settings;
    memory: `mpad.memory.VisualMemory.to_record()` or None; train: a summary of the training (steps, final
    loss, ...) or None; sha256: the content identity, None until saved or loaded.
    """

    category: str
    model: dict[str, Any]
    sizes: tuple[int, int, int]
    vectors: dict[str, torch.Tensor]
    text: torch.Tensor
    laa: LaaConfig
    memory: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    sha256: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.text, torch.Tensor) and self.text.ndim == 2 and self.text.shape[0] == 2):
            shape = tuple(self.text.shape) if isinstance(self.text, torch.Tensor) else type(self.text).__name__
            raise PromptFileError(f"text must be the (2, D) [normal, anomaly] embeddings, not {shape}")

    def save(self, path: str | Path) -> PromptsFile:
        """Write atomically; returns this record with its `sha256` (that of the bytes written)."""
        data = _serialise(self.as_stored())
        write_bytes(path, data)
        return dataclasses.replace(self, sha256=hashlib.sha256(data).hexdigest())

    @classmethod
    def load(cls, path: str | Path, expect_model: dict[str, Any] | None = None) -> PromptsFile:
        """Read and check a prompts file; with `expect_model` (a backbone identity), refuse one made for another
        backbone. Any problem is a PromptFileError naming `path`."""
        path = Path(path)
        if not path.is_file():
            raise PromptFileError(f"{path}: prompts file not found (run the train stage first: dvc repro)")
        data = path.read_bytes()
        try:
            stored = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a corrupt file
            raise PromptFileError(f"{path}: not a readable prompts file ({err})") from err
        check_format(stored, path, PromptFileError, "prompts file", FORMAT, _REQUIRED, "train again")
        try:
            prompts = cls(
                category=str(stored["category"]),
                model=dict(stored["model"]),
                sizes=tuple(int(n) for n in stored.get("sizes", (0, 0, 0))),  # type: ignore[arg-type]
                vectors=dict(stored.get("vectors", {})),
                text=stored["text"],
                laa=LaaConfig.from_params(dict(stored["laa"])),
                memory=stored.get("memory"),
                train=stored.get("train"),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        except (PromptFileError, ConfigError, TypeError, ValueError) as err:
            raise PromptFileError(f"{path}: {err} (train again to remake it)") from err
        if expect_model is not None:
            prompts.check_backbone(expect_model, path)
        return prompts

    def check_backbone(self, model: dict[str, Any], path: str | Path) -> None:
        """Raise PromptFileError when these prompts were learned with another backbone than `model`."""
        differ = [
            f"{key} {self.model.get(key)!r} vs {model.get(key)!r}"
            for key in _BACKBONE_KEYS
            if self.model.get(key) != model.get(key)
        ]
        if differ:
            raise PromptFileError(
                f"{path}: prompts were learned for another backbone than this one: {'; '.join(differ)} (learned "
                f"vs this). Use the model they were made for, or train prompts for this one."
            )

    @property
    def random_weights(self) -> bool:
        """Whether the backbone they were learned on had random weights (model.pretrained none)."""
        return is_random(self.model.get("pretrained"))

    def as_stored(self) -> dict[str, Any]:
        """The mapping written to disk (format 1)."""
        stored: dict[str, Any] = {
            "format": FORMAT,
            "category": self.category,
            "model": dict(self.model),
            "sizes": list(self.sizes),
            "vectors": {k: v.detach() for k, v in self.vectors.items()},
            "text": self.text.detach(),
            "laa": self.laa.as_dict(),
        }
        if self.memory is not None:
            stored["memory"] = self.memory
        if self.train is not None:
            stored["train"] = self.train
        return stored


def _serialise(mapping: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(_to_cpu(mapping), buffer)
    return buffer.getvalue()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
