"""Shots x seeds sweeps (`make sweep`): which grid points still need a run, and the results with their spread.

`make sweep SHOTS=1,2,4 SEEDS=0,1,2` queues the grid points that have no run yet with DVC's own grid syntax
(`dvc exp run --queue -S 'shots.k=1,2,4' -S 'shots.seed=0,1,2'`), runs them with `dvc queue start -j JOBS`, and
reads them back from `dvc exp show --json`:

  python -m mpad.sweep plan --shots 1,2,4 --seeds 0,1,2 [--preset presets/offline.txt]
  python -m mpad.sweep report --shots 1,2,4 --seeds 0,1,2 [--preset ...]

`plan` prints one line of `-S` arguments per `dvc exp run --queue` still needed (none: nothing to run); `report`
writes sweep.md (a table per k) and sweep.json (the same numbers; `dvc metrics diff --targets sweep.json`).

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

import argparse
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mpad.data.catalog import CATALOG, TABLE_ORDER
from mpad.experiments import experiments, flatten, mean_std
from mpad.io import write_json, write_text
from mpad.summary import LABELS, group_means, random_weights_of, summary_of

SWEPT = ("shots.k", "shots.seed")
REPORTED = ("pixel_auroc", "aupro", "image_auroc")  # Table 1's pixel AUROC, then the usual companions
GROUP_ROWS = {"texture": "texture mean", "object": "object mean", "mean": "mean"}  # metrics.json's keys
PACKAGES = ("mpad", "stages")  # pyproject.toml's packages: the code
MAX_COMMITS = 10  # `dvc exp show -n`: each commit costs about a second
Point = tuple[int, int]  # (shots.k, shots.seed)


def code_paths(pipeline: Mapping[str, Any]) -> list[str]:
    """dvc.yaml and its stages' deps inside the project's packages (mpad/, stages/): the code a run's results
    depend on, as DVC sees it (other deps are data: the dataset's fingerprints, earlier stages' outputs)."""
    deps = (dep for stage in (pipeline.get("stages") or {}).values() for dep in stage.get("deps") or [])
    return ["dvc.yaml", *dict.fromkeys(d for d in deps if d.split("/")[0] in PACKAGES)]


def parse_ints(text: str, what: str) -> list[int]:
    """SHOTS or SEEDS as ints, "1,2,4" -> [1, 2, 4]; ValueError naming `what` when empty, not integers or
    repeated."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what}={text!r}: write integers separated by commas, e.g. 0,1,2") from None
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{what}={text!r}: write distinct integers separated by commas, e.g. 0,1,2")
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
    targets: Mapping[Point, Mapping[str, Any]],
    fresh: Callable[[str], bool] = lambda rev: True,
) -> dict[Point, Mapping[str, Any]]:
    """{point: the latest experiment row (mpad.experiments) with exactly that point's params that is `fresh`
    (ran the current code)}; points without one are absent. Baseline commits' own results do not count."""
    found: dict[Point, Mapping[str, Any]] = {}
    for row in rows:  # run order: a later match replaces an earlier one
        if not row.get("experiment"):
            continue
        for point, params in targets.items():
            if row["params"] == params and fresh(row["rev"]):
                found[point] = row
    return found


def queue_groups(missing: Sequence[Point]) -> list[tuple[list[int], list[int]]]:
    """The missing points as few grids as possible: ks that lack the same seeds share one (ks, seeds).
    A whole grid is one: `dvc exp run --queue -S shots.k=<ks> -S shots.seed=<seeds>` queues its product."""
    seeds_of: dict[int, list[int]] = {}
    for k, seed in missing:
        seeds_of.setdefault(k, []).append(seed)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, seeds in seeds_of.items():
        groups.setdefault(tuple(seeds), []).append(k)
    return [(ks, list(seeds)) for seeds, ks in groups.items()]


