"""Pictures of the results that open without a browser or network: PNG files (`make plots`).

`dvc plots show` writes an HTML page that loads vega from a CDN, so its curves stay blank on an offline
inspection PC. Here the same data become Vega-Lite specs rendered to PNG by vl-convert (Rust, with the
vega JS bundled: no browser, no network). Data building is pure and tested; `render_png` draws.

`mpad plots [--experiments exp.json] [--out figures]` (stages/plots.py; `make plots`) writes figures/curves.png
(ROC pixel, ROC image, PRO), figures/training.png (loss_ano, loss_div,
cos(G_ano, G_div), share of calibrated steps) with one line per category, and, given `dvc exp show --json`
output, figures/ablation_pixel_auroc.png (per-category pixel AUROC across experiments), and, given `make sweep`'s
sweep.json, figures/sweep.png (mean over seeds with a +- 1 standard deviation bar, per k and category, a panel
per metric).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mpad import layout
from mpad.curves import read_curve, read_xy
from mpad.runs.experiments import arms, experiments
from mpad.runs.tables import mean_std
from mpad.summary import LABELS

CURVE_PANELS = {"roc_pixel": "ROC, pixel level", "roc_image": "ROC, image level", "pro": "PRO (per-region overlap)"}
TRAIN_PANELS = {
    "loss_ano": "loss_ano (BCE, eq. 4-5)",
    "loss_div": "loss_div (KL to the meta prompt, eq. 6-7)",
    "cos": "cos(G_ano, G_div)",
    "calibrated_fraction": "share of calibrated steps so far (cos < 0)",
}
SCHEMA = "https://vega.github.io/schema/vega-lite/v5.json"


def curve_panel_rows(categories: Iterable[str], root: Path = Path(".")) -> list[dict[str, Any]]:
    """Long-form rows {panel, category, x, y} of evaluate's ROC and PRO curves (mpad.curves reads them)."""
    return [
        {"panel": title, "category": c, "x": x, "y": y}
        for kind, title in CURVE_PANELS.items()
        for c in categories
        for x, y in read_curve(kind, c, root)
    ]


def training_rows(categories: Iterable[str], root: Path = Path(".")) -> list[dict[str, Any]]:
    """Long-form rows {panel, category, x (step), y} of train's dvclive curves."""
    return [
        {"panel": title, "category": c, "x": x, "y": y}
        for name, title in TRAIN_PANELS.items()
        for c in categories
        for x, y in read_xy(root / layout.train_curves_dir(c) / "plots" / "metrics" / f"{name}.tsv", "step", name, "\t")
    ]


def line_panels(rows: list[dict[str, Any]], x_title: str, y_title: str, title: str, columns: int = 2) -> dict[str, Any]:
    """One panel per `panel` value (in the rows' order, own scales), one coloured line per category."""
    panels = list(dict.fromkeys(r["panel"] for r in rows))
    return {
        "$schema": SCHEMA,
        "title": title,
        "data": {"values": rows},
        "columns": columns,
        "facet": {"field": "panel", "type": "nominal", "title": None, "sort": panels},
        "spec": {
            "width": 300,
            "height": 200,
            "mark": {"type": "line", "interpolate": "linear"},
            "encoding": {
                "x": {"field": "x", "type": "quantitative", "title": x_title},
                "y": {"field": "y", "type": "quantitative", "title": y_title},
                "color": {"field": "category", "type": "nominal"},
            },
        },
        "resolve": {"scale": {"y": "independent", "x": "independent"}},
    }


def ablation_rows(exp_show: list[dict[str, Any]], metric: str = "pixel_auroc") -> list[dict[str, Any]]:
    """{experiment, category, value} of `metric` from each experiment's metrics/<category>.json (null: left out).

    An arm run at several seeds (`make ablations SEEDS=...`, mpad.runs.experiments.arms) is one entry named after the
    arm: value = the mean over its runs, plus lo / hi = value -+ their sample standard deviation."""
    out = []
    for arm in arms(experiments(exp_show)):
        name = arm["name"] if len(arm["runs"]) > 1 else arm["runs"][0]["name"]
        for path in dict.fromkeys(p for r in arm["runs"] for p in r["metrics"] if p.startswith("metrics/")):
            values = [float(v) for r in arm["runs"] if (v := r["metrics"].get(path, {}).get(metric)) is not None]
            if values:
                mean, std = mean_std(values)
                row = {"experiment": name, "category": Path(path).stem, "value": mean}
                out.append(row if std is None else row | {"lo": mean - std, "hi": mean + std})
    return out


