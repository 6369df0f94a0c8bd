"""Settings: params.yaml holds the defaults; each bad value is one line naming key, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mpad.config import CATEGORIES, CATEGORY, SECTIONS, ConfigError, MptsConfig
from stages.cli import app

PARAMS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


def test_params_yaml_holds_the_defaults():
    assert set(SECTIONS) == set(PARAMS)
    for name, cls in SECTIONS.items():
        assert cls.from_params(PARAMS[name]) == cls(), name


BAD = [
    ("evaluate", "resolution", 0, "must be an integer >= 8"),
    ("evaluate", "batch_size", 0, "must be an integer >= 1"),
    ("evaluate", "workers", -1, "must be an integer >= 0"),
    ("scoring", "image_score", "bogus", "must be one of max, topk_mean, global"),
    ("scoring", "smoothing_sigma", "abc", "must be a number >= 0"),
    ("scoring", "topk", 2, "must be a fraction in (0, 1]"),
    ("mpts", "lr", -1, "must be a number > 0"),
    ("mpts", "lambda", float("nan"), "must be a number >= 0"),
    ("prompts", "n_general", -3, "must be an integer >= 0"),
    ("model", "device", "banana", "must be auto, cpu, cuda or cuda:N"),
    ("model", "precision", "fp8", "must be one of fp32, fp16, bf16"),
    ("oagm", "clean_fraction", 1.5, "must be a number in [0, 1]"),
    ("laa", "attention", "kq", "must be one of vv, qk"),
    ("memory", "layers", [], "must be a non-empty list of block numbers >= 1"),
    ("dataset", "categories", ["a", "a"], CATEGORIES),
    ("dataset", "categories", None, CATEGORIES),  # DVC's matrix cannot iterate null
    ("shots", "k", True, "must be an integer >= 1"),
    # No boolean for a number (`dvc exp run -S mpts.lambda=true` writes true; DVC compares it as 1.0) ...
    ("mpts", "lambda", True, "must be a number >= 0"),
    ("laa", "k", False, "must be a number (<= 0 or null: no mask)"),
    ("mpts", "steps", "abc", "must be an integer >= 1"),  # ... nor a string (-S mpts.steps=abc)
    ("oagm", "enabled", 1, "must be true or false"),
]


@pytest.mark.parametrize(("section", "key", "value", "allowed"), BAD)
def test_bad_value_is_one_line_naming_key_value_and_allowed(section, key, value, allowed):
    with pytest.raises(ConfigError) as caught:
        SECTIONS[section].from_params({**PARAMS[section], key: value})
    assert str(caught.value) == f"{section}.{key} = {value!r}: {allowed}"


@pytest.mark.parametrize(
    ("categories", "line"),
    [
        (["it's"], f'dataset.categories[0] = "it\'s": {CATEGORY}'),  # would end dvc.yaml's quoting
        (["a", "a/b"], f"dataset.categories[1] = 'a/b': {CATEGORY}"),
        (
            ["a", " lead", "b", "café"],
            f"dataset.categories[1] = ' lead': {CATEGORY}\ndataset.categories[3] = 'café': {CATEGORY}",
        ),  # fmt: skip
    ],
)
def test_a_bad_entry_of_a_list_is_named(categories, line):
    """In a long list (MVTec AD's 15 categories) the line names the entry, not the whole list."""
    with pytest.raises(ConfigError) as caught:
        SECTIONS["dataset"].from_params({**PARAMS["dataset"], "categories": categories})
    assert str(caught.value) == line


def test_unknown_keys_and_missing_sections_are_named():
    with pytest.raises(ConfigError, match=r"mpts: unknown key\(s\) lamda \(known: lambda, "):
        MptsConfig.from_params({"lamda": 0.5})
    with pytest.raises(ConfigError, match="section 'mpts' missing"):
        MptsConfig.from_params(None)
    assert MptsConfig.from_params({"lambda": 0.5}).lam == 0.5  # other keys: defaults


def test_stage_reports_every_bad_value_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = {
        **PARAMS,
        "mpts": {**PARAMS["mpts"], "lr": -1, "lambda": float("nan")},
        "prompts": {**PARAMS["prompts"], "n_general": -3},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines[0] == "error: params.yaml:"
    assert sorted(line.strip() for line in lines[1:]) == [
        "mpts.lambda = nan: must be a number >= 0",
        "mpts.lr = -1: must be a number > 0",
        "prompts.n_general = -3: must be an integer >= 0",
    ]


def test_check_validates_every_section_before_dvc_reads_them(tmp_path):
    """`mpad check` (run by `make run` before `dvc repro`): DVC cannot expand `dataset.categories: null`."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    result = CliRunner().invoke(app, ["check", "--params", str(params)])
    assert result.exit_code == 0 and result.output.strip() == f"{params}: ok"
    params.write_text(
        yaml.safe_dump(
            {**PARAMS, "dataset": {**PARAMS["dataset"], "categories": None}, "mpts": {**PARAMS["mpts"], "lr": 0}}
        )
    )
    result = CliRunner().invoke(app, ["check", "--params", str(params)])
    lines = " ".join(result.output.split())
    assert result.exit_code == 1 and f"dataset.categories = None: {CATEGORIES}" in lines and "mpts.lr = 0" in lines
