"""Stage `summarize`: means over categories and groups from the metrics files; errors name the file."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from mpad.data.manifest import save_manifest
from stages.cli import app


def test_summarize_means_and_missing_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({"dataset": {"categories": ["a", "b", "c"]}}))
    save_manifest(
        "data/manifest.json",
        {
            "name": "folder",
            "root": "x",
            "categories": {"a": {"group": "texture"}, "b": {"group": "object"}, "c": {"group": "object"}},
        },
    )
    Path("metrics").mkdir()
    for name, value in (("a", 90.0), ("b", 70.0), ("c", 60.0)):
        Path(f"metrics/{name}.json").write_text(json.dumps({"pixel_auroc": value, "random_weights": True}))
    result = CliRunner().invoke(app, ["summarize"])
    assert result.exit_code == 0, result.output
    summary = json.loads(Path("metrics.json").read_text())
    assert summary["mean"]["pixel_auroc"] == 73.3333 and summary["texture"]["pixel_auroc"] == 90.0
    assert summary["object"]["pixel_auroc"] == 65.0 and summary["random_weights"] is True
    assert "RANDOM WEIGHTS" in summary["note"]  # the note once here, not in the category files
    assert "| Pixel AUROC | 90.00 | 70.00 | 60.00 | 73.33 |" in Path("metrics.md").read_text()
    Path("metrics/c.json").unlink()
    result = CliRunner().invoke(app, ["summarize"])
    assert result.exit_code == 1 and "metrics/c.json: not a readable metrics file" in result.output
    assert "run the evaluate stage" in result.output


def test_unmeasurable_category_is_marked_and_left_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({"dataset": {"categories": ["a", "b"]}}))
    save_manifest(
        "data/manifest.json",
        {"name": "folder", "root": "x", "categories": {"a": {"group": "texture"}, "b": {"group": "object"}}},
    )
    Path("metrics").mkdir()
    Path("metrics/a.json").write_text(json.dumps({"pixel_auroc": 90.0, "image_auroc": 80.0}))
    Path("metrics/b.json").write_text(
        json.dumps({"pixel_auroc": None, "image_auroc": None, "null_reason": "image metrics: no defect image"})
    )
    result = CliRunner().invoke(app, ["summarize"])
    assert result.exit_code == 0, result.output
    assert "warning: b cannot be fully measured (image metrics: no defect image)" in result.stderr
    summary = json.loads(Path("metrics.json").read_text())
    assert summary["mean"] == {"pixel_auroc": 90.0, "image_auroc": 80.0} and "object" in summary
    assert summary["object"] == {} and summary["unmeasured"] == {"b": "image metrics: no defect image"}
    table = Path("metrics.md").read_text()
    assert "| Pixel AUROC | 90.00 | n/a | 90.00 |" in table and "(!) b cannot be fully measured" in table
