"""Shot selection (pure function) and the `sample` stage run in-process."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mpad.data import DatasetError, Sample, pick_shots
from mpad.data.shots import stable_hash
from mpad.data.synthetic import generate
from stages.cli import app


def _samples(n: int, base: str = "/d/cat/train/good") -> list[Sample]:
    return [Sample(Path(f"{base}/{i:03d}.png"), None, 0, "good") for i in range(n)]


def test_pick_shots_deterministic_distinct_seeded() -> None:
    samples = _samples(20)
    a = pick_shots(samples, 5, seed=0, category="screw")
    assert a == pick_shots(list(reversed(samples)), 5, seed=0, category="screw")  # order-independent
    assert len({s.image for s in a}) == 5 and all(s in samples for s in a)
    picks = {tuple(s.image.name for s in pick_shots(samples, 5, seed, "screw")) for seed in range(10)}
    assert len(picks) >= 9  # the seed matters
    assert pick_shots(samples, 5, 0, "bottle") != a  # so does the category
    assert pick_shots(samples, 2, 0, "screw") == a[:2]  # nested: fewer shots are a prefix
    assert len(pick_shots(samples, 20, 0, "screw")) == 20


def test_pick_shots_pinned_value() -> None:
    # Pinned so that a change of RNG or hash (which would change every experiment's shots) is noticed.
    assert stable_hash("screw") == int.from_bytes(hashlib.sha256(b"screw").digest()[:8], "little") >> 1
    order = np.random.default_rng([0, stable_hash("screw")]).permutation(10)[:3]
    assert [s.image.name for s in pick_shots(_samples(10), 3, 0, "screw")] == [f"{i:03d}.png" for i in order]


@pytest.mark.parametrize(("k", "seed", "words"), [(11, 0, "only 10"), (0, 0, "positive"), (1, -1, "seed")])
def test_pick_shots_errors(k: int, seed: int, words: str) -> None:
    with pytest.raises(DatasetError, match=words):
        pick_shots(_samples(10), k, seed, "screw")


def _params(path: Path, dataset: dict, shots: dict) -> Path:
    path.write_text(yaml.safe_dump({"dataset": dataset, "shots": shots}))
    return path


def test_sample_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    generate(Path("data/synthetic"), seed=0)
    ds = {"name": "synthetic", "root": "data/synthetic", "categories": ["stripes", "weave", "disc"]}
    params = _params(tmp_path / "p.yaml", ds, {"k": 3, "seed": 5})
    runner = CliRunner()
    result = runner.invoke(app, ["sample", "--category", "weave", "--params", str(params)])
    assert result.exit_code == 0, result.output
    out = json.loads(Path("data/shots/weave.json").read_text())
    assert out["category"] == "weave" and out["root"] == "data/synthetic" and out["k"] == 3 and out["seed"] == 5
    assert len(out["shots"]) == 3 and len({s["path"] for s in out["shots"]}) == 3
    for shot in out["shots"]:
        assert shot["path"].startswith("weave/train/good/")
        assert shot["sha256"] == hashlib.sha256((Path("data/synthetic") / shot["path"]).read_bytes()).hexdigest()
    first = Path("data/shots/weave.json").read_bytes()
    assert runner.invoke(app, ["sample", "--category", "weave", "--params", str(params)]).exit_code == 0
    assert Path("data/shots/weave.json").read_bytes() == first  # same params, same bytes

    params = _params(tmp_path / "p.yaml", ds, {"k": 9, "seed": 0})
    result = runner.invoke(app, ["sample", "--category", "disc", "--params", str(params)])
    assert result.exit_code == 1 and "shots.k = 9" in result.output and "only 8" in result.output
    assert not Path("data/shots/disc.json").exists()

    params = _params(tmp_path / "p.yaml", ds, {"k": 1, "seed": 0})
    result = runner.invoke(app, ["sample", "--category", "carpet", "--params", str(params)])
    assert result.exit_code == 1 and "'carpet' is not in dataset.categories" in result.output
    params = _params(tmp_path / "p.yaml", {**ds, "categories": ["stripes", "carpet"]}, {"k": 1, "seed": 0})
    result = runner.invoke(app, ["sample", "--category", "carpet", "--params", str(params)])
    assert result.exit_code == 1 and "data/synthetic/carpet" in result.output

    # Once fetch has written the manifest, sample refuses a root or category it does not describe.
    params = _params(tmp_path / "p.yaml", ds, {"k": 1, "seed": 0})
    assert runner.invoke(app, ["fetch", "--params", str(params)]).exit_code == 0
    assert runner.invoke(app, ["sample", "--category", "disc", "--params", str(params)]).exit_code == 0
    params = _params(tmp_path / "p.yaml", {**ds, "root": "elsewhere"}, {"k": 1, "seed": 0})
    result = runner.invoke(app, ["sample", "--category", "disc", "--params", str(params)])
    assert result.exit_code == 1 and "run `mpad fetch` first" in result.output
