"""mpad.data.shots: the shots file round-trips and refuses what no longer matches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mpad.data import DatasetError, Sample
from mpad.data.shots import load_shots, save_shots
from mpad.io import sha256_file


@pytest.fixture
def shots(tmp_path):
    root = tmp_path / "ds"
    picks = []
    for i in range(2):
        path = root / "disc" / "train" / "good" / f"00{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(path)
        picks.append(Sample(path, None, 0, "good"))
    out = tmp_path / "shots" / "disc.json"
    record = save_shots(out, "disc", root, 2, 7, picks)
    return root, out, record


def test_roundtrip(shots):
    root, out, record = shots
    assert json.loads(out.read_text()) == record
    assert record == {
        "category": "disc",
        "root": str(root),
        "k": 2,
        "seed": 7,
        "shots": [
            {"path": f"disc/train/good/00{i}.png", "sha256": sha256_file(root / f"disc/train/good/00{i}.png")}
            for i in range(2)
        ],
    }
    assert load_shots(out, root, "disc") == [
        (f"disc/train/good/00{i}.png", root / f"disc/train/good/00{i}.png") for i in range(2)
    ]


def test_changed_image_is_named(shots):
    root, out, _ = shots
    Image.fromarray(np.full((4, 4), 99, np.uint8)).save(root / "disc/train/good/001.png")
    with pytest.raises(DatasetError, match=r"001\.png: shot image changed since .*disc\.json.*sha256 differs"):
        load_shots(out, root, "disc")


def test_other_category_missing_file_and_bad_json(shots, tmp_path):
    root, out, _ = shots
    with pytest.raises(DatasetError, match="holds the shots of category 'disc', not 'grid'"):
        load_shots(out, root, "grid")
    with pytest.raises(DatasetError, match="grid.json: shots file not found"):
        load_shots(tmp_path / "grid.json", root, "grid")
    out.write_text("[]")
    with pytest.raises(DatasetError, match="disc.json: not a valid shots file"):
        load_shots(out, root, "disc")
