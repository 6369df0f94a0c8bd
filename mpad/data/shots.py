"""Choosing the k normal training images ("shots") a few-shot run may see."""

from __future__ import annotations

import hashlib

import numpy as np

from mpad.data.mvtec import DatasetError, Sample


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
        raise DatasetError(
            f"shots.k = {k} but category {category!r} has only {len(ordered)} training image(s)"
        )
    rng = np.random.default_rng([seed, stable_hash(category)])
    order = rng.permutation(len(ordered))[:k]
    return [ordered[i] for i in order]
