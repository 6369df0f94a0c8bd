"""`mpad export` and `mpad predict --backend onnx`: parity with the torch Detector on the tiny model, refusals."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from e2e import TINY_MODEL, write_params
from tiny_records import LAA, tiny_record
from typer.testing import CliRunner

from mpad.config import ScoringConfig
from mpad.data.mvtec import load_image
from mpad.data.synthetic import generate
from mpad.deploy.runtime import OnnxScorer
from mpad.deploy.sidecar import Sidecar
from mpad.detector import Detector
from mpad.features import stack_images
from mpad.io import sha256_file
from mpad.memory import build_memory
from mpad.prompt_file import PromptsFile
from stages.cli import app

THRESHOLDS = {
    "category": "disc",
    "image_score": "topk_mean",
    "topk": 0.05,
    "smoothing_sigma": 1.0,
    "resolution": 32,
    "image_threshold": 0.5,
    "map_low": 0.1,
    "map_high": 0.9,
}
runner = CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    generate(root, seed=0, n_train=1, n_test=6)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_clip) -> Path:
    """<p>/data/prompts/{disc,plain}.pt (with / without a visual memory) and <p>/data/thresholds/*.json."""
    root = tmp_path_factory.mktemp("project")
    (root / "data/prompts").mkdir(parents=True)
    (root / "data/thresholds").mkdir()
    for name, memory in (("disc", True), ("plain", False)):
        record = tiny_record(tiny_clip, name, memory)
        record.save(root / f"data/prompts/{name}.pt")
        (root / f"data/thresholds/{name}.json").write_text(json.dumps({**THRESHOLDS, "category": name}))
    return root


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # thresholds are found beside the prompts, not in the working directory


def _invoke(command: str, args: list) -> object:
    return runner.invoke(app, [command, *[str(a) for a in args]], catch_exceptions=False)


def _export(project: Path, name: str, out: Path) -> Path:
    result = _invoke("export", ["--prompts", project / f"data/prompts/{name}.pt", "--out", out])
    assert result.exit_code == 0, result.output
    return out


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


# onnxruntime's kernels against torch's, both fp32: another summation order through the image tower (tests/
# fp_bounds.py). First order, worst case, that bounds the maps' move by s/4 sqrt(D) r |t_a - t_n| for the text map
# plus <= 2 x sqrt(128) r for the harmonic fusion with the memory map: ~6e-3 here; 1e-4 (100x the 1e-6 the README
# reports) is tighter than that derivation. Issue 19's threshold change revisits it.
@pytest.mark.numerics
@pytest.mark.parametrize("name", ["disc", "plain"])
def test_onnx_equals_torch_detector(project, dataset, tiny_clip, tmp_path, name):
    model = _export(project, name, tmp_path / f"{name}.onnx")
    info = Sidecar.load(model)
    record = PromptsFile.load(project / f"data/prompts/{name}.pt")
    assert info.input_size == (64, 64) and info.resolution == 32 and info.image_threshold == 0.5
    assert info.category == name and info.model == record.model and info.memory is (name == "disc")
    assert info.scoring.model_dump() == {"smoothing_sigma": 1.0, "image_score": "topk_mean", "topk": 0.05}
    assert Sidecar.load(model) == info and info.sha256 == sha256_file(model)  # what was saved loads back
    paths = sorted((dataset / "disc/test").glob("*/*.png"))
    images = stack_images([load_image(p) for p in paths], tiny_clip.image_size)
    detector = Detector.from_prompts(
        tiny_clip, record, ScoringConfig(smoothing_sigma=1.0, image_score="topk_mean", topk=0.05)
    )
    assert (detector.memory is not None) is (name == "disc")
    want = detector(images, (32, 32))
    maps, scores = OnnxScorer(model)(images)  # 6 images: another batch size than the traced one
    assert maps.shape == (len(paths), 32, 32) and scores.shape == (len(paths),)
    assert float((maps - want.maps).abs().max()) < 1e-4
    assert float((scores - want.scores).abs().max()) < 1e-4
    single = torch.cat([OnnxScorer(model)(images[i : i + 1])[1] for i in range(2)])
    assert float((single - want.scores[:2]).abs().max()) < 1e-4
    # The same predict outputs from both backends. The threshold: midway in the widest gap between the scores,
    # so that both decisions occur and no score lies within the tolerance of it.
    ordered = want.scores.sort().values
    gap = int((ordered[1:] - ordered[:-1]).argmax())
    threshold = float(ordered[gap] + ordered[gap + 1]) / 2
    assert float(ordered[gap + 1] - ordered[gap]) > 1e-3
    decisions = {}
    sources = {"torch": ["--prompts", project / f"data/prompts/{name}.pt"], "onnx": ["--model", model]}
    for backend, source in sources.items():
        out = tmp_path / backend
        result = _invoke(
            "predict",
            [
                *source,
                "--backend",
                backend,
                dataset / "disc/test/good",
                str(dataset / "disc/test/*/*.png"),
                "--out",
                out,
                "--threshold",
                threshold,
            ],
        )
        assert result.exit_code == 0, result.output
        decisions[backend] = _rows(out)
    assert [r["decision"] for r in decisions["onnx"]] == [r["decision"] for r in decisions["torch"]]
    assert {r["decision"] for r in decisions["onnx"]} == {"anomalous", "normal"}
    for a, b in zip(decisions["onnx"], decisions["torch"], strict=True):
        assert a["path"] == b["path"] and a["overlay"] == b["overlay"]
        assert abs(float(a["image_score"]) - float(b["image_score"])) < 1e-4
    header = json.loads((tmp_path / "onnx/predictions.json").read_text())
    assert header["backend"] == "onnx" and header["resolution"] == 32 and header["map_range"] == [0.1, 0.9]


