"""Run the pipeline's stage commands as child processes in a project folder (no DVC), and measure them.

Each stage is `python -m stages <command> ...` in its own process, with this checkout first on PYTHONPATH,
the stages' prompt-ensemble cache in the project (MPAD_CACHE_DIR: empty at first, shared by its stages
as on a new machine) and MPAD_TIMINGS naming a file where `stages.common.StageProgress` records its
loop's first-item and end times. Peak RSS comes from os.wait4's rusage of that child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


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


def run_stage(project: Path, args: list[str], timings: Path | None = None) -> dict[str, Any]:
    """Run `mpad ARGS` in `project`; return {stage, args, spawn, exit, wall, peak_rss_mib, pid, load1} (load1:
    the machine's 1-minute load average at its end: other work on the machine slows every stage).
    Its output goes to project/logs/; a failure raises with the log's tail."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "MPAD_CACHE_DIR": str(project / ".mpad-cache"),
    }
    if timings is not None:
        env["MPAD_TIMINGS"] = str(timings)
    log = project / "logs" / ("_".join(args[:1] + args[2:3]) + ".log")
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as out:
        spawn = time.time()
        child = subprocess.Popen(
            [sys.executable, "-m", "stages", *args], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT
        )
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
    project: Path, categories: list[str], timings: Path | None = None, echo: bool = True
) -> list[dict[str, Any]]:
    """fetch, then sample / synthesize / train / evaluate for every category (stage by stage, as DVC's
    order would), then summarize. Returns run_stage's records."""
    commands = [["fetch"]]
    for stage in ("sample", "synthesize", "train", "evaluate"):
        commands += [[stage, "--category", c] for c in categories]
    commands.append(["summarize"])
    runs = []
    for args in commands:
        runs.append(run_stage(project, args, timings))
        if echo:
            print(f"  {' '.join(args):<36} {runs[-1]['wall']:8.1f} s  (load {runs[-1]['load1']:.1f})", flush=True)
    return runs


def read_timings(path: Path) -> dict[int, dict[str, Any]]:
    """StageProgress's JSON lines by process id (one bar per stage process)."""
    if not path.is_file():
        return {}
    return {rec["pid"]: rec for rec in map(json.loads, path.read_text().splitlines())}
