"""Shots x seeds sweeps (`mpad exp sweep`, `make sweep`): which grid points still need a run, and the results with
their spread.

`make sweep SHOTS=1,2,4 SEEDS=0,1,2` runs each grid point without a run as a named DVC experiment
(`point_name`) through the dispatcher (mpad.runs.dispatch: the DVC queue with JOBS workers, or a Ray cluster),
then reads them back from `dvc exp show --json` and writes sweep.md (a table per k) and sweep.json (the same
numbers; `dvc metrics diff --targets sweep.json`).

A grid point has been run when an experiment has exactly the params the sweep gives it (the workspace's
params.yaml, the preset's overrides, shots.k and shots.seed) and ran the working tree's code: `git diff
<experiment> -- <code>` is empty for dvc.yaml and the code its stages depend on (`code_paths`). So a second `make
sweep` with nothing changed queues nothing, also after a commit of sweep.md (experiments of the commits since that
code last changed count, up to MAX_COMMITS), and a changed param or stage module re-runs the grid.

Only shots.seed varies (which k normal images are drawn, the paper's unstated choice); oagm.seed and mpts.seed
keep params.yaml's values, so the spread is that of the draw. Spread: mean, the sample standard deviation over
seeds (ddof = 1, `statistics.stdev`: the seeds are a sample of the possible draws; none with one seed) and the
lowest and highest seed's value.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import yaml

from mpad.data.catalog import CATALOG, TABLE_ORDER
from mpad.runs.experiments import flatten
from mpad.runs.tables import mean_std, mean_std_text, padded, widths
from mpad.summary import LABELS, group_means, random_weights_of, summary_of

SWEPT = ("shots.k", "shots.seed")
REPORTED = ("pixel_auroc", "aupro", "image_auroc")  # Table 1's pixel AUROC, then the usual companions
GROUP_ROWS = {"texture": "texture mean", "object": "object mean", "mean": "mean"}  # metrics.json's keys
PACKAGES = ("mpad", "stages")  # pyproject.toml's packages: the code
MAX_COMMITS = 10  # `dvc exp show -n`: each commit costs about a second
Point = tuple[int, int]  # (shots.k, shots.seed)
Key = TypeVar("Key")


def code_paths(pipeline: Mapping[str, Any]) -> list[str]:
    """dvc.yaml and its stages' deps inside the project's packages (mpad/, stages/): the code a run's results
    depend on, as DVC sees it (other deps are data: the dataset's fingerprints, earlier stages' outputs)."""
    deps = (dep for stage in (pipeline.get("stages") or {}).values() for dep in stage.get("deps") or [])
    return ["dvc.yaml", *dict.fromkeys(d for d in deps if d.split("/")[0] in PACKAGES)]


def parse_ints(text: str, what: str, least: int = 0) -> list[int]:
    """SHOTS or SEEDS as ints, "1,2,4" -> [1, 2, 4]; ValueError naming `what` when empty, not integers, below
    `least` or repeated."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or len(set(values)) != len(values) or min(values) < least:
        raise ValueError(f"{what}={text!r}: write distinct integers >= {least} separated by commas, e.g. 1,2")
    return values


def parse_overrides(lines: Iterable[str]) -> dict[str, Any]:
    """`key=value` lines of a preset file (comments and blank lines skipped) -> {key: YAML value}, as `-S` sets."""
    out = {}
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.strip().partition("=")
            if not sep:
                raise ValueError(f"preset line {line.strip()!r} is not key=value")
            out[key] = yaml.safe_load(value)
    return out


def grid(shots: Sequence[int], seeds: Sequence[int]) -> list[Point]:
    """Every (k, seed), k-major (DVC's order for `-S shots.k=... -S shots.seed=...`)."""
    return [(k, seed) for k in shots for seed in seeds]


