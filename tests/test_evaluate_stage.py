"""Stage `evaluate` through the CLI: outputs from a prompts file, and the errors a user meets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from e2e import TINY_MODEL, write_params
from tiny_records import meta_prompts
from typer.testing import CliRunner

from mpad.config import ScoringConfig
from mpad.data.synthetic import generate
from mpad.thresholds import load_thresholds, scoring_of
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {
    "dataset": {"root": "ds"},
    "model": TINY_MODEL,
    "scoring": {"smoothing_sigma": 1.0, "image_score": "max", "topk": 0.01},
    "evaluate": {"resolution": 48, "batch_size": 4, "workers": 0, "overlays": 3},
}


@pytest.fixture
def project(workdir, tiny_clip):
    generate(workdir / "ds", seed=0, n_train=2, n_test=6)
    write_params(workdir, PARAMS)
    meta_prompts(tiny_clip).save(workdir / "data" / "prompts" / "disc.pt")
    return workdir


def test_evaluate_writes_metrics_curves_thresholds_overlays(project):
    result = CliRunner().invoke(app, ["evaluate", "--category", "disc"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((project / "metrics" / "disc.json").read_text())
    assert metrics["n_test"] == 6 and metrics["n_defect"] == 3 and metrics["random_weights"] is True
    assert {"pixel_auroc", "aupro", "image_auroc", "pixel_f1_max", "image_ap"} <= set(metrics)
    assert all(0 <= metrics[k] <= 100 for k in ("pixel_auroc", "aupro", "image_auroc"))
    thresholds = json.loads((project / "data" / "thresholds" / "disc.json").read_text())
    assert thresholds["resolution"] == 48 and thresholds["map_low"] < thresholds["map_high"]
    assert thresholds["category"] == "disc" and thresholds["smoothing_sigma"] == 1.0  # predict checks / reuses them
    assert 0 <= thresholds["image_threshold"] <= 1
    overlays = sorted(p.name for p in (project / "plots" / "overlays" / "disc").glob("*.png"))
    assert len(overlays) == 3 and overlays[-1].startswith("02_")
    assert (project / "plots" / "pro" / "disc.csv").read_text().startswith("fpr,pro\n")


def test_missing_prompts_file_is_named(project):
    (project / "data" / "prompts" / "disc.pt").unlink()
    result = CliRunner().invoke(app, ["evaluate", "--category", "disc"])
    assert result.exit_code == 1 and "data/prompts/disc.pt: prompts file not found" in result.output


def test_prompts_of_another_backbone_are_refused(project, tiny_clip):
    other = meta_prompts(tiny_clip)
    dataclasses.replace(other, model={**other.model, "name": "ViT-B-16"}).save(project / "data/prompts/disc.pt")
    result = CliRunner().invoke(app, ["evaluate", "--category", "disc"])
    assert result.exit_code == 1 and "name 'ViT-B-16' vs 'mpad-tiny'" in " ".join(result.output.split())


def test_missing_params_are_named(project):
    write_params(project, {k: v for k, v in PARAMS.items() if k != "scoring"})
    result = CliRunner().invoke(app, ["evaluate", "--category", "disc"])
    assert result.exit_code == 1 and "section 'scoring' missing" in result.output


def test_outputs_match_the_library_records(project):
    assert CliRunner().invoke(app, ["evaluate", "--category", "disc"]).exit_code == 0
    thresholds = load_thresholds(project / "data" / "thresholds" / "disc.json")
    assert scoring_of(thresholds) == ScoringConfig(smoothing_sigma=1.0, image_score="max", topk=0.01)
    assert thresholds["pixel_threshold"] >= thresholds["map_low"]
    names = sorted(p.name for p in (project / "plots" / "overlays" / "disc").glob("*.png"))
    defects = [name.split("_", 1)[1].rsplit("_", 1)[0] for name in names]
    assert defects == ["missing_piece", "scratch", "stain"]  # one per defect type, sorted, before any good one


def test_split_without_defects_gives_nulls_and_a_warning(project):
    for folder in (project / "ds" / "disc" / "test").iterdir():
        if folder.name != "good":
            for image in folder.iterdir():
                image.unlink()
    result = CliRunner().invoke(app, ["evaluate", "--category", "disc"])
    assert result.exit_code == 0, result.output
    assert "warning: disc cannot be fully measured: pixel metrics" in result.stderr
    metrics = json.loads((project / "metrics" / "disc.json").read_text())
    assert metrics["n_defect"] == 0 and metrics["pixel_auroc"] is None and metrics["image_auroc"] is None
    assert metrics["null_reason"].endswith("image metrics: the test split holds no defect image")
    assert (project / "plots" / "roc_image" / "disc.csv").read_text() == "fpr,tpr\n"


def test_on_the_cpu_the_stage_decodes_in_threads_whatever_workers_says(project, monkeypatch):
    """evaluate.workers 2 with the model on the CPU: no DataLoader process, whose decoding would take cores from
    the model's threads; the images are decoded in threads between batches (workers 0 to run_detector)."""
    import stages.evaluate

    seen, real = [], stages.evaluate.run_detector
    monkeypatch.setattr(stages.evaluate, "run_detector", lambda *args: seen.append(args[4]) or real(*args))
    write_params(project, {**PARAMS, "evaluate": {**PARAMS["evaluate"], "workers": 2}})
    assert CliRunner().invoke(app, ["evaluate", "--category", "disc"]).exit_code == 0
    assert seen == [0]
