"""`mpad predict` end to end on the tiny random-weight model and the generated dataset."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_records import tiny_record
from typer.testing import CliRunner

from mpad.data.synthetic import generate
from mpad.io import sha256_file
from mpad.prompt_file import PromptFileError, PromptsFile
from mpad.visualize import output_size
from stages.cli import app
from stages.predict import expand_images

runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    generate(root, seed=0, n_train=1, n_test=4)
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_clip, dataset) -> dict[str, Path]:
    """A prompts file (learned prompts at init, with a memory), a thresholds file, three test images."""
    tmp = tmp_path_factory.mktemp("predict")
    record = tiny_record(tiny_clip)
    record = record.save(tmp / "disc.pt")
    thresholds = {
        "category": "disc",
        "prompts_sha256": sha256_file(tmp / "disc.pt"),
        "image_score": "max",
        "smoothing_sigma": 1.0,
        "image_threshold": 0.5,
        "map_low": 0.1,
        "map_high": 0.9,
    }
    (tmp / "disc.json").write_text(json.dumps(thresholds))
    good = sorted((dataset / "disc/test/good").glob("*.png"))[0]
    bad = sorted(p for p in (dataset / "disc/test").glob("*/*.png") if p.parent.name != "good")[0]
    corrupt = tmp / "images" / "corrupt.png"
    corrupt.parent.mkdir()
    corrupt.write_bytes(good.read_bytes()[:200])
    return {"prompts": tmp / "disc.pt", "thresholds": tmp / "disc.json", "good": good, "bad": bad,
            "corrupt": corrupt, "record": record}  # fmt: skip


def _invoke(args: list[str]):
    return runner.invoke(app, ["predict", *[str(a) for a in args]], catch_exceptions=False)


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/thresholds of the project picked up by default


def test_good_defect_corrupt(files, tmp_path):
    out = tmp_path / "out"
    args = ["--prompts", files["prompts"], files["good"], files["bad"], files["corrupt"], "--out", out,
            "--thresholds-file", files["thresholds"], "--device", "cpu", "--batch-size", 2]  # fmt: skip
    result = _invoke(args)
    assert result.exit_code == 1, result.output
    assert "corrupt.png" in result.stderr
    assert "image_threshold" in result.stdout and "threshold 0.5" in result.stdout
    rows = _rows(out)
    assert [r["path"] for r in rows] == [str(files[k]) for k in ("good", "bad", "corrupt")]
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"]
    assert rows[2]["status"].startswith("error") and rows[2]["image_score"] == ""
    for row, key in zip(rows[:2], ("good", "bad"), strict=True):
        size = Image.open(files[key]).size
        for name in (f"{files[key].stem}_overlay.png", f"{files[key].stem}_map.png"):
            assert Image.open(out / name).size == size
        assert Image.open(out / f"{files[key].stem}_map.png").mode == "L"
        score = float(row["image_score"])
        assert 0 <= score <= float(row["max_pixel_score"]) + 1e-6 <= 1 + 1e-6  # CSV values: 6 decimals
        assert row["decision"] == ("anomalous" if score >= 0.5 else "normal")
    info = json.loads((out / "predictions.json").read_text())
    assert info["threshold_source"].endswith("(image_threshold)") and info["threshold"] == 0.5
    assert info["n_failed"] == 1 and info["memory"] is True and info["random_weights"] is True
    assert info["map_range"] == [0.1, 0.9] and info["scoring"]["smoothing_sigma"] == 1.0
    assert not list(out.glob("corrupt*.png"))


def test_threshold_override(files, tmp_path):
    for value, expected in (("0", "anomalous"), ("0.9999", "normal")):  # no score here reaches 0.9999
        out = tmp_path / f"out{value}"
        result = _invoke(["--prompts", files["prompts"], files["good"], files["bad"], "--out", out,
                          "--thresholds-file", files["thresholds"], "--threshold", value])  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "from --threshold" in result.stdout
        assert [r["decision"] for r in _rows(out)] == [expected, expected]
        assert json.loads((out / "predictions.json").read_text())["threshold_source"] == "--threshold"


def test_no_threshold_is_na(files, tmp_path):
    out = tmp_path / "out"
    result = _invoke(["--prompts", files["prompts"], files["good"], "--out", out])
    assert result.exit_code == 0, result.output
    assert "no threshold" in result.stderr and "RANDOM WEIGHTS" in result.stderr
    assert "warning: no thresholds file of disc" in result.stderr and "smoothing_sigma 4" in result.stderr
    assert [r["decision"] for r in _rows(out)] == ["n/a"]
    assert json.loads((out / "predictions.json").read_text())["threshold_source"] is None


def test_default_thresholds_file(files, tmp_path):
    (tmp_path / "data/thresholds").mkdir(parents=True)
    (tmp_path / "data/thresholds/disc.json").write_text(files["thresholds"].read_text())
    result = _invoke(["--prompts", files["prompts"], files["good"], "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    assert "data/thresholds/disc.json (image_threshold)" in result.stdout


def test_folder_and_glob(files, dataset, tmp_path):
    folder = dataset / "disc/test/good"
    pattern = str(dataset / "disc/test/*/*.png")
    expected_folder = sorted(folder.glob("*.png"))
    paths, unmatched = expand_images([str(folder), pattern, str(tmp_path / "none*.png")])
    assert paths[: len(expected_folder)] == expected_folder
    assert set(paths) == set((dataset / "disc/test").glob("*/*.png"))  # glob adds the defects, no duplicates
    assert unmatched == [str(tmp_path / "none*.png")]
    out = tmp_path / "out"
    result = _invoke(["--prompts", files["prompts"], folder, pattern, "--out", out, "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    assert len(_rows(out)) == len(paths)


def test_no_image_exit_2(files, tmp_path):
    (tmp_path / "empty").mkdir()
    result = _invoke(["--prompts", files["prompts"], tmp_path / "empty", str(tmp_path / "*.png"), "--out", tmp_path])
    assert result.exit_code == 2
    assert "no image found" in result.stderr


def test_other_backbone_refused(files, tmp_path, tiny_clip):
    record = files["record"]
    dataclasses.replace(record, model={**record.model, "embed_dim": 999}).save(tmp_path / "other.pt")
    result = _invoke(["--prompts", tmp_path / "other.pt", files["good"], "--out", tmp_path / "out"])
    assert result.exit_code == 1
    assert "learned for another backbone than this one: embed_dim 999 vs 64" in result.stderr.replace("\n", "")
    # Weights the record names that cannot be had here: a clear error, exit 1.
    dataclasses.replace(record, model={**record.model, "pretrained": "laion400m_e32"}).save(tmp_path / "tagged.pt")
    result = _invoke(["--prompts", tmp_path / "tagged.pt", files["good"], "--out", tmp_path / "out"])
    assert result.exit_code == 1 and "laion400m_e32" in result.stderr
    # Other weights than the stored ones (record: random) are refused too.
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), checkpoint)
    result = _invoke(["--prompts", files["prompts"], files["good"], "--out", tmp_path / "out",
                      "--model-pretrained", checkpoint])  # fmt: skip
    assert result.exit_code == 1
    assert f"pretrained 'none' vs '{checkpoint}'" in result.stderr.replace("\n", "")


def test_output_size_cap():
    assert output_size(900, 1200, 1024) == (768, 1024)
    assert output_size(80, 112, 1024) == (80, 112)


def test_moved_checkpoint_accepted(files, tmp_path, tiny_clip):
    moved = tmp_path / "new_home" / "tiny.pt"
    moved.parent.mkdir()
    torch.save(tiny_clip.model.state_dict(), moved)
    record = files["record"]
    dataclasses.replace(record, model={**record.model, "pretrained": "/old/place/tiny.pt"}).save(tmp_path / "ckpt.pt")
    args = ["--prompts", tmp_path / "ckpt.pt", files["good"], "--out", tmp_path / "out", "--threshold", "0.5"]
    assert _invoke(args).exit_code == 1  # the stored path is gone
    result = _invoke([*args, "--model-pretrained", moved])
    assert result.exit_code == 0, result.output
    assert "RANDOM WEIGHTS" not in result.stderr


def test_colliding_stems_get_distinct_outputs(files, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {"X.png": (40, 30), "x.jpg": (50, 20), "x.png": (24, 36), "x_2.png": (30, 44)}  # (W, H)
    for name, size in sizes.items():
        Image.new("RGB", size, (90, 120, 30)).save(folder / name)
    out = tmp_path / "out"
    result = _invoke(["--prompts", files["prompts"], folder, "--out", out, "--threshold", "0.5"])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert [r["overlay"] for r in rows] == ["X_overlay.png", "x_2_overlay.png", "x_3_overlay.png", "x_2_2_overlay.png"]
    for row in rows:  # each row points at its own image's files
        size = sizes[Path(row["path"]).name]
        assert Image.open(out / row["overlay"]).size == size and Image.open(out / row["map"]).size == size


def test_bad_out_is_refused_before_any_work(files, tmp_path, monkeypatch):
    (tmp_path / "file.txt").write_text("x")
    for out, message in (
        (tmp_path / "file.txt", "file.txt: an existing file, not a folder"),
        (tmp_path / "file.txt" / "sub", f"sub: lies under {tmp_path / 'file.txt'}, which is a file"),
    ):
        result = _invoke(["--prompts", files["prompts"], files["good"], "--out", out])
        assert result.exit_code == 2 and message in result.stderr
    real_access = os.access  # tests may run as root, who may write anywhere: deny tmp_path by hand
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path and real_access(path, mode))
    result = _invoke(["--prompts", files["prompts"], files["good"], "--out", tmp_path / "new" / "out"])
    assert result.exit_code == 2 and f"cannot create or write it, {tmp_path} is not writable" in result.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_threshold_is_refused(files, tmp_path, value):
    result = _invoke(["--prompts", files["prompts"], files["good"], "--out", tmp_path / "out", "--threshold", value])
    assert result.exit_code == 2 and f"--threshold {value}: not a finite number" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("value", "every"), [("-1", "anomalous"), ("1.5", "normal")])
def test_threshold_outside_the_score_range_is_refused(files, tmp_path, value, every):
    result = _invoke(["--prompts", files["prompts"], files["good"], "--out", tmp_path / "out", "--threshold", value])
    assert result.exit_code == 2
    assert f"--threshold {value}: image scores lie in [0, 1], so it would call every image {every}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_decompression_bomb_is_one_line(files, tmp_path):
    bomb = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # 100 Mpx, above Pillow's ~89 Mpx guard; 12 KB on disk
    result = _invoke(["--prompts", files["prompts"], bomb, files["good"], "--out", tmp_path / "out"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if "huge.png" in line]
    assert len(lines) == 1 and "too large to decode safely (Image size (100000000 pixels)" in lines[0]
    assert "DecompressionBombWarning" not in result.stderr and [r["status"] for r in _rows(tmp_path / "out")][1] == "ok"


def test_thresholds_of_another_category_need_force(files, tmp_path):
    other = tmp_path / "screw.json"
    other.write_text(json.dumps({**json.loads(files["thresholds"].read_text()), "category": "screw"}))
    args = ["--prompts", files["prompts"], files["good"], "--out", tmp_path / "out", "--thresholds-file", other]
    result = _invoke(args)
    assert result.exit_code == 1 and "thresholds of category 'screw', but the prompts are for 'disc'" in result.stderr
    assert not (tmp_path / "out").exists()
    result = _invoke([*args, "--force"])
    assert result.exit_code == 0 and "--force: using" in result.stderr and "category 'screw'" in result.stderr


def test_thresholds_of_other_prompts_need_force(files, tmp_path):
    """Prompts learned with other settings (here: another anomaly vector) are not paired with the thresholds
    measured for the first ones; a byte-identical copy elsewhere is; a file written before the pairing was
    recorded is used with one warning."""
    copy = tmp_path / "copy" / "disc.pt"
    copy.parent.mkdir()
    copy.write_bytes(files["prompts"].read_bytes())
    retrained = tmp_path / "retrained" / "disc.pt"
    record = files["record"]
    dataclasses.replace(record, vectors={**record.vectors, "anomaly": record.vectors["anomaly"] + 1}).save(retrained)
    pair = ["--thresholds-file", files["thresholds"], files["good"]]
    result = _invoke(["--prompts", copy, *pair, "--out", tmp_path / "copy_out"])
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr
    result = _invoke(["--prompts", retrained, *pair, "--out", tmp_path / "out"])
    assert result.exit_code == 1 and "thresholds measured for other prompts (sha256 " in result.stderr
    assert not (tmp_path / "out").exists()
    result = _invoke(["--prompts", retrained, *pair, "--out", tmp_path / "out", "--force"])
    assert result.exit_code == 0 and "--force: using" in result.stderr and "other prompts" in result.stderr
    old = tmp_path / "old.json"
    old.write_text(json.dumps({k: v for k, v in json.loads(files["thresholds"].read_text()).items()
                               if k != "prompts_sha256"}))  # fmt: skip
    result = _invoke(["--prompts", retrained, "--thresholds-file", old, files["good"], "--out", tmp_path / "o2"])
    assert result.exit_code == 0
    warned = [line for line in result.stderr.splitlines() if "records no prompts_sha256" in line]
    assert len(warned) == 1 and "cannot check" in warned[0]


def test_scoring_settings_are_found_beside_the_prompts(files, tmp_path):
    project = tmp_path / "elsewhere" / "project"  # the working directory (tmp_path) is not the project
    (project / "data/prompts").mkdir(parents=True)
    (project / "data/thresholds").mkdir()
    (project / "data/prompts/disc.pt").write_bytes(files["prompts"].read_bytes())
    thresholds = {**json.loads(files["thresholds"].read_text()), "smoothing_sigma": 2.5, "resolution": 32}
    (project / "data/thresholds/disc.json").write_text(json.dumps(thresholds))
    out = tmp_path / "out"
    result = _invoke(["--prompts", project / "data/prompts/disc.pt", files["good"], "--out", out])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "predictions.json").read_text())
    assert info["thresholds_file"] == str(project / "data/thresholds/disc.json")
    assert info["scoring"]["smoothing_sigma"] == 2.5 and info["resolution"] == 32 and info["threshold"] == 0.5


def test_prompts_record_without_text_is_named(files, tmp_path):
    stored = files["record"].as_stored()
    torch.save({k: v for k, v in stored.items() if k != "text"}, tmp_path / "notext.pt")
    with pytest.raises(PromptFileError, match="incomplete prompts file, it lacks text"):
        PromptsFile.load(tmp_path / "notext.pt")
    torch.save({**stored, "text": stored["text"][0]}, tmp_path / "flat.pt")
    result = _invoke(["--prompts", tmp_path / "flat.pt", files["good"], "--out", tmp_path / "out"])
    assert result.exit_code == 1 and "text must be the (2, D) [normal, anomaly] embeddings, not (64,)" in result.stderr
