"""A team's shared runs, offline: machine A runs the pipeline and an experiment and pushes them (git to a
local bare repository, cached outputs to a local DVC remote); machine B clones, pulls, compares and predicts
with the pulled prompts without running a stage (B never even has the dataset)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from e2e import commit, copy_project, preset_overrides, run, stages_ran

TINY = ["dataset.categories=[disc]", "mpts.steps=3", "mpts.meta_epochs=1", "oagm.samples=4", "evaluate.overlays=1"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_experiments_pushed_from_one_machine_are_pulled_compared_and_used_on_another(tmp_path: Path) -> None:
    origin, store = tmp_path / "origin.git", tmp_path / "dvc-store"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    a = copy_project(tmp_path / "a", [*preset_overrides("offline"), *TINY])
    run(["dvc", "remote", "add", "-d", "store", str(store)], a)
    run(["git", "remote", "add", "origin", str(origin)], a)

    # machine A: the baseline, committed (git: dvc.lock, metrics, plots) and pushed (DVC remote: cached outputs)
    run(["dvc", "repro"], a)
    commit(a, "baseline")
    run(["dvc", "push"], a)
    run(["git", "push", "-q", "origin", "HEAD"], a)
    run(["dvc", "exp", "run", "-n", "half", "-S", "mpts.lambda=0.5"], a)
    half_prompts, half_metrics = _sha(a / "data/prompts/disc.pt"), json.loads((a / "metrics.json").read_text())
    run(["dvc", "exp", "push", "origin", "half"], a)  # the experiment's git ref and its cached outputs

    # machine B: clone, pull the baseline's and the experiment's outputs
    b = tmp_path / "b"
    subprocess.run(["git", "clone", "-q", str(origin), str(b)], check=True)
    run(["dvc", "pull"], b)
    run(["dvc", "exp", "pull", "origin", "half"], b)
    assert (b / "data/prompts/disc.pt").is_file() and not (b / "data/synthetic").exists()  # no dataset here

    shown = json.loads(run(["dvc", "exp", "show", "--json"], b))
    names = {e["name"] for row in shown for e in row.get("experiments") or [] for e in e["revs"]}
    assert "half" in names
    diff = json.loads(run(["dvc", "metrics", "diff", "--json", "HEAD", "half"], b))
    changed = diff["metrics.json"]
    assert changed["mean.pixel_auroc"]["new"] == half_metrics["mean"]["pixel_auroc"]
    assert changed["mean.pixel_auroc"]["diff"] != 0

    run(["dvc", "exp", "apply", "half"], b)  # its params, metrics and (from the pulled cache) its prompts
    assert _sha(b / "data/prompts/disc.pt") == half_prompts
    # every cached or git-tracked output is there and up to date (the training curves too: they are in the
    # experiment's commit); what status lists is fetch, which re-lists the dataset on every run
    assert json.loads(run(["dvc", "status", "--json"], b)) == {"fetch": ["always changed"]}

    image = next((b / "data/synth/disc/images").glob("*.png"))  # a pulled synthesized image
    output = run(["mpad", "predict", "--prompts", "data/prompts/disc.pt", str(image), "--out", "inspected"], b)
    assert not stages_ran(output)
    made = json.loads((b / "inspected/predictions.json").read_text())
    assert made["category"] == "disc" and (made["n_images"], made["n_failed"]) == (1, 0)
    assert made["predictions"][0]["status"] == "ok" and 0.0 <= made["predictions"][0]["image_score"] <= 1.0
