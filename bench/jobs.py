"""`make offline JOBS=N` against `make offline` (JOBS=1): wall time and results, measured alternating in one run.

Run: .venv/bin/python bench/jobs.py [--jobs 2] [--repeats 3] [--set KEY=VALUE ...]

Each run is `make offline` in a fresh git copy of this checkout (its tracked and new files) with this
checkout's venv: cold, with no DVC cache, an empty prompt-ensemble cache of its own (MPAD_CACHE_DIR in the
copy) and the generated dataset made by its own fetch. Runs alternate, JOBS=1 first. `--set` changes
presets/offline.txt in the copies (e.g. `--set dataset.categories=[stripes,disc]`). Printed: each run's wall
time and the load average before and after it (other work on the machine slows the runs, and more so the
one whose threads it takes), the mean JOBS=N / JOBS=1 ratio, and whether metrics, prompts and thresholds
files are byte-identical across all runs; where not, the largest difference of a metric and of a prompt
embedding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SKIP = ("data/", "metrics", "plots/", "dvclive/", "dvc.lock", "dvc_plots/", "logs/")


def copy_checkout(dest: Path, preset: dict[str, str]) -> None:
    """The checkout's tracked and new files (no results) in a new git repository at `dest`, preset rewritten."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    ).stdout.split("\n")
    for rel in filter(None, listed):
        if (rel.startswith(SKIP) and rel != "data/.gitignore") or not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    (dest / "presets/offline.txt").write_text("".join(f"{k}={v}\n" for k, v in preset.items()))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(git + command, cwd=dest, check=True)


def make_offline(project: Path, jobs: int) -> float:
    venv = Path(sys.executable).parent.parent
    env = {**os.environ, "MPAD_CACHE_DIR": str(project / ".mpad-cache")}
    env.pop("DVC_EXP_NAME", None)
    command = ["make", "-C", str(project), "offline", f"JOBS={jobs}", f"VENV={venv}", "-o", f"{venv}/.installed"]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (project / "make.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"make offline JOBS={jobs} failed in {project}:\n{(result.stdout + result.stderr)[-3000:]}")
    return wall


def results(project: Path) -> dict[str, str]:
    """sha256 of each metrics, prompts and thresholds file."""
    files = [project / "metrics.json", project / "metrics.md", *sorted((project / "metrics").glob("*.json"))]
    files += sorted((project / "data/prompts").glob("*.pt")) + sorted((project / "data/thresholds").glob("*.json"))
    return {str(f.relative_to(project)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def differences(a: Path, b: Path) -> str:
    """The largest difference between two runs' per-category metrics and learned text embeddings."""
    metric, text = 0.0, 0.0
    for path in sorted((a / "metrics").glob("*.json")):
        one, two = json.loads(path.read_text()), json.loads((b / "metrics" / path.name).read_text())
        for key, value in one.items():
            if isinstance(value, float) and isinstance(two.get(key), float):
                metric = max(metric, abs(value - two[key]))
    for path in sorted((a / "data/prompts").glob("*.pt")):
        one, two = (torch.load(p, weights_only=True)["text"] for p in (path, b / "data/prompts" / path.name))
        text = max(text, float((one - two).abs().max()))
    return f"largest metric difference {metric:.2g} points, largest text-embedding difference {text:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset override")
    parser.add_argument("--keep", action="store_true", help="keep the copies (printed)")
    args = parser.parse_args()
    lines = (REPO / "presets/offline.txt").read_text().splitlines()
    preset = dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    preset.update(item.split("=", 1) for item in args.set)
    base = Path(tempfile.mkdtemp(prefix="mpad-jobs-"))
    runs: list[dict] = []
    try:
        for repeat in range(args.repeats):
            for jobs in (1, args.jobs):
                project = base / f"run{repeat}-jobs{jobs}"
                copy_checkout(project, preset)
                load = os.getloadavg()[0]
                wall = make_offline(project, jobs)
                runs.append({"jobs": jobs, "wall": wall, "load": (load, os.getloadavg()[0]), "project": project})
                print(f"JOBS={jobs}: {wall:.0f} s (load {load:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
        walls = {j: [r["wall"] for r in runs if r["jobs"] == j] for j in (1, args.jobs)}
        loads = [x for r in runs for x in r["load"]]
        pairs = [two / one for one, two in zip(walls[1], walls[args.jobs], strict=True)]
        one, many = statistics.mean(walls[1]), statistics.mean(walls[args.jobs])
        print(
            f"\nJOBS={args.jobs} / JOBS=1 wall time: {many / one:.2f} (means {many:.0f} s / {one:.0f} s; per pair "
            f"{', '.join(f'{p:.2f}' for p in pairs)}); {os.cpu_count()} cores, load average {min(loads):.1f}-"
            f"{max(loads):.1f} before and after the runs"
        )
        first = results(runs[0]["project"])
        same = all(results(r["project"]) == first for r in runs)
        print(f"metrics, prompts and thresholds files byte-identical in all {len(runs)} runs: {same}")
        for run in runs[1:]:
            changed = sorted(k for k, v in results(run["project"]).items() if first.get(k) != v)
            if changed:
                print(
                    f"  {run['project'].name} vs the first run: {', '.join(changed)} differ; "
                    f"{differences(runs[0]['project'], run['project'])}"
                )
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
