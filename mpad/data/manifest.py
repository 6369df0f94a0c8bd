"""The dataset manifest `data/manifest.json` (written by fetch; read by sample and summarize).

{"name": mvtec | synthetic | folder, "root": dataset.root as given, "note": licence / provenance,
 "categories": {<category>: {"group": texture | object, "train": n, "test": {<defect>: n},
                "fingerprint": {"train": hex, "test": hex}, ...}},
 "seed": generated datasets only}

and, per category and split, `split_record`: what the stages reading that split depend on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mpad.data.mvtec import SPLITS, DatasetError, fingerprint, list_split
from mpad.io import write_json


def save_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically."""
    write_json(path, manifest)


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check the manifest; DatasetError naming the file when it is missing or malformed."""
    manifest = _read_json(path, "dataset manifest")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("categories"), dict) or "root" not in manifest:
        raise DatasetError(f"{path}: not a dataset manifest (no 'root' and 'categories')")
    return manifest


def split_record(manifest: dict[str, Any], category: str, split: str) -> dict[str, Any]:
    """{"root", "category", "split", "images": n, "fingerprint": hex} of one split (mpad.layout.fingerprint_file).
    Its bytes change exactly when that split's file listing (paths, sizes, mtimes) or the root does."""
    info = manifest["categories"][category]
    images = info["train"] if split == "train" else sum(info["test"].values())
    return {
        "root": manifest["root"],
        "category": category,
        "split": split,
        "images": images,
        "fingerprint": info["fingerprint"][split],
    }


def save_split_record(path: str | Path, manifest: dict[str, Any], category: str, split: str) -> None:
    """Write `split_record` of one split atomically (fetch)."""
    write_json(path, split_record(manifest, category, split))


def check_split_record(path: str | Path, root: str, category: str) -> None:
    """The split record at `path` must exist and describe `root` and `category` (else fetch has not run with
    these params); DatasetError otherwise."""
    record = _read_json(path, "split record")
    if not isinstance(record, dict) or (record.get("root"), record.get("category")) != (root, category):
        raise DatasetError(f"{path} does not describe category {category!r} under root {root!r}")


def shapes(root: Path, categories: Iterable[str]) -> dict[str, dict[str, str]]:
    """{category: {split: hex}}: each split's `fingerprint` without mtimes, its files and their sizes only."""
    return {
        c: {split: fingerprint(root, list_split(root, c, split), mtimes=False) for split in SPLITS} for c in categories
    }


def pin(manifest: dict[str, Any], pinned: dict[str, Any], root: Path) -> dict[str, Any]:
    """The manifest another machine wrote of the same dataset, `pinned["manifest"]`, in place of this machine's
    `manifest`, when this copy at `root` has its categories with the same files and sizes (`pinned["shapes"]`,
    its `shapes`). Fingerprints hold mtimes, which differ between copies: a Ray node running a whole experiment
    writes the coordinator's fetch outputs instead of its own, so that the experiment's stages are up to date
    on the coordinator (mpad/runs/cluster.py). DatasetError naming the first split that differs."""
    theirs = pinned["manifest"]
    if sorted(theirs["categories"]) != sorted(manifest["categories"]) or theirs["root"] != manifest["root"]:
        raise DatasetError(f"{root}: not the dataset of the coordinator's manifest (other root or categories)")
    for category, splits in shapes(root, manifest["categories"]).items():
        for split, digest in splits.items():
            if pinned["shapes"].get(category, {}).get(split) != digest:
                raise DatasetError(
                    f"{root}: {category}/{split} differs from the coordinator's copy (other files or sizes): "
                    "every node needs the coordinator's dataset"
                )
    return theirs


def group_of(manifest: dict[str, Any], category: str) -> str:
    """texture | object, as fetch recorded it."""
    return str(manifest["categories"].get(category, {}).get("group", "object"))


def _read_json(path: str | Path, what: str) -> Any:
    """The JSON at `path`; DatasetError naming the file and `what` it should be when missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} not found") from None
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable {what} ({err})") from None
