"""`mpad check [-S key=value]`: bad overrides, bad bytes and bad counts are refused with one line before DVC runs,
and nothing is written (issue 34, items 6 and 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides
from typer.testing import CliRunner

from mpad.config import CATEGORY
from stages.check import _with_overrides
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "params.yaml").read_text()
PARAMS = yaml.safe_load(TEXT)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder holding the project's params.yaml, as the working directory (check reads data/ from there)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(TEXT)
    return tmp_path


def check(*args: str):
    return CliRunner().invoke(app, ["check", *args])


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("dataset.categories=[]", "dataset.categories = []: must be a non-empty list"),
        ("mpts.steps=abc", "mpts.steps = 'abc': must be an integer >= 1"),
        ("mpts.lambda=true", "mpts.lambda = True: must be a number >= 0"),  # DVC would compare True as 1.0
        ("shots.k=1,0", "shots.k = 0: must be an integer >= 1"),  # a sweep: every point is checked
        ("mpts.lamda=1", "-S mpts.lamda=1: Could not override 'mpts.lamda': Key 'lamda' is not in struct"),
        ("mpts.lr=[", "-S mpts.lr=[: no viable alternative at input '['"),
        ("shots.k=glob(*)", "-S shots.k=glob(*): Glob override 'shots.k=glob(*)' is not supported"),
        ("mpts.lr=interval(0,1)", "-S mpts.lr=interval(0,1): BasicSweeper does not support sweep type"),
        ("other.yaml:mpts.lr=1", "-S other.yaml:mpts.lr=1: names other.yaml, but mpad reads only params.yaml"),
    ],
)
def test_a_bad_override_is_one_line_exit_2_and_writes_nothing(project, override, line):
    before = sorted(project.rglob("*"))
    result = check("-S", "mpts.lr=0.01", "-S", override)
    assert result.exit_code == 2, result.output
    assert line in result.output and len(result.output.strip().splitlines()) == 1
    assert (project / "params.yaml").read_text() == TEXT and sorted(project.rglob("*")) == before


def test_good_overrides_pass_and_a_bad_file_is_exit_1(project):
    result = check("-S", "mpts.lambda=0.5", "-S", "shots.k=1,2")
    assert result.exit_code == 0 and result.output.strip().endswith(": ok (2 sweep points)")
    (project / "params.yaml").write_text(TEXT.replace("steps: 100", "steps: abc"))
    result = check("-S", "mpts.lambda=0.5")
    assert result.exit_code == 1 and "mpts.steps = 'abc'" in result.output
    assert check("-S", "mpts.steps=50").exit_code == 0  # an override may mend the file, as in `dvc exp run -S`


@pytest.mark.parametrize(
    "overrides",
    [
        ["mpts.lambda=true", "mpts.steps=abc", "dataset.categories=[]"],
        ["mpts.lr=1e-3", "model.pretrained=null", "shots.k=2", "laa.k=null", "memory.layers=[3, 6]"],
        ["dataset.categories=[a b,c]", "~mpts.stop", "+mpts.extra=1", "model.name='ViT-B-16'"],
    ],
)
def test_overrides_read_as_dvc_writes_them(tmp_path, overrides):
    """The values checked are those `dvc exp run -S` would leave in params.yaml (its own apply_overrides)."""
    written = tmp_path / "params.yaml"
    written.write_text(TEXT)
    apply_overrides(written, overrides)
    assert _with_overrides(PARAMS, overrides, Path("params.yaml")) == [yaml.safe_load(written.read_text())]


def test_a_duplicate_key_names_the_key_and_its_lines(project):
    text = TEXT.replace("  steps: 100 ", "  steps: 100\n  lr: 0.5\n  steps: 7 ")
    (project / "params.yaml").write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith("  steps: 7"))
    result = check()
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error: params.yaml: line {line}: key 'mpts.steps' appears twice (also on line {line - 2}): "
        "keep one (DVC refuses such a file)"
    )


def test_a_byte_that_is_not_utf8_is_named_by_its_offset(project):
    data = TEXT.encode().replace(b"seed: 0", b"seed: 0 # caf\xe9", 1)
    (project / "params.yaml").write_bytes(data)
    result = check()
    offset = data.index(b"\xe9")
    line = data[:offset].count(b"\n") + 1
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == (
        f"error: params.yaml: byte {offset} (line {line}) is b'\\xe9', not UTF-8: save the file as UTF-8"
    )


def test_a_refused_category_is_named(project):
    categories = "[carpet, grid, café, tile]"
    (project / "params.yaml").write_text(TEXT.replace("[carpet, grid, leather, tile,", f"{categories[:-1]},"))
    result = check()
    assert result.exit_code == 1
    assert result.output.strip() == f"error: params.yaml: dataset.categories[2] = 'café': {CATEGORY}"


def test_shots_beyond_the_fetched_split_are_refused(project):
    """With data/fingerprints (fetch has run for this root), shots.k must not exceed a category's training images."""
    record = project / "data" / "fingerprints" / "carpet" / "train.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"root": "data/mvtec", "category": "carpet", "split": "train", "images": 3}))
    assert check("-S", "shots.k=3").exit_code == 0
    result = check("-S", "shots.k=2,4")
    assert result.exit_code == 2
    assert result.output.strip().endswith(
        "shots.k = 4: category 'carpet' has only 3 training image(s) (data/fingerprints/carpet/train.json)"
    )
    assert check("-S", "shots.k=4", "-S", "dataset.root=elsewhere").exit_code == 0  # fetched for another root