def workspace_params(exp_show: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The workspace's params.yaml, flat, from `dvc exp show --json` (its first row)."""
    for row in exp_show:
        if row.get("rev") == "workspace":
            return flatten(((row.get("data") or {}).get("params") or {}).get("params.yaml", {}).get("data") or {})
    raise ValueError("`dvc exp show --json` has no workspace row")


def target_params(base: Mapping[str, Any], overrides: Mapping[str, Any], point: Point) -> dict[str, Any]:
    """The flat params of one grid point's run: base (params.yaml) with the overrides and (k, seed) set."""
    return {**base, **overrides, **dict(zip(SWEPT, point, strict=True))}


def runs_of(
    rows: Sequence[Mapping[str, Any]],
    targets: Mapping[Key, Mapping[str, Any]],
    fresh: Callable[[str], bool] = lambda rev: True,
    names: Mapping[Key, str] | None = None,
) -> dict[Key, Mapping[str, Any]]:
    """{key (a grid point, an ablation's name): the latest experiment row (mpad.runs.experiments) with exactly that
    key's params (and, given `names`, its name) that is `fresh` (ran the current code)}; keys without one are
    absent. Baseline commits' own results do not count."""
    found: dict[Key, Mapping[str, Any]] = {}
    for row in rows:  # run order: a later match replaces an earlier one
        if not row.get("experiment"):
            continue
        for key, params in targets.items():
            if row["params"] == params and (names is None or names[key] == row["name"]) and fresh(row["rev"]):
                found[key] = row
    return found


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """{mean, std (sample, ddof = 1; None with one value), min, max, n} of the values (percent), 4 decimals;
    all None with n = 0 (a metric not measurable in any run)."""
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean, std = mean_std(values)
    return {
        "mean": round(mean, 4),
        "std": None if std is None else round(std, 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def table_order(categories: Sequence[str], textures: Iterable[str]) -> tuple[list[str], list[str]]:
    """(textures, objects) among categories, each in the paper's Table 1 order for MVTec AD's names, else as
    listed."""
    rank = {c: i for i, c in enumerate(TABLE_ORDER)}
    ordered = sorted(categories, key=lambda c: (rank.get(c, len(rank)), list(categories).index(c)))
    texture_set = set(textures)
    return [c for c in ordered if c in texture_set], [c for c in ordered if c not in texture_set]


def aggregate(runs: Mapping[Point, Mapping[str, Any]], shots: Sequence[int], seeds: Sequence[int]) -> dict[str, Any]:
    """sweep.json: per k, per category and per group of metrics.json (texture, object: when both have categories and
    the group more than one; mean), the spread of each REPORTED metric over the seeds' runs. `runs` must hold
    every (k, seed); their params differ only there."""
    first = runs[(shots[0], seeds[0])]
    params, summary = first["params"], summary_of(first["metrics"])
    categories = list(params["dataset.categories"])
    listed = params.get("dataset.textures")
    textures, objects = table_order(categories, CATALOG[params["dataset.name"]].textures if listed is None else listed)
    per_k = {}
    for k in shots:
        members = [runs[(k, seed)]["metrics"] for seed in seeds]
        rows = {}
        for category in textures + objects:
            files = [m.get(f"metrics/{category}.json", {}) for m in members]
            rows[category] = {name: spread(_present(f.get(name) for f in files)) for name in REPORTED}
        sizes = {"texture": len(textures), "object": len(objects)}
        for group in GROUP_ROWS:  # a group's mean when there are two groups and it has two or more categories
            means = [group_means(summary_of(m), group) for m in members]
            if all(means) and (group == "mean" or (textures and objects and sizes[group] > 1)):
                rows[group] = {name: spread(_present(g.get(name) for g in means)) for name in REPORTED}
        per_k[str(k)] = rows
    return {
        "shots": list(shots),
        "seeds": list(seeds),
        "varied": "shots.seed",
        "fixed_seeds": {key: params.get(key) for key in ("oagm.seed", "mpts.seed")},
        "std": "sample standard deviation over seeds (ddof = 1)",
        "textures": textures,
        "objects": objects,
        "random_weights": random_weights_of(summary),
        "note": summary.get("note"),
        "k": per_k,
    }


def _present(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None]


def _mean_std(s: Mapping[str, Any]) -> str:
    return "n/a" if s["mean"] is None else mean_std_text(s["mean"], s["std"])


def _range(s: Mapping[str, Any]) -> str:
    return "n/a" if s["min"] is None else f"{s['min']:.2f}–{s['max']:.2f}"


def markdown(sweep: Mapping[str, Any]) -> str:
    """A table per k: rows = textures, objects (Table 1 order, grouped), group means and the mean; per metric
    mean ± std and min–max over seeds. Columns padded; under 120 characters a line for names of up to 14."""
    seeds = ", ".join(map(str, sweep["seeds"]))
    lines = []
    if sweep.get("random_weights"):
        note = f"**{sweep.get('note') or 'RANDOM WEIGHTS'}**"
        lines += [textwrap.fill(note, 118, initial_indent="> ", subsequent_indent="> "), ""]
    head = ["category"] + [h for name in REPORTED for h in (LABELS[name], "min–max")]
    for k in sweep["shots"]:
        rows, table = sweep["k"][str(k)], [head]
        both = bool(sweep["textures"] and sweep["objects"])
        for label, group, members in (
            ("*textures*", "texture", sweep["textures"]),
            ("*objects*", "object", sweep["objects"]),
        ):
            table += [[label] + [""] * (len(head) - 1)] if members and both else []
            table += [[c] + _cells(rows[c]) for c in members]
            table += [[GROUP_ROWS[group]] + _cells(rows[group])] if group in rows else []
        table.append(["**mean**"] + _cells(rows["mean"]))
        sizes = widths(table)
        lines += [f"**{k}-shot** (seeds {seeds}: n = {len(sweep['seeds'])})", ""]
        lines += ["| " + " | ".join(padded(table[0], sizes, 1)) + " |"]
        lines.append("|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(sizes)) + "|")
        lines += ["| " + " | ".join(padded(r, sizes, 1)) + " |" for r in table[1:]] + [""]
    fixed = ", ".join(f"{key} = {value}" for key, value in sweep["fixed_seeds"].items())
    lines += [
        "mean ± sample standard deviation (ddof = 1) over the seeds; min–max: the lowest and highest seed's value;",
        f"n/a: not measurable. Only shots.seed varies (which normal images are drawn); {fixed}.",
    ]
    return "\n".join(lines) + "\n"


def _cells(row: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [cell for name in REPORTED for cell in (_mean_std(row[name]), _range(row[name]))]


def point_name(point: Point, params: Mapping[str, Any]) -> str:
    """The experiment name of a grid point's run, `k1-s0-<6 hex digits of its params>`: readable, and another
    params.yaml or preset never replaces this one's run."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"k{point[0]}-s{point[1]}-{digest}"


def code_unchanged(rev: str, code: Sequence[str]) -> bool:
    """True when the experiment commit `rev` ran the working tree's code (git diff against it is empty)."""
    return subprocess.run(["git", "diff", "--quiet", rev, "--", *code], capture_output=True).returncode == 0


def exp_show(code: Sequence[str]) -> list[dict[str, Any]]:
    """`dvc exp show --json` over the commits since `code` last changed (up to MAX_COMMITS): an experiment of an
    earlier commit with the same code still counts, and one of a commit before that cannot. ValueError when DVC
    failed (its message is on stderr)."""
    git = ["git", "rev-list", "--first-parent"]
    last = subprocess.run([*git, "-1", "HEAD", "--", *code], capture_output=True, text=True).stdout.strip()
    since = subprocess.run([*git, "--count", f"{last}..HEAD"], capture_output=True, text=True).stdout.strip()
    commits = min(int(since or 0) + 1, MAX_COMMITS)
    shown = subprocess.run(["dvc", "exp", "show", "--json", "-n", str(commits)], stdout=subprocess.PIPE, text=True)
    return json.loads(shown.stdout)
