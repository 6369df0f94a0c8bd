"""The offline preset on a simulated 2-node Ray cluster (1 CPU each) against `make offline JOBS=2`, alternating.

Run: .venv/bin/python bench/cluster.py [--rounds 1] [--costs fullscale.json] [--keep]

Each round runs both arms from a fresh copy of the project (offline preset, 3 categories): `local` is
`mpad exp run --jobs 2` (what `make offline JOBS=2` runs before `dvc exp save`: 2 workers of one torch
thread each on a 2-core machine); `cluster` is what `make offline CLUSTER=ADDRESS` runs, `dvc repro fetch`,
mpad/runs/cluster.py's run_units with 1 thread a unit, then `dvc repro --single-item summarize`, against a
cluster of a CPU-less head and two 1-CPU worker nodes (ray.cluster_utils.Cluster, all on 127.0.0.1, each
worker with its own MPAD_WORKDIR; origin a bare git repository and the DVC remote a local folder). The
cluster has no more cores than the local run, so all of the difference is overhead. Prints the wall-time ratio
cluster / local, each unit's dispatch overhead (from its start on a node to its first stage starting, plus from
the end of its stages to its result restored in the coordinator's workspace: run_units logs both; the wait for a
free CPU, from submission to the start on a node, which the local run's queue has as well, is printed apart),
whether metrics.md came out equal, and a projection of the full 1-shot paper grid (15 categories x 3 seeds x
8 arms: 24 experiments, each one `dvc exp run` on a node) on N GPU nodes: each experiment costs its 15
categories' units plus one dispatch overhead, dealt to N nodes by mpad.runs.units.makespan. The per-unit costs
are the units measured here (offline preset, mean of the measured categories) unless --costs names a
bench/fullscale.py --out file (e.g. one measured with --device cuda), whose per-category projection
(fullscale.per_category) then gives them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: its address is 127.0.0.1
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from e2e import copy_project, preset_overrides, run, with_remotes  # noqa: E402
from harness import alternate, ratio, summary  # noqa: E402
from ray_nodes import simulated_cluster  # noqa: E402

from mpad.runs import cluster as backend  # noqa: E402
from mpad.runs.units import category_chains, makespan, work_units  # noqa: E402

ARMS, SEEDS, CATEGORIES = 8, 3, 15  # the paper's 1-shot grid: ablation arms x seeds, each over MVTec AD's categories
NODES = (1, 2, 4, 8, 24)
UNIT = re.compile(r"^(\S+): done on node .*: stages ([\d.]+) s, dispatch overhead ([\d.]+) s \(waited ([\d.]+) s")


def experiment_cost(units: list[tuple[str, float, float, float]], costs: Path | None) -> tuple[float, str]:
    """Seconds of one experiment of the 1-shot grid (15 categories' units, on one node) and where they come from:
    `costs` (a bench/fullscale.py --out file: fullscale.per_category's projection of each MVTec AD category), or
    else the measured units (mean of the measured categories, per unit) times 15."""
    if costs:
        import fullscale
        import stagerun

        result = json.loads(costs.read_text())
        steps = stagerun.PAPER["mpts"]["meta_epochs"] * stagerun.PAPER["mpts"]["steps"]
        per_category = fullscale.per_category(result["runs"], steps)
        return sum(sum(c.values()) for c in per_category.values()), f"{costs} ({result['config']['device']})"
    by_unit: dict[str, list[float]] = {}
    for name, stages, _, _ in units:
        by_unit.setdefault(name.rpartition("-")[2], []).append(stages)
    return CATEGORIES * sum(statistics.mean(v) for v in by_unit.values()), "this run's offline-preset units"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (each: both arms once)")
    parser.add_argument("--costs", type=Path, help="a bench/fullscale.py --out file: its per-unit costs project")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="mpad-bench-cluster-"))
    overrides = preset_overrides("offline")
    stack = contextlib.ExitStack()
    try:
        cluster, _ = stack.enter_context(simulated_cluster([folder / "node0", folder / "node1"]))
    except RuntimeError as err:  # its head is not on loopback
        raise SystemExit(str(err)) from None
    units: list[tuple[str, float, float, float]] = []  # (unit, stages s, overhead s, wait s) of every cluster round
    metrics: dict[str, list[str]] = {"local": [], "cluster": []}
    count = iter(range(1000))

    def local() -> float:
        project = copy_project(folder / f"local{next(count)}" / "project", overrides)
        start = time.perf_counter()
        run([sys.executable, "-c", "import stages.cli; stages.cli.app()", "exp", "run", "--jobs", "2"], project)
        elapsed = time.perf_counter() - start
        metrics["local"].append((project / "metrics.md").read_text())
        return elapsed

    def on_cluster() -> float:
        project = with_remotes(copy_project(folder / f"cluster{next(count)}" / "project", overrides))
        lines: list[str] = []
        start = time.perf_counter()
        run(["dvc", "repro", "fetch"], project)
        names = run(["dvc", "stage", "list", "--name-only"], project).split("\n")
        plan = {category: work_units(chain) for category, chain in category_chains(names).items()}
        status = backend.run_units(cluster.address, plan, 1, project, log=lines.append)
        if set(status.values()) != {0}:
            raise SystemExit("\n".join(lines))
        run(["dvc", "repro", "--single-item", "summarize"], project)
        elapsed = time.perf_counter() - start
        units.extend((m[1], float(m[2]), float(m[3]), float(m[4])) for m in map(UNIT.match, lines) if m)
        metrics["cluster"].append((project / "metrics.md").read_text())
        return elapsed

    try:
        times = alternate(args.rounds, {"local": local, "cluster": on_cluster}, warmup=False)
    finally:
        stack.close()
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    overheads = [o for _, _, o, _ in units]
    print(f"wall s: local {', '.join(f'{t:.0f}' for t in times['local'])}; "
          f"cluster {', '.join(f'{t:.0f}' for t in times['cluster'])}")  # fmt: skip
    for name, stages, overhead, wait in units:
        print(f"  {name}: stages {stages:.1f} s, dispatch overhead {overhead:.1f} s, waited for a CPU {wait:.1f} s")
    same = metrics["local"] == metrics["cluster"]
    print(f"metrics.md equal in every round: {same}")

    experiment, source = experiment_cost(units, args.costs)
    overhead = statistics.median(overheads)
    grid = {f"e{i}": [experiment + overhead] for i in range(ARMS * SEEDS)}
    projected = {n: makespan(grid, n) for n in NODES}
    print(f"projected 1-shot grid ({ARMS} arms x {SEEDS} seeds x {CATEGORIES} categories) from {source}, "
          f"{experiment:.0f} s an experiment + {overhead:.1f} s dispatch:")  # fmt: skip
    for n, seconds in projected.items():
        print(f"  {n} node(s): {seconds / 60:.1f} min")
    summary(
        "cluster",
        f"cluster/local wall time {ratio(times['cluster'], times['local'])}",
        f"dispatch overhead {overhead:.1f} s per unit (median of {len(overheads)}, max {max(overheads):.1f})",
        f"metrics.md equal: {same}",
        f"1-shot grid on 8 nodes {projected[8] / 60:.0f} min",
    )


if __name__ == "__main__":
    main()
