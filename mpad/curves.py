"""The curve files: evaluate's `plots/{roc_pixel,roc_image,pro}/<category>.csv` (DVC plots; mpad.layout.curve_file)
and the reading of curve files by `make plots` (these, and dvclive's training TSVs), by column name.

One file per curve and category, so that DVC draws each file as one line: a header (CURVES[kind]), then at
most `max_points` (x, y) rows with 6 decimals; only the header when the test split cannot define the curve
(both classes are needed: a defect and a normal pixel / image).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from mpad import layout
from mpad.io import write_csv
from mpad.metrics import both_classes, pro_curve, roc_curve

if TYPE_CHECKING:  # the model code is not needed to read a curve
    from mpad.evaluation import CategoryResult

CURVES = {"roc_pixel": ("fpr", "tpr"), "roc_image": ("fpr", "tpr"), "pro": ("fpr", "pro")}
Points = list[tuple[float, float]]


def curve_points(result: CategoryResult, max_points: int = 500) -> dict[str, Points]:
    """{kind: (x, y) points} for each kind of CURVES from `result`'s maps (N, R, R), masks, scores and labels."""
    points: dict[str, Points] = {}
    for kind, scores, labels in (("roc_pixel", result.maps, result.masks), ("roc_image", result.scores, result.labels)):
        points[kind] = []
        if both_classes(labels):
            fpr, tpr, _ = roc_curve(scores, labels, max_points=max_points)
            points[kind] = list(zip(fpr.tolist(), tpr.tolist(), strict=True))
    points["pro"] = []
    if both_classes(result.masks):
        fpr, pro = pro_curve(result.maps, result.masks, max_points=max_points)
        points["pro"] = list(zip(fpr.tolist(), pro.tolist(), strict=True))
    return points


def save_curves(category: str, points: dict[str, Points]) -> None:
    """Write each kind's points to its file (mpad.layout.curve_file), atomically."""
    for kind, rows in points.items():
        write_csv(layout.curve_file(kind, category), CURVES[kind], [(f"{x:.6f}", f"{y:.6f}") for x, y in rows])


def read_xy(path: Path, x: str, y: str, delimiter: str = ",") -> Points:
    """The (x, y) columns, found by name in the header, of a curve file (an evaluate CSV: read_curve; a
    dvclive TSV: "step" and the metric); [] when the file is absent. ValueError naming the file when a
    column is missing."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not {x, y} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: expected columns {x} and {y}, found {reader.fieldnames}")
        return [(float(row[x]), float(row[y])) for row in reader]


def read_curve(kind: str, category: str, root: Path = Path(".")) -> Points:
    """The points of evaluate's `kind` curve of `category` under project `root`; [] when absent."""
    return read_xy(root / layout.curve_file(kind, category), *CURVES[kind])
