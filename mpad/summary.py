"""The metrics files: a category's `metrics/<category>.json` (evaluate) and the run's `metrics.json` (means
over categories and texture / object groups, categories left out of them, whether the weights were random)
with `metrics.md` (the paper's Table 1 layout: one column a category, then the mean). Their one owner."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mpad.config import RANDOM_WEIGHTS_NOTE
from mpad.io import read_json_object, write_json, write_text
from mpad.layout import METRICS_JSON

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


def save_category_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write a category's metrics file (evaluate; a DVC metrics file) atomically."""
    write_json(path, metrics)


def load_category_metrics(path: str | Path) -> dict[str, Any]:
    """A category's metrics file (written by evaluate); ValueError naming the file when missing or unreadable."""
    return read_json_object(path, ValueError, "metrics file")


def mean_metrics(per_category: Mapping[str, Mapping[str, Any]], categories: list[str]) -> dict[str, float]:
    """Mean of each metric over `categories` that report it (a metric missing or null in one, i.e. not
    measurable there, is averaged over the rest)."""
    out: dict[str, float] = {}
    for name in METRIC_ORDER:
        values = [float(per_category[c][name]) for c in categories if per_category.get(c, {}).get(name) is not None]
        if values:
            out[name] = round(sum(values) / len(values), 4)
    return out


def unmeasured(per_category: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """{category: why} for each category with a null metric (evaluate's `null_reason`)."""
    return {
        c: str(m.get("null_reason") or "some metrics are null")
        for c, m in per_category.items()
        if any(k in m and m[k] is None for k in METRIC_ORDER)
    }


def save_summary(
    per_category: Mapping[str, Mapping[str, Any]], groups: Mapping[str, str], json_path: Path, table_path: Path
) -> dict[str, Any]:
    """metrics.json (`summarize`, plus `random_weights`: whether any category's weights were random, and then
    the note once) and metrics.md (`markdown_table`), written atomically; returns the record."""
    summary: dict[str, Any] = summarize(per_category, groups)
    summary["random_weights"] = any(m.get("random_weights") for m in per_category.values())
    if summary["random_weights"]:
        summary["note"] = RANDOM_WEIGHTS_NOTE
    write_json(json_path, summary)
    write_text(table_path, markdown_table(per_category, summary, summary.get("note", "")))
    return summary


def summary_of(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics.json record among a run's metrics files ({path: values}, as `dvc exp show --json` lists
    them); {} when the run has none."""
    return dict(metrics.get(str(METRICS_JSON), {}) or {})


def group_means(record: Mapping[str, Any], group: str = "mean") -> dict[str, float] | None:
    """A metrics.json record's means over all categories ("mean") or a group ("texture", "object"); None
    when the record has none for it."""
    return record.get(group)


def unmeasured_of(record: Mapping[str, Any]) -> dict[str, str]:
    """{category: why} of a metrics.json record's categories left out of the means (null metrics)."""
    return dict(record.get("unmeasured", {}))


def random_weights_of(record: Mapping[str, Any]) -> bool:
    """Whether a metrics.json record's run used random weights."""
    return bool(record.get("random_weights"))


def summarize(per_category: Mapping[str, Mapping[str, Any]], groups: Mapping[str, str]) -> dict[str, object]:
    """{"mean": {...}, "texture": {...}, "object": {...}} from per-category metrics, plus {"unmeasured": {cat:
    why}} when a category has null metrics (left out of the means).

    groups: category -> "texture" | "object". A group with no category is left out. The per-category values
    are not copied here: metrics/<category>.json holds them, and a copy doubles `dvc exp show`'s columns and
    `dvc metrics diff`'s rows.
    """
    categories = list(per_category)
    summary: dict[str, object] = {"mean": mean_metrics(per_category, categories)}
    for group in ("texture", "object"):
        members = [c for c in categories if groups.get(c) == group]
        if members:
            summary[group] = mean_metrics(per_category, members)
    if missing := unmeasured(per_category):
        summary["unmeasured"] = missing
    return summary


def markdown_table(per_category: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any], note: str = "") -> str:
    """Rows = metrics, columns = categories then mean (as the paper's Table 1), values in % with 2 decimals.

    A null metric shows as "n/a"; its category's column is marked "(!)" and a line under the table says why.
    """
    categories = list(per_category)
    mean, missing = summary["mean"], summary.get("unmeasured", {})
    lines = []
    if note:
        lines += [f"> **{note}**", ""]
    lines.append("| Metric | " + " | ".join(f"{c} (!)" if c in missing else c for c in categories) + " | mean |")
    lines.append("|---" * (len(categories) + 2) + "|")
    for name in METRIC_ORDER:
        if name not in mean:
            continue
        cells = [_cell(per_category[c], name) for c in categories]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {mean[name]:.2f} |")
    lines += [
        f"\n(!) {c} cannot be fully measured: {why}; its n/a values are left out of the means."
        for c, why in missing.items()
    ]
    return "\n".join(lines) + "\n"


def _cell(metrics: Mapping[str, Any], name: str) -> str:
    """A value with 2 decimals; "n/a" when null (not measurable), "-" when absent."""
    if name not in metrics:
        return "-"
    return "n/a" if metrics[name] is None else f"{metrics[name]:.2f}"
