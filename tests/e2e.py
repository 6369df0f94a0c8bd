"""Helpers shared by the test modules: for the stage tests, the tiny model's params section and params.yaml written
or edited in a project folder; for the end-to-end runs through DVC, a temporary git copy of the project with params
overrides, a command runner that fails with the command's output, and which stages ran."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("stripes", "weave", "disc")
TRAIN_EVALUATE = {f"{s}@{c}" for s in ("train", "evaluate") for c in CATEGORIES}
PRODUCTS = ("data/", "metrics", "plots/", "dvclive/", "dvc.lock", "dvc_plots/", ".dvc/tmp", ".dvc/cache")
# params.yaml's `model` section of the stage tests: the shipped tiny model, random weights, on the CPU.
TINY_MODEL = {"name": "mpad-tiny", "pretrained": "none", "device": "cpu", "precision": "fp32"}


def write_params(folder: Path, params: dict) -> None:
    """`params` as `folder`/params.yaml, the file a stage command reads."""
    (folder / "params.yaml").write_text(yaml.safe_dump(params))


def update_params(folder: Path, section: str, **values) -> dict:
    """`folder`/params.yaml with `values` set in its `section`, written back; returns the new params."""
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params[section].update(values)
    write_params(folder, params)
    return params


def preset_overrides(name: str) -> list[str]:
    lines = (ROOT / "presets" / f"{name}.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """`a.b=value` lines (value parsed as YAML, as `dvc exp run -S` does) applied to a params dict."""
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return params


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DVC_EXP_NAME", None)
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output


def stages_ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def copy_project(dest: Path, overrides: list[str]) -> Path:
    """A git repository at `dest` holding the project's files (tracked and new ones, not ignored), with
    params.yaml's `overrides` applied and committed."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for rel in filter(None, listed):
        if rel.startswith(PRODUCTS) and rel != "data/.gitignore":  # an earlier run's results in the workspace
            continue
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(apply_overrides(params, overrides)))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(cmd, cwd=dest, check=True)
    commit(dest, "project")
    return dest


def commit(repo: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", message],
        cwd=repo,
        check=True,
    )


def with_remotes(project: Path) -> Path:
    """The project with a bare `origin` and a local-directory default DVC remote beside it, committed."""
    origin, store = project.parent / "origin.git", project.parent / "dvc-store"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    store.mkdir()
    subprocess.run(["git", "remote", "add", "origin", str(origin)], cwd=project, check=True)
    run(["dvc", "remote", "add", "-d", "store", str(store)], project)
    commit(project, "remotes")
    return project
