"""End to end: the offline preset through DVC in a temporary git copy of the project.

Checks that `dvc repro` makes every metric and plot, that an experiment re-runs exactly the stages its
param touches, that `dvc metrics diff` shows the change, and that a second `dvc repro` runs only fetch (which
re-lists the dataset on every run) and nothing after it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e import CATEGORIES, TRAIN_EVALUATE, commit, copy_project, preset_overrides, run, stages_ran

# What this test checks is DVC's wiring (which stages run, metrics, experiments), not what training learns: the
# offline preset with 5 steps a meta-epoch instead of 50 and 8 synthesized images a shot instead of 32 (the
# preset's own numbers run through the stages in tests/test_precision.py): 15 optimiser steps in each of the 9
# trains instead of 150.
LIGHTER = ["mpts.steps=5", "oagm.samples=8"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git repository holding the project's files (tracked and new ones, not ignored), offline preset applied."""
    return copy_project(tmp_path_factory.mktemp("mpad") / "project", [*preset_overrides("offline"), *LIGHTER])


@pytest.mark.slow
def test_offline_pipeline_end_to_end(project):
    output = run(["dvc", "repro"], project)
    expected = {"fetch", "summarize"} | {
        f"{s}@{c}" for s in ("sample", "synthesize", "train", "evaluate") for c in CATEGORIES
    }
    assert stages_ran(output) == expected

    summary = json.loads((project / "metrics.json").read_text())
    assert summary["random_weights"] is True and "RANDOM WEIGHTS" in summary["note"]
    for key in ("pixel_auroc", "image_auroc", "aupro", "pixel_f1_max", "pixel_ap", "image_ap", "image_f1_max"):
        assert 0.0 <= summary["mean"][key] <= 100.0, key
    assert set(summary) == {"mean", "texture", "object", "random_weights", "note"}
    table = (project / "metrics.md").read_text()
    assert "| Metric | stripes | weave | disc | mean |" in table and "RANDOM WEIGHTS" in table
    for category in CATEGORIES:
        per = json.loads((project / "metrics" / f"{category}.json").read_text())
        assert per["n_test"] == 12 and per["random_weights"] is True and "note" not in per  # note: metrics.json
        for level in ("pixel", "image"):
            roc = (project / "plots" / f"roc_{level}" / f"{category}.csv").read_text().splitlines()
            assert roc[0] == "fpr,tpr" and roc[1] == "0.000000,0.000000" and roc[-1] == "1.000000,1.000000"
        assert len(list((project / "plots" / "overlays" / category).glob("*.png"))) >= 3
        assert (project / "data" / "prompts" / f"{category}.pt").is_file()
        assert list((project / "dvclive" / "train" / category / "plots" / "metrics").glob("*.tsv"))
    commit(project, "baseline results")

    # an MPTS knob re-runs train, evaluate, summarize only (and fetch, which re-lists the dataset every time)
    output = run(["dvc", "exp", "run", "-n", "lambda-half", "-S", "mpts.lambda=0.5"], project)
    assert stages_ran(output) == {"fetch", "summarize"} | TRAIN_EVALUATE
    diff = run(["dvc", "metrics", "diff", "--json"], project)
    changed = json.loads(diff)
    assert "metrics.json" in changed and any("pixel_auroc" in key for key in changed["metrics.json"])
    lambda_half = json.loads((project / "metrics.json").read_text())

    # an LAA knob re-runs train (its features come from the encoder) and what follows, not synthesize
    output = run(["dvc", "exp", "run", "-S", "laa.k=1"], project)
    assert stages_ran(output) == {"fetch", "summarize"} | TRAIN_EVALUATE

    # nothing changed: only fetch runs (its outputs keep their bytes)
    output = run(["dvc", "repro"], project)
    assert stages_ran(output) == {"fetch"}

    # going back to an experiment restores its results and leaves the dataset alone
    marker = project / "data" / "synthetic" / ".mpad-synthetic"
    assert marker.is_file()
    assert json.loads((project / "metrics.json").read_text()) != lambda_half
    run(["dvc", "exp", "apply", "lambda-half"], project)
    assert marker.is_file() and (project / "data" / "synthetic" / "disc" / "test").is_dir()
    assert json.loads((project / "metrics.json").read_text()) == lambda_half