def test_decisions_equal_on_a_whole_test_split(tiny_clip, tmp_path):
    """evaluate's F1-max image threshold, then predict on every image of the test split with both backends:
    the same decision on each image, the one whose score defined the cut included. The threshold lies midway
    between two test scores (mpad.metrics.f1_max_threshold); the old rule (the cut image's own score) fails
    this on the first image ONNX scores a few ulp lower. A visual memory of the split's own normal shot makes
    the scores rank the defects (random prompts alone do not), so that the cut falls inside the split."""
    generate(tmp_path / "ds", seed=2, n_train=1, n_test=24)
    params = {"dataset": {"root": "ds"}, "model": TINY_MODEL,
              "scoring": {"smoothing_sigma": 1.0, "image_score": "topk_mean", "topk": 0.05},
              "evaluate": {"resolution": 32, "batch_size": 8, "workers": 0, "overlays": 0}}  # fmt: skip
    write_params(tmp_path, params)
    prompts = tmp_path / "data/prompts/disc.pt"
    shot = stack_images([load_image(p) for p in (tmp_path / "ds/disc/train/good").glob("*.png")], (64, 64))
    memory = build_memory(tiny_clip, LAA, shot, [2, 4], "harmonic").to_record()
    dataclasses.replace(tiny_record(tiny_clip, "disc", memory=False), memory=memory).save(prompts)
    assert _invoke("evaluate", ["--category", "disc"]).exit_code == 0
    thresholds = tmp_path / "data/thresholds/disc.json"
    model = _export(tmp_path, "disc", tmp_path / "disc.onnx")
    info = Sidecar.load(model)
    assert info.prompts_sha256 == sha256_file(prompts) and info.thresholds_sha256 == sha256_file(thresholds)
    images = str(tmp_path / "ds/disc/test/*/*.png")
    rows = {}
    for backend, source in {"torch": ["--prompts", prompts], "onnx": ["--model", model]}.items():
        result = _invoke("predict", [*source, "--backend", backend, images, "--out", tmp_path / backend])
        assert result.exit_code == 0, result.output
        rows[backend] = _rows(tmp_path / backend)
    assert len(rows["torch"]) == 24
    assert [r["decision"] for r in rows["onnx"]] == [r["decision"] for r in rows["torch"]]
    threshold = json.loads(thresholds.read_text())["image_threshold"]
    scores = sorted(float(r["image_score"]) for r in rows["torch"])
    above = min(s for s in scores if s >= threshold)  # the image whose score defined the cut
    below = max(s for s in scores if s < threshold)
    assert below < threshold < above and float(rows["torch"][0]["threshold"]) == threshold
    assert {r["decision"] for r in rows["torch"]} == {"anomalous", "normal"}


