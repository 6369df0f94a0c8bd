"""mpad.thresholds: the record evaluate writes and predict reads, and the checks on reading it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny_records import meta_prompts
from typer.testing import CliRunner

from mpad.config import ScoringConfig
from mpad.evaluation import CategoryResult
from mpad.thresholds import (
    ThresholdsFileError,
    colour_range,
    load_thresholds,
    map_range,
    resolution_of,
    save_thresholds,
    scoring_of,
    thresholds_record,
)
from stages.cli import app


def _result() -> CategoryResult:
    """Two 8x8 maps: image 0 normal (all 0.1), image 1 with one defect pixel scored 0.9 (the rest 0.2)."""
    maps = torch.tensor([[0.1] * 64, [0.2] * 63 + [0.9]]).reshape(2, 8, 8)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[1, 7, 7] = True
    return CategoryResult(maps=maps, masks=masks, labels=torch.tensor([0, 1]), scores=torch.tensor([0.1, 0.9]))


def test_record_values():
    record = thresholds_record(
        _result(), ScoringConfig(smoothing_sigma=2.0, image_score="topk_mean", topk=0.5), "disc", "ab" * 32
    )
    assert record["image_score"] == "topk_mean" and record["smoothing_sigma"] == 2.0 and record["topk"] == 0.5
    assert record["resolution"] == 8 and record["category"] == "disc" and record["prompts_sha256"] == "ab" * 32
    assert record["image_f1_max"] == 1.0 and record["image_threshold"] == pytest.approx(0.5)  # midway 0.1 | 0.9
    assert record["pixel_f1_max"] == 1.0 and record["pixel_threshold"] == pytest.approx(0.55)  # 0.2 | 0.9
    # 128 values: 64 x 0.1, 63 x 0.2, 0.9; the 99.9th percentile lies 0.873 of the way from 0.2 to 0.9
    assert record["map_low"] == pytest.approx(0.1, abs=1e-6)
    assert record["map_high"] == pytest.approx(0.2 + 0.873 * 0.7, abs=1e-5)  # float32 maps


def test_record_without_defects_has_no_thresholds():
    result = _result()
    result = CategoryResult(result.maps, torch.zeros_like(result.masks), torch.tensor([0, 0]), result.scores)
    record = thresholds_record(result, ScoringConfig(), "disc", "ab" * 32)
    assert not {"image_threshold", "pixel_threshold", "image_f1_max", "pixel_f1_max"} & set(record)
    assert record["smoothing_sigma"] == 4.0  # ScoringConfig's default, as params.yaml


def test_map_range_percentiles():
    low, high = map_range(torch.arange(1001, dtype=torch.float32))
    assert (low, high) == (pytest.approx(10.0), pytest.approx(999.0))


def test_save_load_roundtrip(tmp_path):
    record = thresholds_record(_result(), ScoringConfig(), "disc", "ab" * 32)
    save_thresholds(tmp_path / "t" / "disc.json", record)
    assert load_thresholds(tmp_path / "t" / "disc.json") == record
    assert scoring_of(record) == ScoringConfig() and resolution_of(record) == 8
    assert colour_range(record) == (record["map_low"], record["map_high"])


def test_missing_settings_take_the_config_defaults():
    assert scoring_of({}) == ScoringConfig() and resolution_of({}) == 256
    assert colour_range({}) == (0.0, 1.0) and colour_range({"map_low": 0.5, "map_high": 0.5}) == (0.0, 1.0)


@pytest.mark.parametrize(("text", "message"), [
    (None, "thresholds file not found"),
    ("{not json", "not a readable thresholds JSON file"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"image_score": "mean", "map_low": "low", "resolution": 2.5}),
     "map_low = 'low': must be a finite number; resolution = 2.5: must be an integer >= 8; "
     "scoring.image_score = 'mean': must be one of max, topk_mean, global"),
])  # fmt: skip
def test_bad_files_are_named(tmp_path, text, message):
    path = tmp_path / "disc.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ThresholdsFileError) as err:
        load_thresholds(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_undefined_threshold_may_be_null(tmp_path):
    (tmp_path / "disc.json").write_text(json.dumps({"image_threshold": None}))
    assert load_thresholds(tmp_path / "disc.json") == {"image_threshold": None}


def test_predict_stops_on_a_bad_thresholds_file(tmp_path, tiny_clip):
    text = torch.nn.functional.normalize(torch.randn(2, tiny_clip.model.text_projection.shape[1]), dim=-1)
    dataclasses.replace(meta_prompts(tiny_clip), text=text).save(tmp_path / "disc.pt")
    (tmp_path / "disc.json").write_text(json.dumps({"smoothing_sigma": -1}))
    (tmp_path / "a.png").write_bytes(b"")
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(tmp_path / "a.png"),
            "--prompts",
            str(tmp_path / "disc.pt"),
            "--out",
            str(tmp_path / "out"),
            "--thresholds-file",
            str(tmp_path / "disc.json"),
        ],
    )
    assert result.exit_code == 1
    assert f"{tmp_path / 'disc.json'}: bad thresholds file: scoring.smoothing_sigma = -1" in result.stderr
    assert not (tmp_path / "out").exists()  # stopped before any work
