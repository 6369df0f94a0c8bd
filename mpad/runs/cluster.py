"""The Ray backend: a run's per-category units and whole experiments on the nodes of a Ray cluster, their results
brought back as plain DVC state (a run: dvc.lock and outputs as `dvc repro` leaves them; experiments: exp refs).

ADDRESS is anything `ray.init(address=...)` takes (`auto`, `HOST:PORT`, `ray://HOST:10001`). Nodes share no
filesystem: mpad/runs/remote.py carries the code (git `origin`) and the data and results (the default DVC remote).

Scheduling: each unit asks Ray for `threads` CPUs (and one GPU where the cluster has GPUs); the first unit of every
category is submitted at once and a category's next one when its result is in the workspace, so that, as
mpad/runs/units.py's rule does locally, the trainings come first and the short evaluations fill the nodes at the end.
A unit lost with its node runs again on another (Ray's task retries); a unit whose result is already in the DVC
remote (a coordinator started again) is restored, not run. A failed unit stops its category only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import yaml

from mpad import io
from mpad.runs import remote
from mpad.runs.preflight import ClusterError, check_clean, connect, dvc_remote, git, origin_url, preflight

__all__ = ["ClusterError", "preflight", "run_experiments", "run_units"]  # the dispatcher's contract

JOURNAL = ".dvc/tmp/mpad-restore.json"  # the unit being restored and dvc.lock of before (`recover`)
RETRIES = 3  # a unit lost with its node (or its worker process) runs again this many times


class Workspace:
    """The coordinator's side: its commit on origin, its DVC remote, and results restored into its workspace."""

    def __init__(self, repo: Path, log: Callable[[str], None] = print):
        from dvc.repo import Repo

        self.repo = Path(repo).resolve()
        recover(self.repo, log)
        check_clean(self.repo)
        self.git_url = origin_url(self.repo)
        self.remote_name, config = dvc_remote(self.repo)
        self.sha = git(self.repo, "rev-parse", "HEAD").strip()
        git(self.repo, "push", "-q", "origin", f"+HEAD:{remote.RUNS_REF}{self.sha}")
        self.remote = remote.open_remote(self.repo)
        with Repo(os.fspath(self.repo)) as dvc:
            self.upstream = {
                s.name: sorted({d.name for d in dvc.index.graph.successors(s)}) for s in dvc.index.graph.nodes
            }
        self.job = {"sha": self.sha, "git_url": self.git_url, "dvc_remote": self.remote_name, "dvc_url": config["url"]}

    def text(self, name: str) -> str | None:
        path = self.repo / name
        return path.read_text() if path.exists() else None

    def lock_entries(self) -> dict:
        from dvc.utils.serialize import parse_yaml

        text = self.text("dvc.lock")
        return (parse_yaml(text, "dvc.lock") or {}).get("stages", {}) if text else {}

    def unit_job(self, name: str, stages: Sequence[str], threads: int) -> dict:
        """A unit's job: what a node needs to run `stages`, and the key of their result."""
        entries = self.lock_entries()
        inputs = sorted({u for s in stages for u in self.upstream[s] if u not in stages})
        missing = [i for i in inputs if i not in entries]
        if missing:
            raise ClusterError(f"{', '.join(missing)} has no dvc.lock entry in {self.repo}: run it before {stages[0]}")
        params = self.text("params.yaml")
        key = remote.unit_key(self.sha, params, {i: entries[i] for i in inputs}, stages)
        lock = self.text("dvc.lock")
        return {**self.job, "name": f"{name}-{key[:8]}", "stages": list(stages), "inputs": inputs, "key": key,
                "params": params, "lock": lock, "threads": threads}  # fmt: skip

    def restore(self, name: str, stages: Sequence[str], data: bytes) -> None:
        """A unit's result into the workspace: its dvc.lock entries, its cached outputs from the DVC remote (DVC's
        own pull and checkout) and its uncached ones; on any failure the dvc.lock of before, and ClusterError."""
        from dvc.repo import Repo
        from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update

        entries, files = remote.unpack(data)
        before = self.text("dvc.lock")
        doc = parse_yaml_for_update(before or "schema: '2.0'\nstages: {}\n", "dvc.lock")
        doc.setdefault("stages", {}).update(entries)
        io.write_json(self.repo / JOURNAL, {"unit": name, "lock": before})  # before dvc.lock names absent outputs
        io.write_text(self.repo / "dvc.lock", dumps_yaml(doc))
        try:
            with Repo(os.fspath(self.repo)) as dvc:
                dvc.pull(targets=remote.targets(self.repo, stages), force=True)
                for stage in (s for target in remote.targets(self.repo, stages) for s in dvc.stage.collect(target)):
                    for out in stage.outs:
                        out.ignore()  # as `dvc repro` adds its outputs to .gitignore
                        if not out.use_cache and out.exists:  # stale uncached outputs go, as repro removes them
                            shutil.rmtree(out.fs_path) if os.path.isdir(out.fs_path) else os.unlink(out.fs_path)
            for rel, content in files.items():
                path = (self.repo / rel).resolve()
                if not path.is_relative_to(self.repo):
                    raise ValueError(f"{rel} is outside the workspace")
                io.write_bytes(path, content)
        except Exception as err:
            put_back(self.repo, before)
            raise ClusterError(f"unit {name}: its result did not arrive ({str(err).splitlines()[0]})") from None
        (self.repo / JOURNAL).unlink()


