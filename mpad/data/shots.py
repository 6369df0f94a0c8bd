"""Choosing the k normal training images ("shots") a few-shot run may see, and the shots file that
records them (`data/shots/<category>.json`, see `mpad.layout.shots_file`): its one owner.

Shots file: {"category", "root", "k", "seed", "shots": [{"path", "sha256"}]}, paths relative to the
dataset root, so the same picks are found on any machine; the sha256 catches an image changed since.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from mpad.data.mvtec import DatasetError, Sample
from mpad.io import sha256_file, write_json


def stable_hash(text: str) -> int:
    """A 63-bit integer from `text` that is the same on every machine and run (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


def pick_shots(samples: list[Sample], k: int, seed: int, category: str) -> list[Sample]:
    """Pick `k` distinct samples, deterministically from (`seed`, `category`).

    The samples are sorted by path first, so the picks do not depend on listing order or machine.
    Picks are nested: the first k of a permutation, so the k=1 shot is also among the k=2 shots.
    Raises DatasetError when k < 1 or k exceeds the number of samples, or seed < 0.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DatasetError(f"shots.k must be a positive integer, got {k!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DatasetError(f"shots.seed must be a non-negative integer, got {seed!r}")
    ordered = sorted(samples, key=lambda s: s.image.as_posix())
    if k > len(ordered):
        raise DatasetError(f"shots.k = {k} but category {category!r} has only {len(ordered)} training image(s)")
    rng = np.random.default_rng([seed, stable_hash(category)])
    order = rng.permutation(len(ordered))[:k]
    return [ordered[i] for i in order]


def save_shots(
    path: str | Path,
    category: str,
    root: str | Path,
    k: int,
    seed: int,
    picks: list[Sample],
    base: str | Path | None = None,
) -> dict[str, Any]:
    """Write the shots file of `picks` (samples under `base`, default `root`) atomically; returns the record
    written. `root` is dataset.root as configured, `base` where it was read (mpad.workspace.data_root)."""
    entries = [
        {"path": s.image.relative_to(root if base is None else base).as_posix(), "sha256": sha256_file(s.image)}
        for s in picks
    ]
    record = {"category": category, "root": str(root), "k": k, "seed": seed, "shots": entries}
    write_json(path, record)
    return record


def load_shots(path: str | Path, root: str | Path, category: str) -> list[tuple[str, Path]]:
    """(path relative to root, path under `root`) of each shot listed in the shots file at `path`.

    DatasetError, naming the file, when it is missing or malformed, lists no shots or another category's,
    or a listed image is missing or changed since (sha256 differs).
    """
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise DatasetError(f"{path}: shots file not found")
    try:
        record = json.loads(path.read_text())
        entries = [(str(s["path"]), str(s["sha256"])) for s in record["shots"]]
    except (ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{path}: not a valid shots file ({err!r})") from err
    if record.get("category", category) != category:
        raise DatasetError(f"{path}: holds the shots of category {record.get('category')!r}, not {category!r}")
    if not entries:
        raise DatasetError(f"{path}: lists no shots")
    shots = []
    for rel, sha in entries:
        image = root / rel
        if not image.is_file():
            raise DatasetError(f"{image}: shot image listed in {path} not found")
        if sha256_file(image) != sha:
            raise DatasetError(f"{image}: shot image changed since {path} was written (sha256 differs)")
        shots.append((rel, image))
    return shots
