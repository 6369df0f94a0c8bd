"""The dispatcher behind `mpad exp run|offline|sweep|ablations`: arguments checked, the work planned as units,
and the units given to a backend (mpad.runs.local, or mpad.runs.cluster's Ray with `--cluster ADDRESS`).

Each command, in this order, so that a refusal changes nothing (issue 34):
1. its arguments: JOBS, SHOTS, SEEDS, PRESET, the `-S key=value` overrides' form (mpad.runs.guard's `Refused`:
   one line, exit 2);
2. the workspace lock (.dvc/tmp/mpad-exp.lock, `guard.workspace_lock`): a second command in the same workspace
   refuses at once; the kernel releases the lock when its holder exits, however it ends, and the next holder
   ends the process groups a killed one left running;
3. `mpad check -S ...` with every override (`guard.check`): params.yaml as the run would write it is valid;
4. the cluster's preflight (`--cluster`), then what a killed run left in DVC's queue (`local.clear_orphans`);
5. the work. SIGINT / SIGTERM stop every process it started (`local.stop`); the command then says what finished
   and what did not and exits 130 / 143. A re-run runs only what is missing: DVC skips a unit whose stages are
   up to date, and the sweep and the ablations queue only the experiments without a run of their params.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from mpad.io import write_json, write_text
from mpad.runs import guard, local
from mpad.runs.ablations import ablation_experiments, override_text
from mpad.runs.experiments import compare_table, experiments, flatten
from mpad.runs.sweep import (
    SWEPT,
    aggregate,
    code_paths,
    code_unchanged,
    exp_show,
    grid,
    markdown,
    parse_ints,
    point_name,
    runs_of,
    target_params,
    workspace_params,
)
from mpad.runs.units import FIRST, LAST, category_chains, visible_gpus, work_units, worker_env

DVC = local.DVC
LOGS = Path("logs/repro")
ABLATIONS = guard.PRESETS / "ablations.yaml"
REFUSED = 2  # exit status of a refusal, as a usage error


class Failed(Exception):
    """The work failed after it started (exit 1): one line, what failed and where to look."""


class Progress:
    """What a command set out to do and what of it finished, for the report on a stop."""

    def __init__(self) -> None:
        self.planned: list[str] = []
        self.finished: list[str] = []

    def report(self, signum: int) -> str:
        rest = [name for name in self.planned if name not in self.finished]
        return (
            f"stopped by {signal.Signals(signum).name}: finished {', '.join(self.finished) or 'nothing'}; "
            f"not finished {', '.join(rest) or 'nothing'} (a re-run runs only what is not finished)"
        )


class Backend:
    """The two functions of the contract, bound to the local backend or to a Ray cluster's address."""

    def __init__(self, cluster: str | None, jobs: int, repo: Path) -> None:
        cores = len(os.sched_getaffinity(0))
        self.cluster, self.jobs, self.threads = cluster, jobs, max(1, cores // jobs)
        if cluster is None:
            gpus = visible_gpus(os.environ)
            self.gpus = gpus
            env_for = functools.partial(worker_env, jobs=jobs, cores=cores, gpus=gpus, base=os.environ)
            self.run_units = functools.partial(local.run_units, jobs=jobs, env_for=env_for, logs=LOGS)
            self.experiment_threads = int(os.environ.get("OMP_NUM_THREADS") or self.threads)
            self.run_experiments = functools.partial(local.run_experiments, jobs=jobs)
            return
        if not cluster.strip():
            raise guard.Refused(
                f"CLUSTER={cluster!r}: give the Ray address (auto, HOST:PORT, ray://HOST:10001) or none"
            )
        try:
            from mpad.runs import cluster as ray_backend
        except ImportError as error:  # this checkout lacks the backend, or the backend lacks ray
            missing = "mpad/runs/cluster.py" if error.name in (None, "mpad.runs.cluster") else error.name
            raise guard.Refused(f"CLUSTER={cluster!r}: the Ray backend cannot load ({missing} is missing)") from None
        try:
            ray_backend.preflight(cluster, repo)
        except ray_backend.ClusterError as error:
            raise guard.Refused(str(error)) from None
        self.gpus, self.experiment_threads = [], self.threads
        self.run_units = functools.partial(ray_backend.run_units, cluster)
        self.run_experiments = functools.partial(ray_backend.run_experiments, cluster)


# 5. The work


def _run_units(backend: Backend, repo: Path, progress: Progress, log: Callable[[str], None]) -> int:
    """fetch, each category's units on the backend, then summarize when every category succeeded."""
    code, listed = local.call([DVC, "stage", "list", "--name-only"], capture=True)
    if code != 0:
        print(listed.rstrip(), file=sys.stderr)
        return 1
    chains = category_chains(listed.split("\n"))
    progress.planned = [FIRST, *chains, LAST]
    if local.call([DVC, "repro", FIRST]) != 0:
        return 1
    progress.finished.append(FIRST)
    where = f"on {backend.cluster}" if backend.cluster else f"{backend.jobs} at a time"
    gpus = backend.gpus
    log(
        f"{len(chains)} categories, {where}, {backend.threads} CPU threads each"
        + (f", GPUs {', '.join(gpus)} in turn" if len(gpus) > 1 else "")
    )
    status = backend.run_units({c: work_units(chain) for c, chain in chains.items()}, backend.threads, repo, log)
    progress.finished += [c for c in chains if status.get(c) == 0]
    failed = [c for c in chains if c in status and status[c] != 0]
    if local.stopped() is not None:
        return 1
    if failed or len(status) < len(chains):
        where = (lambda c: f"exit {status.get(c)}, its log above") if backend.cluster else (lambda c: LOGS / f"{c}.log")
        lines = "".join(f"\n  {c}: see {where(c)}" for c in chains if status.get(c) != 0)
        count = len(chains) - len(status) + len(failed)
        print(f"error: {count} of {len(chains)} categories failed ({LAST} not run):{lines}", file=sys.stderr)
        return 1
    code = local.call([DVC, "repro", "--single-item", LAST])
    if code == 0:
        progress.finished.append(LAST)
    return code


def _apply(overrides: Sequence[str], repo: Path) -> None:
    if overrides:
        from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls: params.yaml written alike

        apply_overrides(str(repo / "params.yaml"), list(overrides))


def run(repo: Path, backend: Backend, overrides: Sequence[str], progress: Progress, log) -> int:
    """`make run`: the pipeline on params.yaml (with the overrides written to it): `dvc repro`, or its units."""
    _apply(overrides, repo)
    if backend.jobs == 1 and backend.cluster is None:
        progress.planned = ["dvc repro"]
        return local.call([DVC, "repro"])
    return _run_units(backend, repo, progress, log)


def offline(repo: Path, backend: Backend, overrides: Sequence[str], progress: Progress, log) -> int:
    """`make offline`: the pipeline with the offline preset as the experiment `offline`, then metrics.md."""
    local.call([DVC, "exp", "remove", "-q", "offline"], capture=True)  # none yet: fine
    if backend.jobs == 1 and backend.cluster is None:
        progress.planned = ["offline"]
        code = local.call([DVC, "exp", "run", "-n", "offline", *(a for o in overrides for a in ("-S", o))])
    else:
        _apply(overrides, repo)
        code = _run_units(backend, repo, progress, log)
        code = code or _save_offline()
    if code == 0:
        print((repo / "metrics.md").read_text(), end="")
    return code


def _save_offline() -> int:
    """`dvc exp save` of the workspace as `offline`, with the stages' untracked outputs (in a fresh clone, the
    `cache: false` metrics and plots that git does not track yet) included, as `dvc exp run` includes them."""
    lock = yaml.safe_load(Path("dvc.lock").read_text()) or {}
    outs = {o["path"].rstrip("/") for stage in (lock.get("stages") or {}).values() for o in stage.get("outs") or []}
    listed = ["git", "ls-files", "--others", "--exclude-standard", "-z"]
    untracked = subprocess.run(listed, stdout=subprocess.PIPE, text=True, check=True).stdout.split("\0")
    ours = [f for f in untracked if f and any(f == o or f.startswith(f"{o}/") for o in outs)]
    return local.call([DVC, "exp", "save", "-f", "-n", "offline", *(a for f in ours for a in ("-I", f))])


def _experiments(
    backend: Backend,
    repo: Path,
    wanted: dict[Any, tuple[str, list[str], dict[str, Any]]],
    by_name: bool,
    progress: Progress,
    log,
) -> tuple[int, dict[Any, Any], list[dict]]:
    """Run the experiments of `wanted` ({key: (name, overrides, their values)}) that have no run of their params
    and this code (by name too: `by_name`). Returns (exit status, {key: its run's row}, the runs' `dvc exp show`)."""
    code = code_paths(yaml.safe_load((repo / "dvc.yaml").read_text()))

    def found() -> tuple[dict[Any, Any], list[dict]]:
        try:
            shown = exp_show(code)
        except ValueError:  # dvc failed (its message is on stderr) or printed no JSON
            raise Failed("`dvc exp show --json` failed (its message is above)") from None
        base = workspace_params(shown)
        targets = {key: {**base, **values} for key, (_, _, values) in wanted.items()}
        names = {key: name for key, (name, _, _) in wanted.items()} if by_name else None
        rows = experiments(shown)
        return runs_of(rows, targets, lambda rev: code_unchanged(rev, code), names), rows

    runs, rows = found()
    missing = {name: overrides for key, (name, overrides, _) in wanted.items() if key not in runs}
    if not missing:
        log("every experiment has a run of these params and this code: nothing to run")
        return 0, runs, rows
    progress.planned = list(missing)
    log(f"{len(missing)} of {len(wanted)} experiments to run: {', '.join(missing)}")
    _, listed = local.call([DVC, "exp", "list", "--name-only"], capture=True)
    stale = [name for name in missing if name in listed.split()]
    if stale:  # a run of the same name with other params or code: replaced, as `dvc exp run -n` would refuse
        local.call([DVC, "exp", "remove", "-q", *stale])
    status = backend.run_experiments(missing, backend.experiment_threads, repo, log)
    progress.finished += [name for name in missing if status.get(name) == 0]
    if local.stopped() is not None:
        return 1, runs, rows
    runs, rows = found()
    failed = [name for key, (name, _, _) in wanted.items() if key not in runs]
    if failed:
        print(f"error: no result of {', '.join(failed)}; `dvc queue logs <name>` says why", file=sys.stderr)
        return 1, runs, rows
    return 0, runs, rows


def sweep(
    repo: Path, backend: Backend, overrides: Sequence[str], shots: list[int], seeds: list[int], progress, log
) -> int:
    """`make sweep`: shots.k x shots.seed as experiments, then sweep.md and sweep.json."""
    values, base = guard.values(overrides), flatten(yaml.safe_load((repo / "params.yaml").read_text()))
    wanted = {}
    for point in grid(shots, seeds):
        sets = [*overrides, *(f"{key}={value}" for key, value in zip(SWEPT, point, strict=True))]
        wanted[point] = (point_name(point, target_params(base, values, point)), sets, target_params({}, values, point))
    code, runs, _ = _experiments(backend, repo, wanted, False, progress, log)
    if code != 0:
        return code
    result = aggregate(runs, shots, seeds)
    write_json(repo / "sweep.json", result)
    write_text(repo / "sweep.md", markdown(result))
    print((repo / "sweep.md").read_text(), end="")
    return 0


def ablations(
    repo: Path, backend: Backend, preset: Sequence[str], given: Sequence[str], seeds: list[int] | None, progress, log
) -> int:
    """`make ablations`: the arms of presets/ablations.yaml (per seed) as experiments, then their comparison."""
    spec = yaml.safe_load((repo / ABLATIONS).read_text())
    base = guard.values(preset)
    wanted = {}
    for name, values in ablation_experiments(spec, guard.values(given), seeds).items():
        sets = [*preset, *(override_text(key, value) for key, value in values.items())]
        wanted[name] = (name, sets, {**base, **values})
    code, _, rows = _experiments(backend, repo, wanted, True, progress, log)
    if code == 0:
        print(compare_table(rows), end="")
    return code


def compare(repo: Path) -> int:
    """`make compare`: the experiments of `dvc exp show --json` as mpad.runs.experiments' narrow table."""
    shown = subprocess.run([DVC, "exp", "show", "--json"], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        rows = experiments(json.loads(shown.stdout))
    except ValueError:
        print("error: no `dvc exp show --json` output to read", file=sys.stderr)
        return 1
    print(compare_table(rows) if rows else "no experiments with results: run `make ablations` or `dvc exp run`", end="")
    return 0


def dispatch(
    command: str,
    repo: Path,
    jobs: str = "1",
    cluster: str | None = None,
    sets: Sequence[str] = (),
    preset: str | None = None,
    shots: str | None = None,
    seeds: str | None = None,
    log: Callable[[str], None] = functools.partial(print, flush=True),
) -> int:
    """Run `command` (run, offline, sweep, ablations) in the DVC project `repo`: its exit status (2: refused with
    one line, nothing changed; 128 + signal: stopped, with what finished)."""
    progress = Progress()
    try:
        n = guard.parse_jobs(jobs)
        given = guard.parse_sets(sets)
        lines = guard.preset_lines("offline" if command == "offline" else preset, repo)
        try:
            shot_list = parse_ints(shots or "1,2,4", "SHOTS", 1)
            seed_list = parse_ints(seeds or "0,1,2", "SEEDS") if command == "sweep" or seeds else None
        except ValueError as error:
            raise guard.Refused(str(error)) from None
        guard.values([*lines, *given])  # each value parses as YAML
        if command == "ablations" and not (repo / ABLATIONS).is_file():
            raise guard.Refused(f"{ABLATIONS}: not found (the ablation arms; run from the project's root)")
        with local.signals(cluster is not None), guard.workspace_lock(repo, command, log):
            code = 1
            with local.interrupted():
                swept = zip(SWEPT, (shot_list, seed_list or []), strict=True)
                grid_sets = [f"{key}={','.join(map(str, values))}" for key, values in swept]
                guard.check([*lines, *given, *(grid_sets if command == "sweep" else [])], repo)  # each grid point
                backend = Backend(cluster, n, repo)
                if command in ("sweep", "ablations") and cluster is None:
                    local.clear_orphans(repo, log)
                if command in ("sweep", "ablations") and not lines and local.call([DVC, "repro", FIRST]) != 0:
                    code = 1  # queued copies read the workspace's dataset (mpad.workspace): fetched here, once
                elif command == "run":
                    code = run(repo, backend, given, progress, log)
                elif command == "offline":
                    code = offline(repo, backend, [*lines, *given], progress, log)
                elif command == "sweep":
                    code = sweep(repo, backend, [*lines, *given], shot_list, seed_list, progress, log)
                else:
                    code = ablations(repo, backend, lines, given, seed_list, progress, log)
        if (signum := local.stopped()) is not None:
            print(progress.report(signum), file=sys.stderr, flush=True)
            return 128 + signum
        return code
    except guard.Refused as error:
        if (signum := local.stopped()) is not None:  # a check or preflight cut short by the stop
            print(progress.report(signum), file=sys.stderr, flush=True)
            return 128 + signum
        print(f"error: {error}", file=sys.stderr, flush=True)
        return REFUSED
    except Failed as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
