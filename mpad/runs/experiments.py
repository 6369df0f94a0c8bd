"""DVC experiments as rows, and the narrow comparison `make compare` prints.

`dvc exp show` prints every metrics file, param and dependency hash: about 300 columns here. This reads
its `--json` output and keeps what a comparison needs: experiments x the params that differ between them
x the mean metrics of metrics.json, two header lines so that columns stay narrow.

`mpad exp compare` (`make compare`) prints it.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from mpad.runs.tables import mean_std, mean_std_text, padded, widths
from mpad.summary import LABELS, group_means, random_weights_of, summary_of

COMPARED = ("pixel_auroc", "aupro", "pixel_f1_max", "image_auroc")  # the means of Tables 1-4
MAX_VALUE = 14  # a long param value (a category list) is cut to this many characters
SEED_KEYS = ("shots.seed", "oagm.seed", "mpts.seed")  # what `make ablations SEEDS=...` sets together
SPREAD_COMPARED = ("pixel_auroc", "aupro", "image_auroc")  # with mean ± std, 3 metrics fit in 120 columns
REFERENCE = "full"  # the arm the others are compared with
NOISE_MARK = "~"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _row(name: str, rev: str, data: Mapping[str, Any], experiment: bool) -> dict[str, Any] | None:
    """{name, rev (commit), experiment (False: a baseline commit's own results), timestamp, params (flat
    params.yaml), metrics {path: values}}; None without readable metrics."""
    metrics = {path: entry["data"] for path, entry in (data.get("metrics") or {}).items() if "data" in entry}
    if not metrics:
        return None
    params = flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    timestamp = data.get("timestamp") or ""
    return {
        "name": name,
        "rev": rev,
        "experiment": experiment,
        "timestamp": timestamp,
        "params": params,
        "metrics": metrics,
    }


def experiments(exp_show: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of `dvc exp show --json`: each baseline commit with results, then its experiments in run order.

    The workspace row is left out (it repeats the last run), and so are runs without readable metrics
    (failed, queued, still running).
    """
    rows = []
    for baseline in exp_show:
        if baseline.get("rev") == "workspace":
            continue
        commit = str(baseline.get("rev", ""))
        if row := _row(baseline.get("name") or commit[:7], commit, baseline.get("data") or {}, False):
            rows.append(row)
        runs = []
        for exp in baseline.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            if rev.get("rev") != "workspace" and (
                row := _row(exp.get("name") or rev.get("rev", "")[:7], rev.get("rev", ""), rev.get("data") or {}, True)
            ):
                runs.append(row)
        rows += sorted(runs, key=lambda r: r["timestamp"])
    return rows


def _text(value: Any, decimals: str = "g") -> str:
    """A cell: params as written (0.5, 1), metrics with decimals ".2f"; long values cut."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, decimals)
    if isinstance(value, list):
        value = "[" + ",".join(map(str, value)) + "]"
    text = "-" if value is None else str(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def changed_params(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Param keys (params.yaml order) whose values differ between rows (or arms)."""
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    return [k for k in keys if any(r["params"].get(k) != rows[0]["params"].get(k) for r in rows)]  # 1 == 1.0


def arm_name(name: str) -> str:
    """`full-s1` -> `full`: `make ablations SEEDS=...` names an arm's run at seed s `<arm>-s<s>`."""
    return re.sub(r"-s\d+$", "", name)