def put_back(repo: Path, lock: str | None) -> None:
    """dvc.lock as it was before a restore (None: no file), and the restore's journal gone."""
    if lock is None:
        (repo / "dvc.lock").unlink(missing_ok=True)
    else:
        io.write_text(repo / "dvc.lock", lock)
    (repo / JOURNAL).unlink(missing_ok=True)


def recover(repo: Path, log: Callable[[str], None]) -> None:
    """A restore cut off (the coordinator killed while it pulled a unit's outputs) leaves its journal, whose
    dvc.lock of before is put back: dvc.lock never names outputs that did not arrive. The unit's result is
    still in the DVC remote, so the next run restores it again."""
    journal = repo / JOURNAL
    if journal.is_file():
        cut = json.loads(journal.read_text())
        put_back(repo, cut["lock"])
        log(f"{cut['unit']}: its restore was cut off (the coordinator stopped): dvc.lock is as before it")


def unit_name(category: str, index: int, count: int) -> str:
    return category if count == 1 else f"{category}-{index + 1}"


def run_units(
    address: str,
    units: Mapping[str, Sequence[Sequence[str]]],
    threads: int,
    repo: Path,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """A run's per-category units ({category: [[stage names of unit 1], [unit 2]]}, exactly the `units` of
    mpad/runs/local.py's run_units: units of one category run in order, each `dvc repro --single-item <stages>`)
    on the cluster, after the coordinator ran `fetch` locally. Returns {category: exit status} like the local
    run_units. Afterwards the coordinator's workspace holds every finished unit's outputs and dvc.lock
    entries exactly as a local `dvc repro` would have left them (so `dvc status` is clean but for fetch).

    Logs a line per unit: where it ran, its stages' time, and its dispatch overhead: from its start on the node to
    its first stage starting, plus from its last stage's end to its result restored here (the wait for a free CPU,
    from submission to its start on the node, is logged apart)."""
    from dvc.repo import Repo

    stages = [stage for chain in units.values() for unit in chain for stage in unit]
    if len(set(stages)) < len(stages):  # two units would write one result
        raise ClusterError(f"a stage is in two units: {sorted(s for s in set(stages) if stages.count(s) > 1)}")
    work = Workspace(repo, log)
    with Repo(os.fspath(work.repo)) as dvc:  # fetch's outputs, which every node uses instead of running fetch
        dvc.push(targets=remote.targets(work.repo, ["fetch"]))
    ray = connect(address)
    try:
        task, threads = unit_task(ray, threads, log)
        done, status, pending = dict.fromkeys(units, 0), {}, {}

        def advance(category: str) -> None:
            """Restore the category's next units that have a result; submit the first that has none."""
            while done[category] < len(units[category]):
                stages = units[category][done[category]]
                name = unit_name(category, done[category], len(units[category]))
                job = work.unit_job(name, stages, threads)
                data = remote.get_result(work.remote, job["key"])
                if data is None:
                    pending[task.remote("run_unit", job)] = (category, name, job, time.time())
                    log(f"{name}: {' '.join(stages)} submitted")
                    return
                work.restore(name, stages, data)
                log(f"{name}: restored its result of an earlier run")
                done[category] += 1
            status[category] = 0

        for category in units:
            advance(category)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            category, name, job, submitted = pending.pop(ref)
            result = outcome(ray, ref)
            try:
                if "error" in result:
                    raise failure(f"unit {name} ({' '.join(job['stages'])})", result)
                data = remote.get_result(work.remote, job["key"])
                if data is None:
                    raise ClusterError(
                        f"unit {name} ended on node {result['node']} but its result is not in the remote"
                    )
                work.restore(name, job["stages"], data)
                started, repro_start, repro_end, _ = result["times"]
                sent, back = repro_start - started, time.time() - repro_end
                times = f"stages {repro_end - repro_start:.1f} s, dispatch overhead {sent + back:.1f} s"
                split = f"waited {started - submitted:.1f} s, to its first stage {sent:.1f} s, result back {back:.1f} s"
                log(f"{name}: done on node {result['node']}: {times} ({split}), log {result['log']}")
                done[category] += 1
                advance(category)
            except ClusterError as err:  # this category stops; the others go on
                status[category] = 1
                log(f"error: {err}")
        return status
    finally:
        ray.shutdown()


def unit_task(ray, threads: int, log: Callable[[str], None]):
    """(remote.task as a Ray task of `threads` CPUs, and one GPU where the cluster has GPUs, retried when lost; the
    threads). A unit asking for more CPUs than the largest node has would wait forever: it gets that node's."""
    most = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
    if most < 1:
        raise ClusterError("the Ray cluster has no node with CPUs: start workers (`ray start --address=...`)")
    if threads > most:
        log(f"{threads} CPU threads a unit, but the largest node has {int(most)} CPUs: {int(most)} a unit")
        threads = int(most)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    return ray.remote(remote.task).options(num_cpus=threads, num_gpus=gpus, max_retries=RETRIES), threads


def failure(what: str, result: Mapping) -> ClusterError:
    """A failed task's error: what failed, on which node, the error and its log's last lines, indented."""
    tail = "".join(f"\n    {line}" for line in result["tail"].splitlines())
    return ClusterError(f"{what} failed on node {result['node']}: {result['error']}{tail}")


def outcome(ray, ref) -> dict:
    """A finished task's result; a task lost more than RETRIES times as an error."""
    try:
        return ray.get(ref)
    except Exception as err:
        return {"node": "unknown", "error": (str(err).strip().splitlines() or [repr(err)])[-1], "tail": ""}


def run_experiments(
    address: str,
    experiments: Mapping[str, Sequence[str]],
    threads: int,
    repo: Path,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """{experiment name: its `-S key=value` overrides}, each a whole `dvc exp run -n NAME -S ...` on a node.
    Returns {name: exit status}. Afterwards the coordinator has one exp ref per finished name, as
    `dvc exp show`, `make compare` and `dvc exp apply` expect (`dvc exp pull` of each from origin)."""
    from dvc.repo import Repo

    work = Workspace(repo, log)
    ray = connect(address)
    try:
        task, threads = unit_task(ray, threads, log)
        params = work.text("params.yaml")
        job = {**work.job, "params": params, "lock": work.text("dvc.lock"), "threads": threads}
        datasets = pinned_datasets(work.repo, params, experiments, log)
        pending, status = {}, {}

        def pull(name: str, node: str) -> None:
            """The experiment's exp ref from origin and its cached outputs from the DVC remote: the ref of this
            commit by its full name, never a run of the same name on another commit (other code)."""
            from dvc.repo.experiments.refs import ExpRefInfo

            try:
                with Repo(os.fspath(work.repo)) as dvc:
                    dvc.experiments.pull(work.git_url, [str(ExpRefInfo(work.sha, name))], force=True, pull_cache=True)
            except Exception as err:
                raise ClusterError(f"experiment {name} ran on node {node} but `dvc exp pull` failed: {err}") from None

        for name, overrides in experiments.items():
            key = remote.unit_key(work.sha, params, {"overrides": list(overrides), "data": datasets[name]}, [name])
            if remote.get_result(work.remote, key) is not None:  # a coordinator started again
                pull(name, "of an earlier run")
                status[name] = 0
                log(f"{name}: restored from an earlier run")
                continue
            spec = {**job, "name": name, "overrides": list(overrides), "key": key, "pinned": datasets[name]}
            pending[task.remote("run_experiment", spec)] = (name, time.time())
            log(f"{name}: dvc exp run {' '.join(f'-S {kv}' for kv in overrides)} submitted")
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            name, submitted = pending.pop(ref)
            result = outcome(ray, ref)
            try:
                if "error" in result:
                    raise failure(f"experiment {name}", result)
                pull(name, result["node"])
                status[name] = 0
                log(f"{name}: done on node {result['node']} in {time.time() - submitted:.1f} s, log {result['log']}")
            except ClusterError as err:  # this experiment fails; the others go on
                status[name] = 1
                log(f"error: {err}")
        return status
    finally:
        ray.shutdown()


def pinned_datasets(
    repo: Path, params: str, experiments: Mapping[str, Sequence[str]], log: Callable[[str], None]
) -> dict[str, str]:
    """{experiment: JSON of {"manifest", "shapes"}}: its dataset (params.yaml with its overrides, written as
    `dvc exp run -S` writes them) made available here as fetch does, and described. A node's fetch writes this
    manifest instead of its own (mpad.data.manifest.pin): fingerprints hold mtimes, and with the node's the
    exp ref would hold fingerprints the coordinator's dataset never matches, so that `dvc exp apply` then
    `dvc repro` would run the pipeline again."""
    from dvc.utils.hydra import apply_overrides

    from mpad import layout
    from mpad.config import ConfigError, load_sections
    from mpad.data.manifest import shapes
    from mpad.data.mvtec import DatasetError
    from mpad.data.prepare import prepare_dataset

    described: dict[str, str] = {}
    pinned = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(repo):  # dataset.root is relative to the repo
        for name, overrides in experiments.items():
            path = Path(tmp, "params.yaml")
            path.write_text(params)
            if overrides:
                apply_overrides(str(path), list(overrides))
            try:
                (dataset,) = load_sections(yaml.safe_load(path.read_text()), "dataset")
                key = dataset.model_dump_json()
                if key not in described:
                    manifest = prepare_dataset(dataset, layout.DOWNLOADS, log)
                    found = shapes(dataset.path, manifest["categories"])
                    described[key] = json.dumps({"manifest": manifest, "shapes": found}, sort_keys=True)
            except (ConfigError, DatasetError) as err:
                raise ClusterError(f"experiment {name}: {str(err).splitlines()[0]}") from None
            pinned[name] = described[key]
    return pinned
