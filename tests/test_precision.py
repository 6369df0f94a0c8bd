"""bf16 on the CPU through the offline preset's train, evaluate and predict, compared with fp32.

Tolerances: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %). On the tiny model the patch
features of bf16 and fp32 differ by at most ~0.004 (unit vectors), which the logit scale of 100 turns into
logit differences of ~0.4 at worst, so single pixels of a map may move by up to ~0.1 while the maps' means
agree closely. AUROC-type metrics rank ~10^5 pixels and barely move; training in bf16 follows a slightly
different path (150 Adam steps): pixel metrics within 1.5 points, and image AUROC, on 12 test images, within
4 good/defect pairs ranked the other way (3 were measured on `disc`: its scores, the maps' maxima, lie
close together with random weights). The maps and scores of one set of prompts are compared directly too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mpad.clip import load_clip
from mpad.config import ScoringConfig
from mpad.data import list_split, load_image
from mpad.detector import Detector
from mpad.features import stack_images
from mpad.prompt_file import PromptsFile
from stages.cli import app

pytestmark = pytest.mark.slow  # runs the offline preset's stages twice (about a minute)

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ["stripes", "disc"]


def offline_params() -> dict:
    """params.yaml with presets/offline.txt applied (as `make offline` does), on two categories."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for line in (ROOT / "presets" / "offline.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            section, name = key.split(".")
            params[section][name] = yaml.safe_load(value)
    params["dataset"]["categories"] = CATEGORIES
    return params


def run_pipeline(folder: Path, precision: str) -> dict[str, dict]:
    folder.mkdir()
    os.chdir(folder)
    params = offline_params()
    params["model"]["precision"] = precision
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    runner = CliRunner()
    steps = [["fetch"]] + [
        [stage, "--category", c] for stage in ("sample", "synthesize", "train", "evaluate") for c in CATEGORIES
    ]
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (precision, args, result.output)
    return {c: json.loads((folder / "metrics" / f"{c}.json").read_text()) for c in CATEGORIES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("precision")
    metrics = {}
    for precision in ("fp32", "bf16"):
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(base)
            metrics[precision] = run_pipeline(base / precision, precision)
    return base, metrics


def test_bf16_train_and_evaluate_match_fp32(runs):
    base, metrics = runs
    for category in CATEGORIES:
        bf16, fp32 = metrics["bf16"][category], metrics["fp32"][category]
        for key in ("pixel_auroc", "aupro"):
            assert abs(bf16[key] - fp32[key]) <= 1.5, (category, key)
        # 12 test images: one good/defect pair ranked the other way moves image AUROC by 100 / (6 * 6) points.
        pair = 100.0 / (fp32["n_defect"] * (fp32["n_test"] - fp32["n_defect"]))
        assert abs(bf16["image_auroc"] - fp32["image_auroc"]) <= 4 * pair + 0.01, category  # + rounding
        text = {p: PromptsFile.load(base / p / "data" / "prompts" / f"{category}.pt").text for p in ("fp32", "bf16")}
        assert text["bf16"].dtype == torch.float32  # learned vectors and embeddings are kept in fp32
        assert torch.nn.functional.cosine_similarity(text["fp32"], text["bf16"]).min() > 0.98


def test_bf16_maps_match_fp32_maps_for_the_same_prompts(runs):
    base, _ = runs
    params = offline_params()
    record = PromptsFile.load(base / "fp32" / "data" / "prompts" / "disc.pt")
    samples = list_split(base / "fp32" / "data" / "synthetic", "disc", "test")
    maps, scoring = {}, ScoringConfig.from_params(params["scoring"])
    for precision in ("fp32", "bf16"):
        bundle = load_clip("mpad-tiny", "none", "cpu", precision)
        images = stack_images([load_image(s.image) for s in samples], bundle.image_size)
        maps[precision] = Detector.from_prompts(bundle, record, scoring)(images, (64, 64))
    diff = (maps["bf16"].maps - maps["fp32"].maps).abs()
    assert maps["bf16"].maps.dtype == torch.float32
    assert diff.mean() < 0.02 and diff.max() < 0.2
    assert (maps["bf16"].scores - maps["fp32"].scores).abs().max() < 0.1


def test_bf16_predict_matches_fp32(runs):
    base, _ = runs
    folder = base / "fp32"
    images = folder / "data" / "synthetic" / "disc" / "test" / "stain"
    scores = {}
    for precision in ("fp32", "bf16"):
        out = folder / f"predicted-{precision}"
        result = CliRunner().invoke(
            app,
            [
                "predict",
                "--prompts",
                str(folder / "data/prompts/disc.pt"),
                str(images),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--precision",
                precision,
                "--thresholds-file",
                str(folder / "data/thresholds/disc.json"),
            ],
        )
        assert result.exit_code == 0, result.output
        scores[precision] = [
            row["image_score"] for row in json.loads((out / "predictions.json").read_text())["predictions"]
        ]
    assert len(scores["fp32"]) > 0
    assert max(abs(a - b) for a, b in zip(scores["fp32"], scores["bf16"], strict=True)) < 0.1
    shutil.rmtree(folder / "predicted-bf16")


def test_invalid_precision_stops_a_stage_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = offline_params()
    params["model"]["precision"] = "fp8"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data" / "prompts").mkdir(parents=True)
    result = CliRunner().invoke(app, ["evaluate", "--category", "disc"])
    assert result.exit_code == 1
    assert "model.precision = 'fp8': must be one of fp32, fp16, bf16" in result.output
    assert "Traceback" not in result.output
