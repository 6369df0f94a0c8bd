"""Stage `train` end to end through the CLI, on a synthesized folder written here."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from e2e import TINY_MODEL, write_params
from PIL import Image
from typer.testing import CliRunner

from mpad import layout
from mpad.data import Sample
from mpad.data.shots import save_shots
from mpad.oagm import SynthesizedSample
from mpad.object_masks import ObjectMask
from mpad.prompt_file import PromptsFile
from mpad.synth_set import write_synth_set
from stages.cli import app
from stages.common import StageProgress

PARAMS = {
    "model": TINY_MODEL,
    "laa": {"attention": "vv", "k": 2, "layers": 2, "cls": "neighbor-cls"},
    "prompts": {"n_general": 3, "n_normal": 2, "n_anomaly": 1},
    "mpts": {
        "lambda": 1.0,
        "calibration": "projection",
        "meta_epochs": 2,
        "steps": 4,
        "lr": 0.01,
        "batch_size": 8,
        "seed": 0,
    },
    "memory": {"enabled": False, "layers": [2, 4], "fusion": "harmonic"},
}


def write_synth(root: Path, category: str = "carpet", n: int = 16, size: int = 64) -> Path:
    """data/synth/<category> (via its owner, `write_synth_set`): striped texture with Gaussian-noise blobs."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(float)
    base = 0.5 + 0.35 * np.sin(2 * np.pi * (x * 0.9 + y * 0.4) / 9.0)
    base = np.stack([base * 0.8, base * 0.6 + 0.1, 0.3 + 0.2 * base], -1)
    samples = []
    for i in range(n):
        cy, cx, r = rng.uniform(10, size - 10, 2).tolist() + [rng.uniform(5, 12)]
        mask = ((y - cy) ** 2 + (x - cx) ** 2 <= r**2) if i % 5 else np.zeros((size, size), bool)
        img = np.clip(base + rng.normal(0, 0.2, base.shape) * mask[..., None], 0, 1)
        samples.append(SynthesizedSample((img * 255).astype(np.uint8), mask))
    folder = root / layout.synth_dir(category)
    whole = ObjectMask(np.ones((size, size), bool))
    write_synth_set(folder, category, (size, size), ["shot.png"], [whole], [samples], {"random_weights": True})
    return folder


@pytest.fixture
def project(workdir):
    write_params(workdir, PARAMS)
    write_synth(workdir)
    return workdir


def test_train_stage_writes_prompts_and_curves(project):
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert result.exit_code == 0, result.output
    assert "RANDOM WEIGHTS" in result.output

    record = PromptsFile.load(project / "data" / "prompts" / "carpet.pt")
    assert record.category == "carpet"
    assert record.model["name"] == "mpad-tiny" and record.model["pretrained"] == "none"
    assert record.sizes == (3, 2, 1)
    assert record.vectors["general"].shape == (3, 128)
    assert record.vectors["normal"].shape == (2, 128)
    assert record.vectors["anomaly"].shape == (1, 128)
    assert record.text.shape == (2, 64)
    torch.testing.assert_close(record.text.norm(dim=-1), torch.ones(2))
    assert record.laa.as_dict() == PARAMS["laa"]
    train = record.train
    assert train["steps"] == 8 and train["random_weights"] is True and np.isfinite(train["final_loss"])

    live = project / "dvclive" / "train" / "carpet"
    metrics = json.loads((live / "metrics.json").read_text())
    assert {"loss_ano", "loss_div", "cos", "calibrated_fraction"} <= set(metrics)
    assert metrics["step"] == 7
    rows = (live / "plots" / "metrics" / "loss_ano.tsv").read_text().strip().splitlines()
    assert rows[0].split("\t") == ["step", "loss_ano"] and len(rows) == 1 + 8
    assert not (project / "dvc.yaml").exists()  # a DVC stage must not write its own dvc.yaml


def test_failed_train_keeps_the_previous_curves(project, monkeypatch):
    assert CliRunner().invoke(app, ["train", "--category", "carpet"]).exit_code == 0
    live = project / layout.train_curves_dir("carpet")
    before = {p.relative_to(live): p.read_bytes() for p in live.rglob("*") if p.is_file()}
    assert Path("plots/metrics/loss_ano.tsv") in before

    def broken(*args, **kwargs):
        raise ValueError("laa.layers = 9 exceeds the model's 7 blocks")

    monkeypatch.setattr("stages.train.learn_prompts", broken)
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert result.exit_code == 1 and "laa.layers = 9" in result.output
    assert {p.relative_to(live): p.read_bytes() for p in live.rglob("*") if p.is_file()} == before
    assert [p.name for p in live.parent.iterdir()] == ["carpet"]  # no temporary folder left behind


