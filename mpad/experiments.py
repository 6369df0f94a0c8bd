"""DVC experiments as rows, and the narrow comparison `make compare` prints.

`dvc exp show` prints every metrics file, param and dependency hash: about 300 columns here. This reads
its `--json` output and keeps what a comparison needs: experiments x the params that differ between them
x the mean metrics of metrics.json, two header lines so that columns stay narrow.

  dvc exp show --json | python -m mpad.experiments
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from mpad.summary import LABELS

COMPARED = ("pixel_auroc", "aupro", "pixel_f1_max", "image_auroc")  # the means of Tables 1-4
MAX_VALUE = 14  # a long param value (a category list) is cut to this many characters


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _row(name: str, data: Mapping[str, Any]) -> dict[str, Any] | None:
    """{name, timestamp, params (flat params.yaml), metrics {path: values}}; None without readable metrics."""
    metrics = {path: entry["data"] for path, entry in (data.get("metrics") or {}).items() if "data" in entry}
    if not metrics:
        return None
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    return {"name": name, "timestamp": data.get("timestamp") or "", "params": flatten(params), "metrics": metrics}


def experiments(exp_show: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of `dvc exp show --json`: each baseline commit with results, then its experiments in run order.

    The workspace row is left out (it repeats the last run), and so are runs without readable metrics
    (failed, queued, still running).
    """
    rows = []
    for baseline in exp_show:
        if baseline.get("rev") == "workspace":
            continue
        if row := _row(baseline.get("name") or str(baseline.get("rev", ""))[:7], baseline.get("data") or {}):
            rows.append(row)
        runs = []
        for exp in baseline.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            if rev.get("rev") != "workspace" and (
                row := _row(exp.get("name") or rev.get("rev", "")[:7], rev.get("data") or {})
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
    """Param keys (params.yaml order) whose values differ between rows."""
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    return [k for k in keys if any(r["params"].get(k) != rows[0]["params"].get(k) for r in rows)]  # 1 == 1.0


def compare_table(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = COMPARED) -> str:
    """Experiments x changed params x mean metrics (%), as aligned text; random-weight runs marked with *."""
    params = changed_params(rows)
    heads = [("experiment", "")] + [tuple(k.split(".", 1)) if "." in k else (k, "") for k in params]
    heads += [tuple((LABELS.get(m, m) + " ").split(" ", 1)) for m in metrics]
    body = []
    for r in rows:
        summary = r["metrics"].get("metrics.json", {})
        mean = summary.get("mean", {})
        name = r["name"] + ("*" if summary.get("random_weights") else "")
        body.append([name] + [_text(r["params"].get(k)) for k in params] + [_text(mean.get(m), ".2f") for m in metrics])
    table = [[a for a, _ in heads], [b.strip() for _, b in heads]] + body
    widths = [max(len(line[i]) for line in table) for i in range(len(heads))]
    first_metric = len(heads) - len(metrics)  # numbers right-aligned, text left-aligned
    lines = [
        "  ".join(
            cell.rjust(w) if i >= first_metric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in table
    ]
    lines.insert(2, "  ".join("-" * w for w in widths))
    if any(r["metrics"].get("metrics.json", {}).get("random_weights") for r in rows):
        lines.append("* random weights (model.pretrained = none): the numbers exercise the pipeline, not the method")
    return "\n".join(lines) + "\n"


def main() -> None:
    try:
        rows = experiments(json.load(sys.stdin))
    except ValueError:  # dvc failed (its message is on stderr) or printed no JSON
        sys.exit("no `dvc exp show --json` output to read")
    print(compare_table(rows) if rows else "no experiments with results: run `make ablations` or `dvc exp run`")


if __name__ == "__main__":
    main()
