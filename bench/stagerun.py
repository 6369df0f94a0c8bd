"""Run the pipeline's stage commands as child processes in a project folder (no DVC), and measure them.

Each stage is `python -m stages <command> ...` in its own process, with this checkout first on PYTHONPATH,
the stages' prompt-ensemble cache in the project (MPAD_CACHE_DIR: empty at first, shared by its stages
as on a new machine). With a timings file, MPAD_TIMINGS names it (`stages.common.StageProgress` records its
loop's first-item and end times there) and the command is `python bench/phases.py <command> ...`, which
records the start-up phases in MPAD_PHASES (the timings file's sibling phases.jsonl). Peak RSS comes from
os.wait4's rusage of that child. `run_pipeline(..., jobs=N)` runs the categories' chains N at a time, as
`make run JOBS=N` does (threads per worker: mpad.runs.units.worker_env).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from phases import PHASES_ENV

from mpad.runs.units import worker_env

REPO = Path(__file__).resolve().parents[1]
CATEGORY_STAGES = ("sample", "synthesize", "train", "evaluate")
PAPER = yaml.safe_load((REPO / "params.yaml").read_text())  # this checkout's params.yaml, before any override


def preset(name: str) -> list[str]:
    """The `key=value` override lines of presets/<name>.txt."""
    lines = (REPO / "presets" / f"{name}.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def make_project(folder: Path, overrides: list[str]) -> dict[str, Any]:
    """Write folder/params.yaml: this checkout's params.yaml with `a.b=value` overrides (values read as YAML,
    as `dvc exp run -S` does); return the params."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def run_stage(
    project: Path, args: list[str], timings: Path | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `mpad ARGS` in `project` (environment `env`, default os.environ); return {stage, args, spawn, exit,
    wall, peak_rss_mib, pid, load1} (load1: the machine's 1-minute load average at its end: other work on the
    machine slows every stage). Its output goes to project/logs/; a failure raises with the log's tail."""
    base = os.environ if env is None else env
    env = {
        **base,
        "PYTHONPATH": os.pathsep.join([str(REPO), base.get("PYTHONPATH", "")]),
        "MPAD_CACHE_DIR": str(project / ".mpad-cache"),
    }
    command = [sys.executable, "-m", "stages", *args]
    if timings is not None:
        env["MPAD_TIMINGS"] = str(timings)
        env[PHASES_ENV] = str(phases_file(timings))
        command = [sys.executable, str(REPO / "bench" / "phases.py"), *args]
    log = project / "logs" / ("_".join(args[:1] + args[2:3]) + ".log")
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as out:
        spawn = time.time()
        child = subprocess.Popen(command, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        end = time.time()
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(
            f"mpad {' '.join(args)} failed ({child.returncode}) in {project}:\n" + log.read_text()[-3000:]
        )
    return {
        "stage": args[0],
        "args": args,
        "spawn": spawn,
        "exit": end,
        "wall": end - spawn,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "pid": child.pid,
        "load1": os.getloadavg()[0],
    }


def run_pipeline(
    project: Path, categories: list[str], timings: Path | None = None, echo: bool = True, jobs: int = 1
) -> list[dict[str, Any]]:
    """fetch, then the stages of every category, then summarize. Returns run_stage's records.
    jobs 1: stage by stage (sample of every category, then synthesize...), as DVC's order would; jobs N > 1:
    each category's sample, synthesize, train, evaluate in a row, N categories at a time with
    cores // N threads each, as `make run JOBS=N` does."""
    runs = [run_stage(project, ["fetch"], timings)]
    if echo:
        _echo(runs[-1])
    chains = {c: [[stage, "--category", c] for stage in CATEGORY_STAGES] for c in categories}
    if jobs == 1:
        for stage in range(len(CATEGORY_STAGES)):
            for chain in chains.values():
                runs.append(run_stage(project, chain[stage], timings))
                if echo:
                    _echo(runs[-1])
    else:
        todo, cores, lock = list(chains), len(os.sched_getaffinity(0)), threading.Lock()

        def worker(slot: int) -> None:
            env = worker_env(slot, jobs, cores, [], os.environ)
            while True:
                with lock:
                    if not todo:
                        return
                    category = todo.pop(0)
                for args in chains[category]:
                    record = run_stage(project, args, timings, env)
                    with lock:
                        runs.append(record)
                        if echo:
                            _echo(record)

        threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(min(jobs, len(chains)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if len(runs) != 1 + len(CATEGORY_STAGES) * len(categories):
            raise RuntimeError("a stage failed (its error is printed above)")
    runs.append(run_stage(project, ["summarize"], timings))
    if echo:
        _echo(runs[-1])
    return runs


def _echo(run: dict[str, Any]) -> None:
    print(f"  {' '.join(run['args']):<36} {run['wall']:8.1f} s  (load {run['load1']:.1f})", flush=True)


def read_timings(path: Path) -> dict[int, dict[str, Any]]:
    """StageProgress's JSON lines by process id (one bar per stage process)."""
    if not path.is_file():
        return {}
    return {rec["pid"]: rec for rec in map(json.loads, path.read_text().splitlines())}


def phases_file(timings: Path) -> Path:
    return timings.with_name("phases.jsonl")
