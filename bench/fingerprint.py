"""What `fetch` costs on every `dvc repro` (it is `always_changed`) on an MVTec AD-sized tree, and what content
hashes would cost instead of the stat-based fingerprint.

Builds a stand-in tree in MVTec AD's layout and counts: 15 categories, 5,355 images (3,630 train, 750 good
and 975 defective test images) of 200-900 KB (random bytes after a valid 1024x1024 PNG header, as MVTec's
images are ~4.9 GB together) and 975 small masks. Times, per pass over all categories: the stat fingerprint
of every split (`mvtec.fingerprint`), `summarize_category` (listing, header of every image and mask, the
fingerprints: fetch's work), and sha256 of every file's bytes. The tree stays in the page cache after it is
written, so the hash time is a warm-cache lower bound; from disk add reading ~3 GB.

Run: .venv/bin/python bench/fingerprint.py [folder]   (default: a temporary folder, removed afterwards)
"""

from __future__ import annotations

import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mpad.data.mvtec import fingerprint, list_split, summarize_category

TRAIN, GOOD, DEFECTS = 242, 50, 65  # per category: 15 x 357 = 5,355 images


def _png(mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (1024, 1024)).save(buffer, format="PNG")
    return buffer.getvalue()


def build(root: Path, seed: int = 0) -> int:
    """Write the stand-in tree; returns its size in bytes."""
    rng = np.random.default_rng(seed)
    image, mask = _png("RGB"), _png("L")
    total = 0
    for c in range(15):
        cat = root / f"cat{c:02d}"
        for folder, n in (("train/good", TRAIN), ("test/good", GOOD), ("test/crack", DEFECTS)):
            (cat / folder).mkdir(parents=True)
            for i in range(n):
                pad = rng.bytes(int(rng.integers(200_000, 900_000)) - len(image))
                (cat / folder / f"{i:03d}.png").write_bytes(image + pad)  # PIL reads the header, ignores the tail
                total += len(image) + len(pad)
        (cat / "ground_truth/crack").mkdir(parents=True)
        for i in range(DEFECTS):
            (cat / "ground_truth/crack" / f"{i:03d}_mask.png").write_bytes(mask)
    return total


def timed(label: str, work) -> None:
    start = time.perf_counter()
    work()
    print(f"{label}: {time.perf_counter() - start:.2f} s")


def main(root: Path) -> None:
    start = time.perf_counter()
    size = build(root)
    files = [p for p in root.rglob("*") if p.is_file()]
    print(f"stand-in tree: {len(files)} files, {size / 1e9:.2f} GB, written in {time.perf_counter() - start:.0f} s")
    categories = sorted(p.name for p in root.iterdir())

    def stat_fingerprints() -> None:
        for c in categories:
            for split in ("train", "test"):
                fingerprint(root, list_split(root, c, split))

    def sha256_all() -> None:
        for p in files:
            with p.open("rb") as f:
                hashlib.file_digest(f, "sha256")

    for _ in range(2):  # the second pass shows the warm numbers
        timed("stat fingerprints (listing + stat)", stat_fingerprints)
        timed(
            "summarize_category, all (fetch's work: listing, headers, fingerprints)",
            lambda: [summarize_category(root, c) for c in categories],
        )
        timed("sha256 of every file (warm page cache)", sha256_all)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp) / "tree")
