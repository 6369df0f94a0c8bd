"""`make run JOBS=N` / `make offline JOBS=N` (mpad/runs/units.py, the local backend of mpad/runs/local.py): per-category
`dvc repro` processes in parallel."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from e2e import ROOT, copy_project, preset_overrides, run

from mpad import layout
from mpad.runs import dispatch, guard
from mpad.runs.units import category_chains, makespan, next_category, visible_gpus, work_units, worker_env

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# The offline preset, cut to what still runs every stage of two categories (a texture and an object).
REDUCED = {
    "dataset.categories": "[stripes,disc]",
    "dataset.textures": "[stripes]",
    "mpts.steps": "4",
    "mpts.meta_epochs": "2",
    "oagm.samples": "4",
    "evaluate.overlays": "1",
}


def test_chains_are_the_matrix_stages_of_each_category_in_dependency_order():
    listed = ["fetch", "sample@a", "sample@my part", "train@a", "train@my part", "summarize"]
    assert category_chains(listed) == {"a": ["sample@a", "train@a"], "my part": ["sample@my part", "train@my part"]}
    # `--single-item` runs the targets in the order given: dvc.yaml's, where each stage reads the one before
    matrix = [name for name, spec in STAGES.items() if "matrix" in spec]
    assert matrix == ["sample", "synthesize", "train", "evaluate"]
    c = "${item.category}"
    outs = [layout.shots_file(c), layout.synth_dir(c), layout.prompts_file(c)]
    for stage, previous_out in zip(matrix[1:], outs, strict=True):
        assert previous_out.as_posix() in STAGES[stage]["deps"], stage
    assert [name for name, spec in STAGES.items() if "matrix" not in spec] == ["fetch", "summarize"]


def test_each_worker_gets_its_share_of_the_cores_and_its_own_gpu():
    base = {"PATH": "/bin"}
    assert worker_env(0, 2, 16, [], base) == {"PATH": "/bin", "OMP_NUM_THREADS": "8"}
    assert worker_env(1, 4, 2, ["0"], base)["OMP_NUM_THREADS"] == "1"  # never 0 threads
    assert "CUDA_VISIBLE_DEVICES" not in worker_env(1, 2, 8, ["3"], base)  # one GPU: all workers share it
    assert [worker_env(s, 3, 8, ["2", "5"], base)["CUDA_VISIBLE_DEVICES"] for s in range(3)] == ["2", "5", "2"]
    if not glob.glob("/dev/nvidia[0-9]*"):  # no NVIDIA device: no GPU, and torch is not even asked
        assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == []
    # torch takes its thread count from OMP_NUM_THREADS
    probe = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    env = worker_env(0, 2, 2, [], os.environ)
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == "1"


FAKE_STAGES = "fetch sample@ok sample@bad sample@fine train@ok train@bad train@fine summarize"
FAKE_DVC = f"""#!/bin/sh
echo "$*" >> calls.txt
case "$*" in
  "stage list --name-only") for s in {FAKE_STAGES}; do echo $s; done ;;
  *@bad*) echo "ERROR: failed to reproduce 'sample@bad'"; exit 1 ;;
  *) echo "OMP_NUM_THREADS=$OMP_NUM_THREADS" ;;
