"""params.schema.json: current with the pydantic models and params.yaml's comments, and it accepts params.yaml
(as it is, and with the offline preset applied) and refuses bad values, as `mpad check` does."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from stages.cli import app
from stages.schema import comments

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "params.schema.json").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _with(params: dict, dotted: str, value: object) -> dict:
    changed = copy.deepcopy(params)
    section, key = dotted.split(".", 1)
    changed[section][key] = value
    return changed


def test_the_committed_schema_is_current():
    result = CliRunner().invoke(app, ["schema", "--params", str(ROOT / "params.yaml"), "--out",
                                      str(ROOT / "params.schema.json"), "--check"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (ROOT / "params.yaml").read_text().startswith("# yaml-language-server: $schema=params.schema.json\n")


def test_descriptions_come_from_the_comments():
    mpts = SCHEMA["properties"]["mpts"]["properties"]
    assert mpts["lambda"]["description"].startswith("(paper: Table 2's best, used in Tables 1, 3, 4) guiding level")
    assert mpts["lambda"]["default"] == 1.0 and mpts["lambda"]["minimum"] == 0
    categories = SCHEMA["properties"]["dataset"]["properties"]["categories"]["description"]
    assert categories.startswith("a list, never null") and categories.endswith("(paper) all 15")
    assert "divergence" not in mpts  # a library knob, not a params key
    text = "s:\n  # above\n  a: 1  # on the line\n        # under it\n  b: [1,\n    2]  # continued\n"
    assert comments(text) == {"s.a": "above on the line under it", "s.b": "continued"}


def _preset(params: dict) -> dict:
    """params.yaml with presets/offline.txt's `key.path=value` overrides applied, as `dvc exp run -S` does."""
    applied = copy.deepcopy(params)
    for line in (ROOT / "presets/offline.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            dotted, value = line.split("=", 1)
            section, key = dotted.split(".", 1)
            applied[section][key] = yaml.safe_load(value)
    return applied


def test_params_yaml_and_the_offline_preset_are_valid():
    jsonschema.validate(PARAMS, SCHEMA)
    offline = _preset(PARAMS)
    assert offline != PARAMS
    jsonschema.validate(offline, SCHEMA)


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("mpts.lr", 0),
        ("mpts.lambda", -1),
        ("laa.attention", "kq"),
        ("shots.k", True),
        ("scoring.topk", "0.5"),
        ("dataset.categories", None),
        ("dataset.categories", ["a", "a"]),
        ("dataset.categories", ["it's"]),
        ("memory.layers", []),
        ("model.device", "banana"),
        ("mpts.lamda", 0.5),
    ],
)
def test_a_bad_value_is_refused_by_the_schema_and_by_check(dotted, value, tmp_path):
    bad = _with(PARAMS, dotted, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(app, ["check", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1 and dotted.split(".")[1] in result.output