def test_onnx_predict_needs_no_open_clip(project, dataset, tmp_path):
    model = _export(project, "disc", tmp_path / "disc.onnx")
    probe = (
        "import json, sys\nfrom typer.testing import CliRunner\nimport stages.cli\n"
        f"r = CliRunner().invoke(stages.cli.app, ['predict', '--backend', 'onnx', '--model', {str(model)!r}, "
        f"{str(dataset / 'disc/test/good')!r}, '--out', {str(tmp_path / 'out')!r}])\n"
        "print(json.dumps({'code': r.exit_code, 'stdout': r.stdout, 'heavy': [m for m in ('open_clip', 'mpad.clip') "
        "if m in sys.modules]}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["code"] == 0 and found["heavy"] == []
    assert "threshold 0.5 from" in found["stdout"] and "disc.onnx.json (image_threshold)" in found["stdout"]
    assert len(_rows(tmp_path / "out")) == 3


def test_refusals(project, dataset, tmp_path, monkeypatch):
    prompts = project / "data/prompts/disc.pt"
    result = _invoke("export", ["--prompts", prompts, "--out", tmp_path / "model.bin"])
    assert result.exit_code == 1 and "name the model file <name>.onnx" in result.stderr
    record = PromptsFile.load(prompts)
    dataclasses.replace(record, laa=LAA.model_copy(update={"layers": 9})).save(tmp_path / "deep.pt")
    result = _invoke("export", ["--prompts", tmp_path / "deep.pt", "--out", tmp_path / "deep.onnx"])
    assert result.exit_code == 1 and "cannot export it: laa.layers must be in 1..4" in result.stderr
    monkeypatch.setattr("mpad.deploy.graph._CHUNK_ELEMENTS", 1000)
    result = _invoke("export", ["--prompts", prompts, "--out", tmp_path / "big.onnx"])
    assert result.exit_code == 1 and "memory bank of 64 patches is too large to export" in result.stderr
    assert not (tmp_path / "big.onnx").exists()
    monkeypatch.undo()
    model = _export(project, "disc", tmp_path / "disc.onnx")
    args = ["--backend", "onnx", "--model", model, dataset / "disc/test/good", "--out", tmp_path / "out"]
    result = _invoke("predict", [*args, "--prompts", prompts])
    assert result.exit_code == 2 and "takes no --prompts" in result.stderr
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**THRESHOLDS, "prompts_sha256": "0" * 64}))
    result = _invoke("predict", [*args, "--thresholds-file", other])
    assert result.exit_code == 1 and "thresholds measured for other prompts (sha256 000000000000...)" in result.stderr
    result = _invoke("predict", [*args[:3], prompts, *args[4:]])  # a prompts file given as the ONNX model
    assert result.exit_code == 1 and f"{prompts}: not an ONNX model but a torch file" in result.stderr
    assert f"--backend torch --prompts {prompts}" in result.stderr
    other.write_text(json.dumps({**THRESHOLDS, "smoothing_sigma": 4.0}))
    result = _invoke("predict", [*args, "--thresholds-file", other])
    assert result.exit_code == 1 and "other scoring settings or resolution than" in result.stderr
    model.write_bytes(model.read_bytes() + b"\0")
    result = _invoke("predict", args)
    assert result.exit_code == 1 and "describes another export" in result.stderr
