"""A cache of hand-written prompt ensembles' text embeddings, one file per model: `<root>/text-<name>-<key>.pt`.

The initial meta prompts (21 templates x 12 state words) and OAGM's object / background prompts are the
same for every stage process that uses one backbone and category (synthesize, train, their re-runs and
queued experiments); computed once, they are read back in milliseconds instead of running the text tower
over some 250 sentences per process.

The key is a hash of everything the embeddings depend on (`embedding_inputs`): architecture and its config,
weights (an open_clip tag, or a checkpoint file's resolved path, size and modification time; random
weights: their seed), precision, device type, and the open_clip and torch versions. Anything else gives
another file, so a stale entry is never read. A file that cannot be read is ignored and rewritten.
An entry is one ensemble, keyed by its exact list of sentences, holding the (D,) fp32 vector that was
computed for it, so a cached value is bit-identical to a recomputed one (per-sentence entries would not
be: a batched matmul may round differently for other batch sizes). Writes are atomic; concurrent
processes at worst recompute what another one wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch

from mpad.clip import RANDOM_INIT_SEED, ClipBundle
from mpad.io import write_bytes

CACHE_ENV = "MPAD_CACHE_DIR"


def embedding_inputs(bundle: ClipBundle) -> dict[str, Any]:
    """What the text embeddings of `bundle` depend on (its hash names the cache file)."""
    identity: dict[str, Any] = {
        "name": bundle.name,
        "config": open_clip.get_model_config(bundle.name),
        "pretrained": bundle.pretrained,
        "precision": bundle.precision,
        "device": bundle.device.type,
        "open_clip": open_clip.__version__,
        "torch": torch.__version__,
        "text_encoder": "to-end-token",  # mpad.prompts.encode_tokens (entries before it: encode_text's rounding)
    }
    if bundle.random_weights:
        identity["seed"] = RANDOM_INIT_SEED
    elif Path(bundle.pretrained).is_file():
        stat = Path(bundle.pretrained).stat()
        identity.update(file=str(Path(bundle.pretrained).resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return identity


class TextCache:
    """Prompt-ensemble embeddings of one model, kept in `path`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries: dict[str, torch.Tensor] | None = None

    @classmethod
    def for_bundle(cls, bundle: ClipBundle, root: str | Path | None = None) -> TextCache:
        """The cache file of `bundle`'s model under `root`, by default $MPAD_CACHE_DIR or ~/.cache/mpad: outside
        the project, so that every stage, category and experiment (queued DVC experiments run in temporary
        copies) shares it."""
        root = root or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mpad"
        key = hashlib.sha256(json.dumps(embedding_inputs(bundle), sort_keys=True, default=str).encode()).hexdigest()
        return cls(Path(root) / f"text-{bundle.name}-{key[:16]}.pt")

    def ensemble(self, sentences: Sequence[str], compute: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """The (D,) embedding of the ensemble `sentences`: cached, or `compute(sentences)` then stored."""
        key = hashlib.sha256("\n".join(sentences).encode()).hexdigest()
        entries = self._load()
        if key not in entries:
            entries[key] = compute(list(sentences)).detach().float().cpu()
            buffer = io.BytesIO()
            torch.save(entries, buffer)
            write_bytes(self.path, buffer.getvalue())
        return entries[key]

    def _load(self) -> dict[str, torch.Tensor]:
        if self._entries is None:
            self._entries = {}
            if self.path.is_file():
                try:
                    loaded = torch.load(self.path, map_location="cpu", weights_only=True)
                    if isinstance(loaded, dict):
                        self._entries = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
                except Exception:  # noqa: BLE001 - a damaged cache is only a lost speed-up: recompute
                    self._entries = {}
        return self._entries