def test_a_killed_train_leaves_nothing_behind_the_next(project):
    """A train killed with SIGKILL runs no `finally`: its temporary curves folder stays. The next train removes
    such leftovers of processes that are gone (and of older mpad versions, which named no pid), not those of
    a process still running."""
    live = (project / layout.train_curves_dir("carpet")).parent
    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its pid names no process now
    dead_pid = finished.pid
    leftovers = [live / f".carpet.{dead_pid}.k2j3h4.tmp", live / ".carpet.x8e_1q9a.tmp"]
    running = live / f".carpet.{os.getpid()}.abcd.tmp"
    for folder in [*leftovers, running]:
        (folder / "carpet").mkdir(parents=True)
    assert CliRunner().invoke(app, ["train", "--category", "carpet"]).exit_code == 0
    assert sorted(p.name for p in live.iterdir()) == sorted(["carpet", running.name])


def test_log_to_a_file_says_each_note_once_and_throttles_the_bar(project):
    """Output to a file (as under `dvc repro` into a log): the random-weights note once (not also open_clip's
    and our loader's log lines), and the progress bar redrawn every 15 s, not every step."""
    with open(project / "train.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "stages", "train", "--category", "carpet"], stderr=log,
                              stdout=subprocess.DEVNULL, cwd=project, check=False)  # fmt: skip
    text = (project / "train.log").read_text()
    assert done.returncode == 0, text
    assert text.count("RANDOM WEIGHTS") == 1 and "No pretrained weights loaded" not in text
    assert StageProgress(total=1, file=io.StringIO()).mininterval == 15.0  # stderr is no terminal here either


def test_same_params_same_prompts_file(project):
    runner = CliRunner()
    out = project / "data" / "prompts" / "carpet.pt"
    assert runner.invoke(app, ["train", "--category", "carpet"]).exit_code == 0
    first = PromptsFile.load(out)
    assert runner.invoke(app, ["train", "--category", "carpet"]).exit_code == 0
    second = PromptsFile.load(out)
    for key in ("general", "normal", "anomaly"):
        assert torch.equal(first.vectors[key], second.vectors[key])
    assert first.train == second.train and first.sha256 == second.sha256  # the same bytes


def test_missing_manifest_is_named(project):
    result = CliRunner().invoke(app, ["train", "--category", "grid"])
    assert result.exit_code == 1
    assert "data/synth/grid/manifest.json" in result.output and "not found" in result.output


def test_corrupt_manifest_is_named(project):
    (project / "data/synth/carpet/manifest.json").write_text("{not json")
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert result.exit_code == 1 and "manifest.json" in result.output


def test_corrupt_image_is_named(project):
    (project / "data/synth/carpet/images/0003.png").write_bytes(b"not a png")
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert result.exit_code == 1
    assert "images/0003.png" in result.output and "not a readable image" in result.output
    assert not (project / "data" / "prompts" / "carpet.pt").exists()


def test_missing_mask_is_named(project):
    (project / "data/synth/carpet/masks/0002.png").unlink()
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert result.exit_code == 1 and "masks/0002.png" in result.output and "missing" in result.output


def test_bad_parameters_are_reported(project):
    bad = dict(PARAMS, mpts=dict(PARAMS["mpts"], calibration="pcgrad"))
    write_params(project, bad)
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert result.exit_code == 1 and "calibration" in result.output


def test_prompts_longer_than_the_text_context_stop_train(project):
    long = dict(PARAMS, prompts=dict(PARAMS["prompts"], n_general=100))
    write_params(project, long)
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert result.exit_code == 1 and "prompts too long" in result.output and "context holds 77" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (project / "data" / "prompts" / "carpet.pt").exists()


def test_mask_of_wrong_size_is_named(project):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(project / "data/synth/carpet/masks/0001.png")
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert result.exit_code == 1 and "masks/0001.png" in result.output and "32x32" in result.output


def test_memory_branch_is_saved_with_the_prompts(project, monkeypatch):
    shot = Path("ds") / "carpet" / "train" / "good" / "000.png"
    shot.parent.mkdir(parents=True)
    Image.open(project / "data" / "synth" / "carpet" / "images" / "0000.png").save(shot)
    save_shots(layout.shots_file("carpet"), "carpet", "ds", 1, 0, [Sample(shot, None, 0, "good")])
    params = {**PARAMS, "dataset": {"root": "ds"}, "memory": {"enabled": True, "layers": [2, 4], "fusion": "harmonic"}}
    write_params(project, params)
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert result.exit_code == 0, result.output
    memory = PromptsFile.load(project / "data" / "prompts" / "carpet.pt").memory
    assert memory["layers"] == [2, 4] and memory["fusion"] == "harmonic"
    assert [tuple(bank.shape) for bank in memory["banks"]] == [(64, 128), (64, 128)]  # one shot x 8x8 patches

    params["memory"]["layers"] = [2, 9]
    write_params(project, params)
    steps = []  # a layer beyond the model's depth stops the stage before any optimiser step
    monkeypatch.setattr("stages.train.learn_prompts", lambda *args, **kwargs: steps.append(1))
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert result.exit_code == 1 and "memory" in result.output and "1..4" in result.output
    assert steps == []