def set_args(ks: Sequence[int], seeds: Sequence[int]) -> str:
    """`-S 'shots.k=1,2' -S 'shots.seed=0,1'`: a DVC grid when a list has more than one value."""
    return " ".join(f"-S '{key}={','.join(map(str, values))}'" for key, values in zip(SWEPT, (ks, seeds), strict=True))


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
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.2f}" + ("" if s["std"] is None else f" ± {s['std']:.2f}")


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
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        lines += [f"**{k}-shot** (seeds {seeds}: n = {len(sweep['seeds'])})", ""]
        lines.append(_line(table[0], widths))
        lines.append("|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|")
        lines += [_line(r, widths) for r in table[1:]] + [""]
    fixed = ", ".join(f"{key} = {value}" for key, value in sweep["fixed_seeds"].items())
    lines += [
        "mean ± sample standard deviation (ddof = 1) over the seeds; min–max: the lowest and highest seed's value;",
        f"n/a: not measurable. Only shots.seed varies (which normal images are drawn); {fixed}.",
    ]
    return "\n".join(lines) + "\n"


def _cells(row: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [cell for name in REPORTED for cell in (_mean_std(row[name]), _range(row[name]))]


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
    return "| " + " | ".join(padded) + " |"


def _code_unchanged(rev: str, code: Sequence[str]) -> bool:
    """True when the experiment commit `rev` ran the working tree's code (git diff against it is empty)."""
    return subprocess.run(["git", "diff", "--quiet", rev, "--", *code], capture_output=True).returncode == 0


def _exp_show(code: Sequence[str]) -> list[dict[str, Any]]:
    """`dvc exp show --json` over the commits since `code` last changed (up to MAX_COMMITS): an experiment of an
    earlier commit with the same code still counts, and one of a commit before that cannot."""
    git = ["git", "rev-list", "--first-parent"]
    last = subprocess.run([*git, "-1", "HEAD", "--", *code], capture_output=True, text=True).stdout.strip()
    since = subprocess.run([*git, "--count", f"{last}..HEAD"], capture_output=True, text=True).stdout.strip()
    commits = min(int(since or 0) + 1, MAX_COMMITS)
    shown = subprocess.run(["dvc", "exp", "show", "--json", "-n", str(commits)], stdout=subprocess.PIPE, text=True)
    return json.loads(shown.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mpad.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("plan", "report"))
    parser.add_argument("--shots", default="1,2,4", help="shots.k values, e.g. 1,2,4")
    parser.add_argument("--seeds", default="0,1,2", help="shots.seed values, e.g. 0,1,2")
    parser.add_argument("--preset", type=Path, help="a presets/*.txt file of -S overrides")
    parser.add_argument("--markdown", type=Path, default=Path("sweep.md"))
    parser.add_argument("--json", type=Path, default=Path("sweep.json"))
    args = parser.parse_args(argv)
    try:
        shots, seeds = parse_ints(args.shots, "SHOTS"), parse_ints(args.seeds, "SEEDS")
        code = code_paths(yaml.safe_load(Path("dvc.yaml").read_text()))
        exp_show = _exp_show(code)
        base = workspace_params(exp_show)
        overrides = parse_overrides(args.preset.read_text().splitlines()) if args.preset else {}
    except ValueError as error:  # a bad list or preset line; dvc failed (its message is on stderr) or printed no JSON
        sys.exit(f"mpad.sweep: {error}")
    points = grid(shots, seeds)
    targets = {point: target_params(base, overrides, point) for point in points}
    runs = runs_of(experiments(exp_show), targets, lambda rev: _code_unchanged(rev, code))
    missing = [p for p in points if p not in runs]
    if args.action == "plan":
        print("\n".join(set_args(ks, group_seeds) for ks, group_seeds in queue_groups(missing)))
        return
    if missing:
        sys.exit(
            f"mpad.sweep: no successful run of (shots.k, shots.seed) = {missing}; `dvc queue logs <name>` says why"
        )
    sweep = aggregate(runs, shots, seeds)
    write_json(args.json, sweep)
    write_text(args.markdown, markdown(sweep))
    print(args.markdown.read_text(), end="")


if __name__ == "__main__":
    main()
