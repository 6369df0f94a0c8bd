"""VisA (Zou et al., ECCV 2022): the official archive converted to the MVTec layout with its 1-class split.

The archive (`VisA_20220922.tar`) holds `<category>/Data/Images/{Normal,Anomaly}/*.JPG`, label PNGs
`<category>/Data/Masks/Anomaly/*.png` (0 = good, any other value = a defect's index) and
`split_csv/1cls.csv` (object, split, label, image, mask). It is extracted once, beside dataset.root, and only
read from then on; conversion writes `<root>/<category>/train/good`, `test/good`, `test/bad` and
`ground_truth/bad/<stem>_mask.png` (0/255), copying the JPEGs byte for byte. Each category is written into a
temporary folder renamed into place when complete, so a present category is a complete one.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from mpad.data.download import download, safe_extract
from mpad.data.mvtec import DatasetError
from mpad.io import atomic_path

SPLIT_CSV = PurePosixPath("split_csv/1cls.csv")
COLUMNS = ["object", "split", "label", "image", "mask"]
DEFECT = "bad"  # VisA names no defect types: one defect folder, as anomalib does


def extracted_dir(root: Path) -> Path:
    """Where the archive is extracted: beside root (`data/visa` -> `data/visa_extracted`), read only."""
    return root.with_name(root.name + "_extracted")


def _top(extracted: Path) -> Path:
    """The folder holding split_csv/: the extraction itself or its single sub-folder (a re-packed archive)."""
    for top in (extracted, *[p for p in extracted.iterdir() if p.is_dir()]):
        if (top / SPLIT_CSV).is_file():
            return top
    raise DatasetError(f"{extracted} has no {SPLIT_CSV}: not a VisA archive")


def _relative(value: str, where: str) -> PurePosixPath:
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts:
        raise DatasetError(f"{where}: path {value!r} must be relative, inside the archive")
    return path


def read_split(csv_path: Path) -> dict[str, list[tuple[str, str, PurePosixPath, PurePosixPath | None]]]:
    """Rows of the 1-class split per category: (split, label, image, mask or None). Any malformed row is a
    DatasetError naming the file, the line and the problem: a bad split must never become a silent one."""
    rows: dict[str, list[tuple[str, str, PurePosixPath, PurePosixPath | None]]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != COLUMNS:
            raise DatasetError(f"{csv_path}: header {header} is not {','.join(COLUMNS)}")
        for row in reader:
            where = f"{csv_path}, line {reader.line_num}"
            if not row:
                continue
            if len(row) != len(COLUMNS):
                raise DatasetError(f"{where}: {len(row)} fields instead of {len(COLUMNS)}: {row}")
            obj, split, label, image, mask = row
            if split not in ("train", "test") or label not in ("normal", "anomaly"):
                raise DatasetError(f"{where}: split {split!r} / label {label!r} (expected train|test, normal|anomaly)")
            if split == "train" and label == "anomaly":
                raise DatasetError(f"{where}: an anomaly in the 1-class training split")
            if (label == "anomaly") != bool(mask):
                raise DatasetError(f"{where}: {'an anomaly needs' if mask == '' else 'a normal image has no'} mask")
            image_path = _relative(image, where)
            if image_path.parts[0] != obj:
                raise DatasetError(f"{where}: image {image!r} is not under its object {obj!r}")
            rows.setdefault(obj, []).append((split, label, image_path, _relative(mask, where) if mask else None))
    return rows


def binarize_mask(src: Path, dest: Path) -> None:
    """VisA's label PNG (defect indices, palette or gray) as an MVTec mask: 255 where non-zero, else 0."""
    with Image.open(src) as img:
        values = np.asarray(img)  # raw values: palette indices stay indices, so index 0 is "good"
    if values.ndim == 3:
        values = values.any(axis=2)
    Image.fromarray(np.where(values > 0, 255, 0).astype(np.uint8), mode="L").save(dest)


def convert_category(top: Path, rows: list, dest: Path) -> None:
    """Write one category in the MVTec layout at `dest` (atomically); `top` is only read."""
    with atomic_path(dest) as tmp:
        for split, label, image, mask in rows:
            source = top / image
            if not source.is_file():
                raise DatasetError(f"{top / SPLIT_CSV} names {image}, which the archive lacks")
            folder = tmp / split / ("good" if label == "normal" else DEFECT)
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / source.name
            if target.exists():
                raise DatasetError(f"{top / SPLIT_CSV}: two {split} {label} images named {source.name}")
            shutil.copyfile(source, target)  # the JPEG as it is: no re-encoding
            if mask is not None:
                if not (top / mask).is_file():
                    raise DatasetError(f"{top / SPLIT_CSV} names mask {mask}, which the archive lacks")
                (tmp / "ground_truth" / DEFECT).mkdir(parents=True, exist_ok=True)
                binarize_mask(top / mask, tmp / "ground_truth" / DEFECT / f"{source.stem}_mask.png")


def ensure_visa(
    root: Path, categories: list[str], url: str, sha256: str | None, archive: Path, progress: bool = True
) -> bool:
    """Make `root/<category>` (MVTec layout) exist for every requested category. Nothing is read when they all
    are there; otherwise the archive is downloaded to `archive` (resumed, checksummed) and extracted once to
    extracted_dir(root), then the missing categories are converted. True when it converted."""
    root = Path(root)
    missing = [c for c in categories if not (root / c / "train").is_dir()]
    if not missing:
        return False
    raw = extracted_dir(root)
    if not raw.is_dir():
        by_hand = f"or extract it yourself into {raw.resolve()} (the folder holding {SPLIT_CSV}), which fetch converts"
        download(url, archive, sha256, progress=progress, by_hand=by_hand)
        safe_extract(archive, raw)
    top = _top(raw)
    rows = read_split(top / SPLIT_CSV)
    absent = [c for c in missing if c not in rows]
    if absent:
        raise DatasetError(f"{top / SPLIT_CSV} lists no categories {absent} (it lists: {', '.join(sorted(rows))})")
    for category in missing:
        convert_category(top, rows[category], root / category)
    return True
