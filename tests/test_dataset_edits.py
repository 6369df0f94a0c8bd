"""Through DVC: a dataset edit re-runs exactly the stages and categories it touches, and a category with a
space in its name (`my part`) runs. The dataset is a user's folder tree outside the project, never a DVC dep.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from e2e import copy_project, preset_overrides, run, stages_ran

from mpad.data.synthetic import MARKER, generate


def _fingerprints(project: Path) -> dict[str, str]:
    files = sorted((project / "data" / "fingerprints").rglob("*.json"))
    return {f.relative_to(project).as_posix(): json.loads(f.read_text())["fingerprint"] for f in files}


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    """(project, dataset root): the offline preset on a folder dataset of categories `my part` and `disc`."""
    root = tmp_path / "parts"
    generate(root, seed=3, n_train=3, n_test=4)
    (root / MARKER).unlink()  # a user's tree now
    (root / "stripes").rename(root / "my part")
    shutil.rmtree(root / "weave")
    overrides = [
        *preset_overrides("offline"),
        "dataset.name=folder",
        f"dataset.root={root}",
        "dataset.categories=[my part, disc]",
        "dataset.textures=[my part]",
        "mpts.steps=2",
        "mpts.meta_epochs=1",
        "oagm.samples=4",
        "evaluate.overlays=1",
    ]
    return copy_project(tmp_path / "project", overrides), root


def test_dataset_edits_rerun_the_categories_and_splits_they_touch(project):
    project, root = project
    assert stages_ran(run(["dvc", "repro", "sample"], project)) == {"fetch", "sample@my part", "sample@disc"}
    assert json.loads((project / "data" / "shots" / "my part.json").read_text())["category"] == "my part"
    prints = _fingerprints(project)
    assert sorted(prints) == [f"data/fingerprints/{c}/{s}.json" for c in ("disc", "my part") for s in ("test", "train")]

    # nothing changed: fetch lists the dataset again (always), its outputs keep their bytes, nothing follows
    assert stages_ran(run(["dvc", "repro", "sample"], project)) == {"fetch"}
    assert _fingerprints(project) == prints

    # a new test image of `my part`: only that split's fingerprint changes; sample reads train only
    shutil.copy(root / "my part/test/good/000.png", root / "my part/test/good/100.png")
    assert stages_ran(run(["dvc", "repro", "sample"], project)) == {"fetch"}
    changed = {k for k, v in _fingerprints(project).items() if prints[k] != v}
    assert changed == {"data/fingerprints/my part/test.json"}

    # a replaced training image of disc (same name): sample@disc only
    prints = _fingerprints(project)
    shutil.copy(root / "disc/train/good/001.png", root / "disc/train/good/000.png")
    assert stages_ran(run(["dvc", "repro", "sample"], project)) == {"fetch", "sample@disc"}
    assert {k for k, v in _fingerprints(project).items() if prints[k] != v} == {"data/fingerprints/disc/train.json"}


@pytest.mark.slow
def test_a_category_with_a_space_runs_end_to_end_and_a_test_edit_reruns_its_evaluate(project):
    project, root = project
    output = run(["dvc", "repro"], project)
    assert stages_ran(output) == {"fetch", "summarize"} | {
        f"{s}@{c}" for s in ("sample", "synthesize", "train", "evaluate") for c in ("my part", "disc")
    }
    assert json.loads((project / "metrics" / "my part.json").read_text())["n_test"] == 4
    assert "| my part |" in (project / "metrics.md").read_text().replace("| my part (!) |", "| my part |")

    shutil.copy(root / "my part/test/good/000.png", root / "my part/test/good/100.png")
    assert stages_ran(run(["dvc", "repro"], project)) == {"fetch", "evaluate@my part", "summarize"}
    assert json.loads((project / "metrics" / "my part.json").read_text())["n_test"] == 5
    assert stages_ran(run(["dvc", "repro"], project)) == {"fetch"}