def arms(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped into arms: the same name less a `-s<seed>` suffix and the same params apart from SEED_KEYS.

    Each arm is {name, params (without SEED_KEYS), runs}, in order of first appearance; `runs` holds one row per
    seed setting, the latest (same params and seeds give the same numbers), so an arm's earlier run at
    params.yaml's seeds (`full`) and its run at the same seeds (`full-s0`) count once.
    """
    groups: list[dict[str, Any]] = []
    for row in rows:
        name, params = arm_name(row["name"]), {k: v for k, v in row["params"].items() if k not in SEED_KEYS}
        group = next((g for g in groups if g["name"] == name and g["params"] == params), None)  # 1 == 1.0
        if group is None:
            group = {"name": name, "params": params, "by_seeds": {}}
            groups.append(group)
        group["by_seeds"][json.dumps([row["params"].get(k) for k in SEED_KEYS])] = row
    return [{"name": g["name"], "params": g["params"], "runs": list(g["by_seeds"].values())} for g in groups]


def within_noise(values: Sequence[float], reference: Sequence[float]) -> bool:
    """True when the means differ by less than the larger of the two standard deviations over seeds: the
    difference cannot be told from the seeds' spread. A single value has no spread; two single values: False."""
    spreads = [std for _, std in (mean_std(values), mean_std(reference)) if std is not None]
    return bool(spreads) and abs(statistics.fmean(values) - statistics.fmean(reference)) < max(spreads)


def _means(arm: Mapping[str, Any], metric: str) -> list[float]:
    """The arm's runs' metrics.json means of `metric` (runs where it is not measurable left out)."""
    values = ((group_means(summary_of(r["metrics"])) or {}).get(metric) for r in arm["runs"])
    return [float(v) for v in values if v is not None]


def compare_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Experiments x changed params x mean metrics (%), as aligned text; random-weight runs marked with *.

    When an arm has runs at more than one seed setting (`make ablations SEEDS=...`), a row per arm instead:
    its seed settings, and per metric (SPREAD_COMPARED) mean ± sample standard deviation over them, marked
    NOISE_MARK where its difference from the `full` arm is within the larger of the two spreads.
    """
    groups = arms(rows)
    seeded = any(len(g["runs"]) > 1 for g in groups)
    metrics = SPREAD_COMPARED if seeded else COMPARED
    reference = next((g for g in reversed(groups) if g["name"] == REFERENCE), None) if seeded else None
    shown = groups if seeded else [g["runs"][0] for g in groups]  # an arm's params lack the seeds
    params = changed_params(shown)
    heads = [("experiment", "")] + [tuple(k.split(".", 1)) if "." in k else (k, "") for k in params]
    heads += [("seeds", "")] if seeded else []
    heads += [tuple((LABELS.get(m, m) + " ").split(" ", 1)) for m in metrics]
    body = []
    for g, row in zip(groups, shown, strict=True):
        random = any(random_weights_of(summary_of(r["metrics"])) for r in g["runs"])
        name = row["name"] + ("*" if random else "")
        cells = [_text(row["params"].get(k)) for k in params] + ([str(len(g["runs"]))] if seeded else [])
        for m in metrics:
            values = _means(g, m)
            if not values:
                cells.append("-")
                continue
            mean, std = mean_std(values)
            noise = reference is not None and g is not reference and within_noise(values, _means(reference, m))
            mark = (NOISE_MARK if noise else " ") if reference is not None else ""  # a blank keeps digits aligned
            cells.append(mean_std_text(mean, std, "±") + mark)
        body.append([name] + cells)
    table = [[a for a, _ in heads], [b.strip() for _, b in heads]] + body
    sizes, first_metric = widths(table), len(heads) - len(metrics)  # numbers right-aligned, text left-aligned
    lines = ["  ".join(padded(line, sizes, first_metric)).rstrip() for line in table]
    lines.insert(2, "  ".join("-" * w for w in sizes))
    if any(random_weights_of(summary_of(r["metrics"])) for r in rows):
        lines.append("* random weights (model.pretrained = none): the numbers exercise the pipeline, not the method")
    if seeded:
        lines.append(
            "± sample standard deviation (ddof = 1) over an arm's seeds (shots.seed, oagm.seed, mpts.seed together)"
        )
    if reference is not None:
        lines.append(
            f"{NOISE_MARK} within noise: differs from {REFERENCE}'s mean by less than the larger of the two "
            "standard deviations"
        )
    return "\n".join(lines) + "\n"
