"""Make a dataset available and describe it (the work of the fetch stage): find, download or generate it,
validate the requested categories, count their images, and return the manifest (mpad.data.manifest)."""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpad.data import synthetic, visa
from mpad.data.catalog import CATALOG
from mpad.data.download import ensure_extracted
from mpad.data.mvtec import DatasetError, list_categories, summarize_category
from mpad.workspace import in_queued_copy

if TYPE_CHECKING:  # the params' type only: mpad.config depends on mpad.data (its catalog), not the reverse
    from mpad.config import DatasetConfig


@contextmanager
def _lock(root: Path) -> Iterator[None]:
    """An exclusive lock on `.<root name>.lock` beside root (held until the block ends)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def prepare_dataset(config: DatasetConfig, downloads: Path, say: Callable[[str], Any] = print) -> dict[str, Any]:
    """The manifest of `config`'s dataset, after making it available under `config.root`.

    `config.path` is the workspace's dataset also in a queued experiment, which must find it there (it never
    downloads). mvtec: used as it is when complete, else downloaded to `downloads` (resumed, checksummed) and extracted;
    visa: the requested categories converted (mpad.data.visa) unless there, from the archive extracted once;
    synthetic: generated from `config.seed` unless already there; folder: validated, never modified.
    Raises DatasetError naming what is missing or wrong.
    """
    root = config.path
    categories = list(config.categories)
    textures = config.texture_categories
    missing = [c for c in categories if not (root / c / "train").is_dir()]
    if missing and config.name in ("mvtec", "visa") and in_queued_copy():
        # Parallel workers would each download gigabytes into the same place: the workspace does it once.
        raise DatasetError(
            f"{root} lacks categories {missing}: a queued experiment only reads the dataset; run "
            "`dvc repro fetch` (or `mpad fetch`) in the workspace first"
        )
    if config.name == "mvtec":
        ensure_extracted(root, categories, config.url or "", config.sha256, downloads / str(CATALOG["mvtec"].archive))
    elif config.name == "visa":
        if visa.ensure_visa(
            root, categories, config.url or "", config.sha256, downloads / str(CATALOG["visa"].archive)
        ):
            say(f"converted VisA categories to the MVTec layout in {root}")
    elif config.name == "synthetic":
        with _lock(root):  # queued experiments may run fetch at the same time on the workspace's dataset
            generated = synthetic.ensure(root, config.seed)
        if generated:
            say(f"generated the synthetic dataset (seed {config.seed}) in {root}")
    elif not root.is_dir():
        raise DatasetError(f"dataset.root {root} does not exist or is not a folder")
    absent = [c for c in categories if not (root / c).is_dir()]
    if absent:
        found = ", ".join(list_categories(root)) or "none"
        raise DatasetError(f"categories {absent} not found under {root} (found: {found})")
    described = {c: summarize_category(root, c) for c in categories}
    for category, info in described.items():
        info["group"] = "texture" if category in textures else "object"
    manifest: dict[str, Any] = {
        "name": config.name,
        "root": config.root,
        "categories": described,
        "note": CATALOG[config.name].note,
    }
    if config.name == "synthetic":
        manifest["seed"] = config.seed
    return manifest
