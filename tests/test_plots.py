"""Offline pictures (mpad.plots) and the narrow experiment comparison (mpad.runs.experiments), from fixed inputs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from mpad import plots
from mpad.curves import CURVES
from mpad.plots import (
    CURVE_PANELS,
    TRAIN_PANELS,
    ablation_rows,
    ablation_spec,
    curve_panel_rows,
    line_panels,
    render_png,
    training_rows,
)
from mpad.runs.experiments import compare_table, experiments
from stages.cli import app

ABLATIONS = {  # name: (meta_epochs, lambda, oagm, attention, k, memory)
    "human-prompts": (0, 1.0, True, "vv", 2, False),
    "lambda-0": (3, 0, True, "vv", 2, False),
    "lambda-0.5": (3, 0.5, True, "vv", 2, False),
    "no-oagm": (3, 1, False, "vv", 2, False),
    "vv-att": (3, 1, True, "vv", 0, False),
    "qk-laa": (3, 1, True, "qk", 2, False),
    "memory": (3, 1, True, "vv", 2, True),
    "full": (3, 1, True, "vv", 2, False),
}


def _data(i: int, knobs: tuple, timestamp: str | None) -> dict:
    """An experiment's `data` as `dvc exp show --json` gives it; pixel AUROC stripes 50 + i, disc 60 + i."""
    epochs, lam, oagm, att, k, memory = knobs
    params = {
        "dataset": {"categories": ["stripes", "disc"], "url": "https://" + "x" * 100},
        "laa": {"attention": att, "k": k},
        "oagm": {"enabled": oagm},
        "memory": {"enabled": memory},
        "mpts": {"lambda": lam, "meta_epochs": epochs, "steps": 50},
    }
    per = {
        c: {"pixel_auroc": base + i, "aupro": 40.0, "random_weights": True}
        for c, base in (("stripes", 50.0), ("disc", 60.0))
    }
    mean = {"pixel_auroc": 55.0 + i, "aupro": 40.0, "pixel_f1_max": 12.345, "image_auroc": 99.999}
    return {
        "rev": "r",
        "timestamp": timestamp,
        "params": {"params.yaml": {"data": params}},
        "metrics": {
            "metrics/stripes.json": {"data": per["stripes"]},
            "metrics/disc.json": {"data": per["disc"]},
            "metrics.json": {"data": {"mean": mean, "random_weights": True, "note": "RANDOM..."}},
        },
        "deps": {"stages/train.py": {"hash": "md5"}},
    }


def exp_show() -> list[dict]:
    """Workspace, then a baseline without results whose experiments are listed newest first, one still running."""
    runs = [
        {
            "revs": [{"rev": f"{i:040x}", "name": name, "data": _data(i, knobs, f"2026-01-01T10:{i:02d}:00")}],
            "executor": None,
            "name": name,
        }
        for i, (name, knobs) in enumerate(ABLATIONS.items())
    ]
    running = {
        "revs": [{"rev": "workspace", "name": "wip", "data": _data(9, ABLATIONS["full"], None)}],
        "executor": {"state": "running"},
        "name": "wip",
    }
    no_results = {"metrics": {"metrics.json": {"error": {"type": "FileNotFoundError"}}}}
    return [
        {"rev": "workspace", "name": None, "data": _data(7, ABLATIONS["full"], None), "experiments": None},
        {"rev": "abc1234" + "0" * 33, "name": "main", "data": no_results, "experiments": [running] + runs[::-1]},
    ]


def test_experiments_in_run_order_without_workspace_running_or_empty_rows():
    rows = experiments(exp_show())
    assert [r["name"] for r in rows] == list(ABLATIONS)
    assert rows[1]["params"]["mpts.lambda"] == 0 and rows[6]["params"]["memory.enabled"] is True


def test_compare_table_fits_120_columns_and_shows_knobs_and_means():
    table = compare_table(experiments(exp_show()))
    lines = table.splitlines()
    assert max(map(len, lines)) <= 120, table
    assert lines[0].split() == [
        "experiment",
        "laa",
        "laa",
        "oagm",
        "memory",
        "mpts",
        "mpts",
        "Pixel",
        "AUPRO@0.3",
        "Pixel",
        "Image",
    ]
    assert lines[1].split() == [
        "attention",
        "k",
        "enabled",
        "enabled",
        "lambda",
        "meta_epochs",
        "AUROC",
        "F1-max",
        "AUROC",
    ]
    # unchanged params (steps, categories, the long url), deps and the note are not columns
    assert "steps" not in table and "url" not in table and "md5" not in table and "RANDOM..." not in table
    assert lines[3].split() == [
        "human-prompts*",
        "vv",
        "2",
        "true",
        "false",
        "1",
        "0",
        "55.00",
        "40.00",
        "12.35",
        "100.00",
    ]
    assert lines[5].split()[5] == "0.5"  # params as written; 1.0 (human-prompts) and 1 are the same value
    assert lines[6].split()[0] == "no-oagm*" and lines[6].split()[3] == "false" and lines[6].split()[7] == "58.00"
    assert lines[-1].startswith("* random weights")