def ablation_spec(rows: list[dict[str, Any]], metric: str = "pixel_auroc") -> dict[str, Any]:
    """Grouped bars: a group per category, a bar per experiment (in run order), as the paper's Tables 2-4; a
    +- 1 standard deviation line on the bar of an arm run at several seeds. With xOffset, the width step is per
    bar: 12 px."""
    order = list(dict.fromkeys(r["experiment"] for r in rows))
    label = LABELS.get(metric, metric)
    x = {"field": "category", "type": "nominal", "title": None, "axis": {"labelAngle": 0}}
    offset = {"field": "experiment", "sort": order}
    bars = {
        "mark": "bar",
        "encoding": {
            "x": x,
            "xOffset": offset,
            "y": {"field": "value", "type": "quantitative", "title": f"{label} (%)"},
            "color": {"field": "experiment", "type": "nominal", "sort": order},
            "tooltip": [{"field": "experiment"}, {"field": "value", "format": ".2f"}],
        },
    }
    spread = {
        "mark": {"type": "rule", "color": "black"},
        "transform": [{"filter": "isValid(datum.lo)"}],
        "encoding": {"x": x, "xOffset": offset, "y": {"field": "lo", "type": "quantitative"}, "y2": {"field": "hi"}},
    }
    return {
        "$schema": SCHEMA,
        "title": f"{label} (%) per category, a bar per experiment",
        "data": {"values": rows},
        "width": {"step": 12},
        "height": 260,
        "layer": [bars, spread] if any("lo" in r for r in rows) else [bars],
    }


def sweep_rows(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """{metric (label), row (a category, "texture mean", "object mean" or "mean"), k, mean, lo, hi, n} of sweep.json;
    lo / hi = mean -+ the standard deviation over seeds (the mean itself with one seed); unmeasurable left out."""
    labels = {"texture": "texture mean", "object": "object mean"}
    order = [*sweep["textures"], "texture", *sweep["objects"], "object", "mean"]  # the file's keys are sorted
    out = []
    for k in sweep["shots"]:
        rows = sweep["k"][str(k)]
        for row in (r for r in order if r in rows):
            for metric, s in rows[row].items():
                if s["mean"] is not None:
                    mean, std = s["mean"], s["std"] or 0.0
                    out.append(
                        {
                            "metric": LABELS.get(metric, metric),
                            "row": labels.get(row, row),
                            "k": k,
                            "mean": mean,
                            "lo": mean - std,
                            "hi": mean + std,
                            "n": s["n"],
                        }
                    )
    return out


def sweep_spec(rows: list[dict[str, Any]], title: str) -> dict[str, Any]:
    """A panel per metric: per k (x), a point per row (category or mean, side by side) at the mean over seeds
    with a bar from mean - std to mean + std."""
    order = list(dict.fromkeys(r["row"] for r in rows))
    x = {"field": "k", "type": "ordinal", "title": "shots (k)", "axis": {"labelAngle": 0}}
    offset = {"field": "row", "sort": order}
    color = {"field": "row", "type": "nominal", "sort": order, "title": None}
    return {
        "$schema": SCHEMA,
        "title": title,
        "data": {"values": rows},
        "facet": {"column": {"field": "metric", "type": "nominal", "title": None, "sort": list(LABELS.values())}},
        "spec": {
            "width": {"step": 12},  # per point (xOffset)
            "height": 220,
            "layer": [
                {
                    "mark": {"type": "rule"},
                    "encoding": {
                        "x": x,
                        "xOffset": offset,
                        "y": {"field": "lo", "type": "quantitative", "scale": {"zero": False}},
                        "y2": {"field": "hi"},
                        "color": color,
                    },
                },
                {
                    "mark": {"type": "point", "filled": True, "size": 30},
                    "encoding": {
                        "x": x,
                        "xOffset": offset,
                        "y": {
                            "field": "mean",
                            "type": "quantitative",
                            "scale": {"zero": False},
                            "title": "% (mean ± std over seeds)",
                        },
                        "color": color,
                        "tooltip": [{"field": "row"}, {"field": "k"}, {"field": "mean", "format": ".2f"}],
                    },
                },
            ],
        },
        "resolve": {"scale": {"y": "independent"}},
    }


def render_png(spec: dict[str, Any], path: Path, scale: float = 1.0) -> Path:
    """Vega-Lite spec -> PNG file (vl-convert: bundled vega, no browser, no network)."""
    import vl_convert  # only here: the data functions need no renderer

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(vl_convert.vegalite_to_png(spec, scale=scale))
    return path
