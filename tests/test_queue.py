"""Parallel experiments on one machine: `dvc exp run --queue` + `dvc queue start -j 2`. The queued runs happen in
temporary copies without the git-ignored dataset; they read the workspace's (mpad.workspace) and never make one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e import copy_project, preset_overrides, run

from mpad.config import DatasetConfig
from mpad.data import DatasetError
from mpad.data.prepare import prepare_dataset
from mpad.workspace import data_root, in_queued_copy

TINY = ["dataset.categories=[disc]", "mpts.steps=3", "mpts.meta_epochs=1", "oagm.samples=4", "evaluate.overlays=1"]


def _wait_for_queue(project: Path, timeout: float = 900) -> str:
    """`dvc queue status` once nothing is queued or running (the workers run in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        status = run(["dvc", "queue", "status"], project)
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(3)


@pytest.mark.slow
def test_two_queued_experiments_run_in_parallel_on_the_workspace_dataset(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project", [*preset_overrides("offline"), *TINY])
    run(["dvc", "repro", "fetch"], project)  # the workspace makes the dataset once
    marker = project / "data/synthetic/.mpad-synthetic"
    made = marker.stat().st_mtime_ns
    for name, lam in (("q-lambda-0", "0"), ("q-lambda-1", "1")):
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"mpts.lambda={lam}"], project)
    try:
        run(["dvc", "queue", "start", "-j", "2"], project)
        status = _wait_for_queue(project)
    finally:
        dvc = str(Path(sys.executable).parent / "dvc")  # the workers stop once idle; this makes sure
        subprocess.run([dvc, "queue", "stop"], cwd=project, capture_output=True, timeout=120)
    logs = run(["dvc", "queue", "logs", "q-lambda-0"], project)
    assert status.count("Success") == 2, status + logs
    # the copy's fetch found the workspace's dataset (DVC_ROOT) rather than generating one of its own
    assert "Running stage 'fetch'" in logs and "generated the synthetic dataset" not in logs

    shown = json.loads(run(["dvc", "exp", "show", "--json"], project))
    means = {}
    for row in shown:
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev.get("data") or {}
                metrics = (data.get("metrics") or {}).get("metrics.json", {}).get("data", {})
                if rev.get("name") in ("q-lambda-0", "q-lambda-1"):
                    means[rev["name"]] = metrics["mean"]["pixel_auroc"]
    assert set(means) == {"q-lambda-0", "q-lambda-1"} and means["q-lambda-0"] != means["q-lambda-1"]
    assert marker.stat().st_mtime_ns == made  # the workspace's dataset was read, not regenerated


def test_dataset_root_resolves_against_dvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace, copy = tmp_path / "ws", tmp_path / "ws/.dvc/tmp/exps/tmp1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert data_root("data/mvtec") == Path("data/mvtec") and not in_queued_copy()
    monkeypatch.setenv("DVC_ROOT", str(copy))  # a workspace run: DVC's root is the working directory
    assert data_root("data/mvtec") == Path("data/mvtec") and not in_queued_copy()
    monkeypatch.setenv("DVC_ROOT", str(workspace))  # what DVC sets for a queued experiment's stages
    assert in_queued_copy() and data_root("data/mvtec") == workspace / "data/mvtec"
    assert data_root("/srv/mvtec") == Path("/srv/mvtec")
    assert data_root("~/datasets/mvtec") == Path(os.path.expanduser("~/datasets/mvtec"))

    # a queued run never downloads: the workspace lacks the dataset, so it says where to make it
    config = DatasetConfig(name="mvtec", categories=["screw"], url="http://127.0.0.1:9/never.tar.xz")
    with pytest.raises(DatasetError, match=r"only reads the dataset; run `dvc repro fetch`"):
        prepare_dataset(config, Path("data/downloads"), print)
    assert not (workspace / "data").exists() and not (copy / "data").exists()