def test_ablation_rows_are_per_category_pixel_auroc_per_experiment():
    rows = ablation_rows(exp_show())
    assert len(rows) == 2 * len(ABLATIONS)
    assert {"experiment": "lambda-0.5", "category": "disc", "value": 62.0} in rows
    assert {"experiment": "full", "category": "stripes", "value": 57.0} in rows
    spec = ablation_spec(rows)
    assert spec["layer"][0]["encoding"]["xOffset"]["sort"] == list(ABLATIONS)  # bars in run order


def _pixels(png: bytes, rgb: tuple[int, int, int]) -> int:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return int((pixels == rgb).all(axis=-1).sum())


def test_ablation_chart_renders_bars_as_tall_as_their_values(tmp_path):
    rows = [{"experiment": "a", "category": "x", "value": 90.0}, {"experiment": "b", "category": "x", "value": 30.0}]
    path = render_png(ablation_spec(rows), tmp_path / "chart.png")
    image = Image.open(path)
    assert image.format == "PNG" and 150 <= image.width <= 400 and 280 <= image.height <= 400
    # the default palette's first two colours fill the bars: 90 % is three times the area of 30 %
    a, b = _pixels(path.read_bytes(), (0x4C, 0x78, 0xA8)), _pixels(path.read_bytes(), (0xF5, 0x85, 0x18))
    assert b > 100 and 2.6 < a / b < 3.4


def test_curves_and_training_panels_from_the_pipeline_files(tmp_path):
    for kind, head in (("roc_pixel", "fpr,tpr"), ("roc_image", "fpr,tpr"), ("pro", "fpr,pro")):
        (tmp_path / "plots" / kind).mkdir(parents=True)
        (tmp_path / "plots" / kind / "disc.csv").write_text(f"{head}\n0.0,0.0\n0.25,0.75\n1.0,1.0\n")
    curves = curve_panel_rows(["disc", "absent"], tmp_path)
    assert len(curves) == 9 and {"panel": "ROC, image level", "category": "disc", "x": 0.25, "y": 0.75} in curves
    folder = tmp_path / "dvclive" / "train" / "disc" / "plots" / "metrics"
    folder.mkdir(parents=True)
    for name in TRAIN_PANELS:
        (folder / f"{name}.tsv").write_text(f"step\t{name}\n0\t0.5\n1\t-0.25\n")
    train = training_rows(["disc"], tmp_path)
    assert line_panels(train, "step", "value", "t")["facet"]["sort"] == list(TRAIN_PANELS.values())  # not a-z
    assert len(train) == 8 and {"panel": TRAIN_PANELS["cos"], "category": "disc", "x": 1.0, "y": -0.25} in train
    image = Image.open(render_png(line_panels(train, "step", "value", "t"), tmp_path / "training.png", scale=2))
    assert image.width >= 2 * 2 * 300 and image.height >= 2 * 2 * 200  # 2 x 2 panels of 300 x 200, at scale 2


def test_make_plots_draws_the_params_categories_and_the_experiments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text("dataset:\n  name: synthetic\n  categories: [disc]\n")
    for category in ("disc", "dropped"):  # metrics/ and plots/ keep files of categories dropped since
        for kind in CURVE_PANELS:
            Path("plots", kind).mkdir(parents=True, exist_ok=True)
            Path("plots", kind, f"{category}.csv").write_text(",".join(CURVES[kind]) + "\n0.0,0.0\n1.0,1.0\n")
    Path("exp.json").write_text(json.dumps(exp_show()))
    drawn = {}
    monkeypatch.setattr(plots, "render_png", lambda spec, path: drawn.setdefault(path.name, spec) and path)
    result = CliRunner().invoke(app, ["plots", "--experiments", "exp.json", "--out", "figs"])
    assert result.exit_code == 0, result.output
    assert set(drawn) == {"curves.png", "ablation_pixel_auroc.png"}  # no dvclive folder: no training.png
    assert {r["category"] for r in drawn["curves.png"]["data"]["values"]} == {"disc"}
    assert len(drawn["ablation_pixel_auroc.png"]["data"]["values"]) == 2 * len(ABLATIONS)
    assert "wrote figs/curves.png" in result.output
    Path("params.yaml").write_text("dataset:\n  name: synthetic\n  categories: null\n")  # validated, as DVC needs
    result = CliRunner().invoke(app, ["plots", "--out", "figs"])
    assert result.exit_code == 1 and "dataset.categories = None: must be a non-empty list" in result.output