esac
"""


def test_a_failed_category_lets_the_others_finish_and_is_named_with_its_log(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text(FAKE_DVC)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    monkeypatch.setattr(guard, "CHECK", ["true"])  # params.yaml is mpad check's (tests/test_runs_*.py)
    assert dispatch.dispatch("run", tmp_path, jobs="2") == 1
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[:2] == ["stage list --name-only", "repro fetch"]
    units = [
        f"--wait-for-lock repro --single-item {stage}@{c}" for stage in ("sample", "train") for c in ("ok", "fine")
    ]
    assert sorted(calls[2:]) == sorted([*units, "--wait-for-lock repro --single-item sample@bad"])
    # every category ran up to its failure, bad's train did not, and summarize did not
    err = capsys.readouterr().err
    assert "1 of 3 categories failed" in err and "bad: see logs/repro/bad.log" in err
    assert "failed to reproduce 'sample@bad'" in (tmp_path / "logs/repro/bad.log").read_text()
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert (tmp_path / "logs/repro/ok.log").read_text() == f"OMP_NUM_THREADS={threads}\n" * 2  # both units, appended


def test_units_are_the_training_stages_then_the_last():
    chain = ["sample@a", "synthesize@a", "train@a", "evaluate@a"]
    assert work_units(chain) == [["sample@a", "synthesize@a", "train@a"], ["evaluate@a"]]
    assert work_units(["sample@a"]) == [["sample@a"]]


def test_a_free_worker_takes_the_category_with_the_most_units_left_then_the_first_listed():
    units = {"a": [1, 2], "b": [1, 2], "c": [1, 2]}
    assert next_category(units, {"a": 0, "b": 0, "c": 0}, set()) == "a"
    assert next_category(units, {"a": 1, "b": 0, "c": 0}, {"b"}) == "c"  # c's training before a's evaluation
    assert next_category(units, {"a": 1, "b": 1, "c": 0}, {"c"}) == "a"
    assert next_category(units, {"a": 2, "b": 1, "c": 0}, {"b", "c"}) is None  # a finished, b failed, c running


def test_makespan_of_units_against_whole_categories():
    """3 categories of (train 3, evaluate 1) on 2 workers: a and b train side by side (0-3), c trains (3-6) while
    a and b evaluate (3-5), c evaluates (6-7): 7, where whole categories take 8 (two, then the third alone); one
    worker: the sum; more workers than units: the longest category."""
    units = {"a": [3.0, 1.0], "b": [3.0, 1.0], "c": [3.0, 1.0]}
    assert makespan(units, 2) == 7.0
    assert makespan({c: [sum(d)] for c, d in units.items()}, 2) == 8.0
    assert makespan(units, 1) == 12.0 and makespan(units, 8) == 4.0


def _make_offline(project: Path, jobs: int, threads: int) -> str:
    """`make offline JOBS=jobs` in `project` with this checkout's venv, OMP_NUM_THREADS=threads."""
    venv = Path(sys.executable).parent.parent
    command = ["make", "-C", str(project), "offline", f"JOBS={jobs}", f"VENV={venv}", "-o", f"{venv}/.installed"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("DVC_EXP_NAME", None)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_offline_with_two_jobs_gives_the_sequential_results_as_a_named_experiment(tmp_path):
    preset = dict(line.split("=", 1) for line in preset_overrides("offline")) | REDUCED
    projects = {}
    for jobs in (1, 2):
        project = copy_project(tmp_path / f"jobs{jobs}", [])
        (project / "presets/offline.txt").write_text("".join(f"{k}={v}\n" for k, v in preset.items()))
        projects[jobs] = project
    # Same thread count in both runs (each worker's share): the comparison is then exact by construction.
    # What the count itself changes was measured by the former bench/jobs.py (docs/decisions.md).
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    _make_offline(projects[1], 1, threads)
    # the same generated dataset, modification times included, so that fetch's fingerprints are equal too
    shutil.copytree(projects[1] / "data/synthetic", projects[2] / "data/synthetic")
    output = _make_offline(projects[2], 2, threads)
    assert "2 categories, 2 at a time" in output and output.count("Running stage 'fetch'") == 1

    one, two = projects[1], projects[2]
    outputs = ["params.yaml", "metrics.json", "metrics.md", "metrics/stripes.json", "metrics/disc.json"]
    outputs += [f"data/prompts/{c}.pt" for c in ("stripes", "disc")]
    outputs += [f"data/thresholds/{c}.json" for c in ("stripes", "disc")]
    assert {p: _digest(two / p) for p in outputs} == {p: _digest(one / p) for p in outputs}
    # dvc.lock: the same entries (hashes of every dep and out); their order in the file is the order they ended
    assert yaml.safe_load((two / "dvc.lock").read_text()) == yaml.safe_load((one / "dvc.lock").read_text())
    assert run(["dvc", "status", "--json"], two).strip() == json.dumps({"fetch": ["always changed"]})
    for project in (one, two):
        assert "offline" in run(["dvc", "exp", "list", "--name-only"], project).split()
