"""The dataset manifest `data/manifest.json` (written by fetch; read by sample and summarize).

{"name": mvtec | synthetic | folder, "root": dataset.root as given, "note": licence / provenance,
 "categories": {<category>: {"group": texture | object, "train": n, "test": {<defect>: n}, ...}},
 "seed": generated datasets only}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mpad.data.mvtec import DatasetError
from mpad.io import write_json


def save_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically."""
    write_json(path, manifest)


def load_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check the manifest; DatasetError naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: dataset manifest not found") from None
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable dataset manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("categories"), dict) or "root" not in manifest:
        raise DatasetError(f"{path}: not a dataset manifest (no 'root' and 'categories')")
    return manifest


def check_category(manifest: dict[str, Any], path: str | Path, root: str, category: str) -> None:
    """The manifest must describe `root` and hold `category` (else it is stale: fetch ran with other params)."""
    if manifest.get("root") != root:
        raise DatasetError(f"{path} describes root {manifest.get('root')!r}, the settings say {root!r}")
    if category not in manifest["categories"]:
        raise DatasetError(f"category {category!r} is not in {path}")


def group_of(manifest: dict[str, Any], category: str) -> str:
    """texture | object, as fetch recorded it."""
    return str(manifest["categories"].get(category, {}).get("group", "object"))
