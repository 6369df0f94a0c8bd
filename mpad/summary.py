"""Means over categories and the paper's Table 1 layout (one column a category, then the mean)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRIC_ORDER = ("pixel_auroc", "aupro", "pixel_f1_max", "pixel_ap", "image_auroc", "image_f1_max", "image_ap")
LABELS = {
    "pixel_auroc": "Pixel AUROC",
    "aupro": "AUPRO@0.3",
    "pixel_f1_max": "Pixel F1-max",
    "pixel_ap": "Pixel AP",
    "image_auroc": "Image AUROC",
    "image_f1_max": "Image F1-max",
    "image_ap": "Image AP",
}


def load_category_metrics(path: str | Path) -> dict[str, Any]:
    """A category's metrics file (written by evaluate); ValueError naming the file when missing or unreadable."""
    try:
        metrics = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: missing or unreadable ({err})") from None
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: not a metrics file (a JSON object)")
    return metrics


def mean_metrics(per_category: Mapping[str, Mapping[str, float]], categories: list[str]) -> dict[str, float]:
    """Mean of each metric over `categories` that report it (a metric missing in one is averaged over the rest)."""
    out: dict[str, float] = {}
    for name in METRIC_ORDER:
        values = [float(per_category[c][name]) for c in categories if name in per_category.get(c, {})]
        if values:
            out[name] = round(sum(values) / len(values), 4)
    return out


def summarize(per_category: Mapping[str, Mapping[str, float]], groups: Mapping[str, str]) -> dict[str, object]:
    """{"mean": {...}, "texture": {...}, "object": {...}, "categories": {cat: {...}}} from per-category metrics.

    groups: category -> "texture" | "object". A group with no category is left out.
    """
    categories = list(per_category)
    summary: dict[str, object] = {"mean": mean_metrics(per_category, categories)}
    for group in ("texture", "object"):
        members = [c for c in categories if groups.get(c) == group]
        if members:
            summary[group] = mean_metrics(per_category, members)
    summary["categories"] = {
        c: {k: per_category[c][k] for k in METRIC_ORDER if k in per_category[c]} for c in categories
    }
    return summary


def markdown_table(
    per_category: Mapping[str, Mapping[str, float]], summary: Mapping[str, object], note: str = ""
) -> str:
    """Rows = metrics, columns = categories then mean (as the paper's Table 1), values in % with 2 decimals."""
    categories = list(per_category)
    mean = summary["mean"]
    lines = []
    if note:
        lines += [f"> **{note}**", ""]
    lines.append("| Metric | " + " | ".join(categories) + " | mean |")
    lines.append("|---" * (len(categories) + 2) + "|")
    for name in METRIC_ORDER:
        if name not in mean:
            continue
        cells = [f"{per_category[c][name]:.2f}" if name in per_category[c] else "-" for c in categories]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {mean[name]:.2f} |")
    return "\n".join(lines) + "\n"
