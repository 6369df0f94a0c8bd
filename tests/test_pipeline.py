"""End to end: the offline preset through DVC in a temporary git copy of the project.

Checks that `dvc repro` makes every metric and plot, that an experiment re-runs exactly the stages its
param touches, that `dvc metrics diff` shows the change, and that a second `dvc repro` runs only fetch (which
re-lists the dataset on every run) and nothing after it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("stripes", "weave", "disc")
TRAIN_EVALUATE = {f"{s}@{c}" for s in ("train", "evaluate") for c in CATEGORIES}
PRODUCTS = ("data/", "metrics", "plots/", "dvclive/", "dvc.lock", "dvc_plots/", ".dvc/tmp", ".dvc/cache")


def preset_overrides(name: str) -> list[str]:
    lines = (ROOT / "presets" / f"{name}.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """`a.b=value` lines (value parsed as YAML, as `dvc exp run -S` does) applied to a params dict."""
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return params


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_EXP_NAME", None)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output


def stages_ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


# What this test checks is DVC's wiring (which stages run, metrics, experiments), not what training learns: the
# offline preset with 5 steps a meta-epoch instead of 50 and 8 synthesized images a shot instead of 32 (the
# preset's own numbers run through the stages in tests/test_precision.py): 15 optimiser steps in each of the 9
# trains instead of 150.
LIGHTER = ["mpts.steps=5", "oagm.samples=8"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git repository holding the project's files (tracked and new ones, not ignored), offline preset applied."""
    return copy_project(tmp_path_factory.mktemp("mpad") / "project", [*preset_overrides("offline"), *LIGHTER])


def copy_project(dest: Path, overrides: list[str]) -> Path:
    """A git repository at `dest` holding the project's files (tracked and new ones, not ignored), with
    params.yaml's `overrides` applied and committed."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for rel in filter(None, listed):
        if rel.startswith(PRODUCTS) and rel != "data/.gitignore":  # an earlier run's results in the workspace
            continue
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(apply_overrides(params, overrides)))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=dest, check=True)
    commit(dest, "project")
    return dest


def commit(repo: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", message],
        cwd=repo,
        check=True,
    )


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
