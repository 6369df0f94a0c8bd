"""Shots x seeds sweeps (mpad.runs.sweep) and ablations over seeds (mpad.runs.experiments' arms and noise mark), from
constructed `dvc exp show --json` rows. The end-to-end `make sweep` is in tests/test_cluster.py, whose Ray sweep
compares with it (one local sweep for both)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mpad.plots import ablation_rows, ablation_spec, render_png, sweep_rows, sweep_spec
from mpad.runs.experiments import arms, compare_table, experiments, within_noise
from mpad.runs.sweep import (
    aggregate,
    code_paths,
    grid,
    markdown,
    parse_ints,
    parse_overrides,
    point_name,
    runs_of,
    table_order,
    target_params,
    workspace_params,
)

CATEGORIES = ["disc", "stripes", "weave"]  # as listed; stripes and weave are textures


def _params(k: int = 1, seed: int = 0, **extra) -> dict:
    params = {
        "dataset": {"name": "synthetic", "categories": CATEGORIES, "textures": ["stripes", "weave"]},
        "shots": {"k": k, "seed": seed},
        "oagm": {"seed": 0},
        "mpts": {"seed": 0, "lambda": 1.0, "steps": 50},
    }
    for key, value in extra.items():
        section, leaf = key.split("__")
        params[section][leaf] = value
    return params


def _value(k: int, seed: int, category: str, metric: str) -> float:
    """A made-up metric: depends on k, seed, category and metric, so that every aggregate is distinct."""
    return 50.0 + 10 * k + 1.5 * seed**2 + CATEGORIES.index(category) + {"pixel_auroc": 0, "aupro": -20}.get(metric, 5)


def _data(params: dict, timestamp: str) -> dict:
    k, seed = params["shots"]["k"], params["shots"]["seed"]
    metrics = ("pixel_auroc", "aupro", "image_auroc")
    per = {c: {m: _value(k, seed, c, m) for m in metrics} for c in CATEGORIES}
    per["disc"]["image_auroc"] = None  # not measurable in this run: left out, never counted as 0
    mean = {m: statistics.fmean(v for c in CATEGORIES if (v := per[c][m]) is not None) for m in metrics}
    texture = {m: statistics.fmean(per[c][m] for c in ("stripes", "weave")) for m in metrics}
    summary = {"mean": mean, "texture": texture, "object": {m: per["disc"][m] for m in metrics}}
    return {
        "rev": "r",
        "timestamp": timestamp,
        "params": {"params.yaml": {"data": params}},
        "metrics": {
            **{f"metrics/{c}.json": {"data": per[c]} for c in CATEGORIES},
            "metrics.json": {"data": {**summary, "random_weights": True, "note": "RANDOM WEIGHTS here"}},
        },
    }


def _exp_show(experiments_params: list[tuple[str, dict]], workspace: dict | None = None) -> list[dict]:
    runs = [
        {"revs": [{"rev": f"{i + 1:040x}", "name": name, "data": _data(p, f"2026-01-01T10:{i:02d}:00")}], "name": name}
        for i, (name, p) in enumerate(experiments_params)
    ]
    return [
        {"rev": "workspace", "name": None, "data": _data(workspace or _params(), ""), "experiments": None},
        {"rev": "b" * 40, "name": "main", "data": _data(_params(), "2026-01-01T09:00:00"), "experiments": runs[::-1]},
    ]


def test_grid_arguments_and_point_names():
    assert parse_ints("1,2,4", "SHOTS") == [1, 2, 4] and parse_ints(" 0, 1 ", "SEEDS") == [0, 1]
    for bad in ("", "1,x", "1,1", "0,-1"):
        with pytest.raises(ValueError, match="SEEDS="):
            parse_ints(bad, "SEEDS")
    with pytest.raises(ValueError, match="SHOTS='0,1'"):
        parse_ints("0,1", "SHOTS", 1)
    points = grid([1, 2, 4], [0, 1, 2])
    assert points[:4] == [(1, 0), (1, 1), (1, 2), (2, 0)] and len(points) == 9
    # a point's experiment name: readable, and distinct for other params (another params.yaml or preset)
    one = point_name((1, 0), target_params({"mpts.lambda": 1.0}, {}, (1, 0)))
    assert one.startswith("k1-s0-") and len(one) == len("k1-s0-") + 6
    assert one == point_name((1, 0), target_params({"mpts.lambda": 1.0}, {}, (1, 0)))
    assert one != point_name((1, 0), target_params({"mpts.lambda": 0.5}, {}, (1, 0)))
    overrides = parse_overrides(["# comment", "", "dataset.categories=[a,b]", "model.pretrained=none", "x.y=2.0"])
    assert overrides == {"dataset.categories": ["a", "b"], "model.pretrained": "none", "x.y": 2.0}


def test_code_paths_are_dvc_yaml_and_the_stages_code_deps():
    pipeline = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    code = code_paths(pipeline)
    assert code[0] == "dvc.yaml" and {"stages/train.py", "mpad/mpts.py", "mpad/data", "mpad/metrics"} <= set(code)
    assert len(code) == len(set(code)) and not any(p.startswith("data/") or "${" in p for p in code)
    assert "metrics" not in code  # summarize's dep on evaluate's outputs is data
    assert "mpad/sweep.py" not in code and "mpad/plots.py" not in code  # a change of the report re-runs nothing


def test_runs_of_matches_exact_params_current_code_and_latest_run():
    shown = _exp_show(
        [
            ("old", _params(1, 0)),
            ("stale", _params(1, 1)),  # ran code that has changed since
            ("a", _params(1, 0)),  # a later run of the same point: it counts
            ("other-lambda", _params(2, 0, mpts__lambda=0.5)),  # not the sweep's params
            ("b", _params(2, 1)),
        ]
    )
    base = workspace_params(shown)
    targets = {p: target_params(base, {}, p) for p in grid([1, 2], [0, 1])}
    stale_rev = f"{2:040x}"
    found = runs_of(experiments(shown), targets, fresh=lambda rev: rev != stale_rev)
    assert {p: r["name"] for p, r in found.items()} == {(1, 0): "a", (2, 1): "b"}  # the baseline's own row: never
    # the preset's overrides are part of the params a run must have
    targets = {p: target_params(base, {"mpts.lambda": 0.5}, p) for p in grid([2], [0])}
    assert {p: r["name"] for p, r in runs_of(experiments(shown), targets).items()} == {(2, 0): "other-lambda"}


def test_aggregate_is_the_spread_of_the_per_run_metrics_files():
    shots, seeds = [1, 2], [0, 1, 2]
    shown = _exp_show([(f"k{k}s{s}", _params(k, s)) for k, s in grid(shots, seeds)])
    targets = {p: target_params(workspace_params(shown), {}, p) for p in grid(shots, seeds)}
    sweep = aggregate(runs_of(experiments(shown), targets), shots, seeds)
    assert sweep["textures"] == ["stripes", "weave"] and sweep["objects"] == ["disc"]
    cell = sweep["k"]["2"]["weave"]["aupro"]
    values = [_value(2, s, "weave", "aupro") for s in seeds]  # 2 + 70 - 20 + {0, 1.5, 6}
    assert cell["mean"] == pytest.approx(statistics.fmean(values), abs=1e-4)
    assert cell["std"] == pytest.approx(statistics.stdev(values), abs=1e-4)  # sample std: 3.1225, not 2.5495
    assert cell["std"] == pytest.approx(3.1225, abs=1e-4)
    assert (cell["min"], cell["max"], cell["n"]) == (52.0, 58.0, 3)
    assert sweep["k"]["1"]["disc"]["image_auroc"] == {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = sweep["k"]["1"]["mean"]["pixel_auroc"]
    assert mean["mean"] == pytest.approx(statistics.fmean(61 + 1.5 * s**2 for s in seeds), abs=1e-4)
    assert set(sweep["k"]["1"]) == {"stripes", "weave", "disc", "texture", "mean"}  # an object mean of one: no

    text = markdown(sweep)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 120, text
    assert lines[0] == "> **RANDOM WEIGHTS here**"
    first = lines.index("**1-shot** (seeds 0, 1, 2: n = 3)")
    labels = [line.split("|")[1].strip() for line in lines[first + 4 : first + 11]]
    assert labels == ["*textures*", "stripes", "weave", "texture mean", "*objects*", "disc", "**mean**"]
    assert lines[first + 11] == ""
    weave = next(line for line in lines[lines.index("**2-shot** (seeds 0, 1, 2: n = 3)") :] if "| weave" in line)
    assert [c.strip() for c in weave.split("|")[4:6]] == ["54.50 ± 3.12", "52.00–58.00"]
    assert "| n/a |" in text.replace(" ", "").replace("|n/a|", "| n/a |")


def test_table_order_is_the_papers_for_mvtec_then_as_listed():
    textures, objects = table_order(["zipper", "mine", "wood", "bottle", "carpet"], ["carpet", "wood"])
    assert textures == ["carpet", "wood"] and objects == ["bottle", "zipper", "mine"]


def _arm_rows(arms_means: dict[str, list[float]]) -> list[dict]:
    return experiments(_arm_show(arms_means))


def _arm_show(arms_means: dict[str, list[float]]) -> list[dict]:
    """`dvc exp show --json` of experiments `<arm>-s<seed>`, pixel AUROC mean = the given values (one per seed)."""
    shown = []
    for arm, values in arms_means.items():
        for seed, value in enumerate(values):
            params = _params(1, seed, mpts__lambda={"lambda-0": 0, "full": 1}.get(arm, 0.5))
            params["oagm"]["seed"] = params["mpts"]["seed"] = seed
            data = _data(params, "")
            data["metrics"]["metrics.json"]["data"]["mean"]["pixel_auroc"] = value
            name = arm if len(values) == 1 else f"{arm}-s{seed}"
            shown.append((name, data))
    runs = [
        {
            "revs": [{"rev": f"{i + 1:040x}", "name": n, "data": {**d, "timestamp": f"2026-01-01T10:{i:02d}:00"}}],
            "name": n,
        }
        for i, (n, d) in enumerate(shown)
    ]
    return [{"rev": "b" * 40, "name": "main", "data": {}, "experiments": runs}]


def test_noise_mark_within_the_spread_and_not_when_clearly_larger():
    assert within_noise([85.80, 86.80, 84.80], [86.54, 87.54, 85.54])  # 0.74 apart, spreads 1.0
    assert not within_noise([80.0, 80.5, 79.5], [86.54, 87.04, 86.04])  # 6.5 apart, spreads 0.5
    assert within_noise([86.0], [86.5, 88.5, 84.5]) and not within_noise([86.0], [86.5])  # one run has no spread
    rows = _arm_rows(
        {"lambda-0": [85.80, 86.80, 84.80], "lambda-0.5": [80.0, 80.5, 79.5], "full": [86.54, 87.54, 85.54]}
    )
    table = compare_table(rows)
    lines = table.splitlines()
    assert max(map(len, lines)) <= 120, table
    body = {line.split()[0]: line for line in lines[3:6]}
    assert set(body) == {"lambda-0*", "lambda-0.5*", "full*"}
    assert body["lambda-0*"].split()[2:4] == ["3", "85.80±1.00~"]  # seeds, pixel AUROC within noise
    assert body["lambda-0.5*"].split()[3] == "80.00±0.50"  # clearly lower: no mark
    assert body["full*"].split()[3] == "86.54±1.00"  # the reference itself
    assert any(line.startswith("~ within noise: differs from full's mean") for line in lines)
    assert any(line.startswith("± sample standard deviation (ddof = 1)") for line in lines)


def test_arms_count_each_seed_setting_once_and_one_seed_keeps_todays_table():
    rows = _arm_rows({"full": [86.0, 88.0, 84.0]})
    earlier = _arm_rows({"full": [99.0]})  # `make ablations` without SEEDS: seeds 0, as full-s0
    groups = arms(earlier + rows)
    assert [(g["name"], len(g["runs"])) for g in groups] == [("full", 3)]
    assert groups[0]["runs"][0]["name"] == "full-s0"  # the later run of the same seeds
    single = compare_table(_arm_rows({"lambda-0": [85.8], "full": [86.54]}))
    assert "seeds" not in single and "±" not in single and "~" not in single
    sweep_like = compare_table(experiments(_exp_show([("a", _params(1, 0)), ("b", _params(1, 1))])))
    assert sweep_like.splitlines()[1].split()[:1] == ["seed"]  # one run per arm: the seeds are params, as today
    assert single.splitlines()[0].split()[-4:] == ["Pixel", "AUPRO@0.3", "Pixel", "Image"]  # as today


def test_sweep_json_keys_are_flat_enough_for_dvc_metrics(tmp_path):
    shots, seeds = [1], [0, 1]
    shown = _exp_show([(f"s{s}", _params(1, s)) for s in seeds])
    targets = {p: target_params(workspace_params(shown), {}, p) for p in grid(shots, seeds)}
    sweep = aggregate(runs_of(experiments(shown), targets), shots, seeds)
    assert json.loads(json.dumps(sweep)) == sweep  # plain JSON: dvc metrics diff --targets sweep.json reads it


def test_sweep_chart_has_a_panel_per_metric_and_bars_of_one_std(tmp_path):
    shots, seeds = [1, 2], [0, 1, 2]
    shown = _exp_show([(f"k{k}s{s}", _params(k, s)) for k, s in grid(shots, seeds)])
    targets = {p: target_params(workspace_params(shown), {}, p) for p in grid(shots, seeds)}
    rows = sweep_rows(
        json.loads(json.dumps(aggregate(runs_of(experiments(shown), targets), shots, seeds), sort_keys=True))
    )
    weave = next(r for r in rows if r["row"] == "weave" and r["k"] == 2 and r["metric"] == "AUPRO@0.3")
    assert weave["mean"] == pytest.approx(54.5) and weave["hi"] - weave["lo"] == pytest.approx(2 * 3.1225, abs=2e-4)
    rows_at_1 = list(dict.fromkeys(r["row"] for r in rows if r["k"] == 1))  # as sweep.md, from sweep.json's sorted keys
    assert rows_at_1 == ["stripes", "weave", "texture mean", "disc", "mean"]
    assert not any(r["row"] == "disc" and r["metric"] == "Image AUROC" for r in rows)  # n/a: not drawn
    spec = sweep_spec(rows, "t")
    assert spec["facet"]["column"]["field"] == "metric" and len({r["metric"] for r in rows}) == 3
    image = Image.open(render_png(spec, tmp_path / "sweep.png"))
    assert image.format == "PNG" and 3 * 2 * 6 * 12 < image.width < 1600  # 3 panels x 2 k x 6 points of 12 px


def test_ablation_chart_draws_an_arm_over_seeds_as_one_bar_with_its_spread(tmp_path):
    rows = ablation_rows(_arm_show({"lambda-0": [85.0], "full": [86.0, 88.0, 84.0]}))
    stripes = [r for r in rows if r["category"] == "stripes"]  # 61 + 1.5 seed^2: 61, 62.5, 67 over seeds 0, 1, 2
    assert [r["experiment"] for r in stripes] == ["lambda-0", "full"] and "lo" not in stripes[0]
    std = statistics.stdev([61, 62.5, 67])
    assert stripes[1]["value"] == pytest.approx(63.5) and stripes[1]["hi"] == pytest.approx(63.5 + std)
    spec = ablation_spec(rows)
    assert len(spec["layer"]) == 2  # bars, then the spread lines
    assert Image.open(render_png(spec, tmp_path / "chart.png")).format == "PNG"
