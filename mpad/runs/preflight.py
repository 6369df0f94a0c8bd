"""What the Ray backend checks before anything runs or is removed, each failure one line (`ClusterError`): the
cluster answers at ADDRESS, the work tree is clean, git remote `origin` and a default DVC remote exist, and every
node reaches both (mpad/runs/remote.py's `probe`, run on each node)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path

from mpad.runs import remote

TRAVELS = ("params.yaml", "dvc.lock")  # workspace files each unit carries, so they may differ from the commit
REPORTS = ("sweep.md", "sweep.json")  # the dispatcher's own tables (mpad/runs/sweep.py): no unit reads them
PROBE_S = 120  # how long preflight waits for a node to say whether it reaches both remotes


class ClusterError(Exception):
    """One line: what is wrong and what to do (printed as `error: ...`, exit 2)."""


def git(repo: Path, *args: str) -> str:
    """A git command's output (not stripped); ClusterError naming it when it fails."""
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"`git {' '.join(args)}` failed in {repo}: {(done.stderr.strip() or 'no output')[-300:]}")
    return done.stdout


def origin_url(repo: Path) -> str:
    """git remote `origin`'s URL, a local path made absolute (the nodes' clones live elsewhere)."""
    done = subprocess.run(["git", "remote", "get-url", "origin"], cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError("no git remote `origin`: add one that every node reaches (`git remote add origin URL`)")
    url = done.stdout.strip()
    return str((repo / url).resolve()) if "://" not in url and (repo / url).exists() else url


def dvc_remote(repo: Path) -> tuple[str, dict]:
    """The default DVC remote's name and config (its URL resolved as DVC resolves it)."""
    from dvc.repo import Repo

    with Repo(os.fspath(repo)) as dvc:
        name = dvc.config["core"].get("remote")
        if not name:
            raise ClusterError(
                "no default DVC remote: add one that every node reaches (`dvc remote add -d NAME s3://... or ssh://...`)"
            )
        return name, dict(dvc.config["remote"][name])


def check_clean(repo: Path) -> None:
    """The work tree holds nothing the commit lacks but params.yaml and dvc.lock (which travel with each unit), DVC's
    outputs and the .gitignore files DVC writes for them, and the sweep's tables (a sweep run again writes them)."""
    from dvc.repo import Repo

    with Repo(os.fspath(repo)) as dvc:
        outs = [Path(out.fs_path).relative_to(repo) for out in dvc.index.outs]
    lines = git(repo, "status", "--porcelain", "--untracked-files=all").splitlines()
    changed = [
        path
        for status, path in ((line[:2], Path(line[3:])) for line in lines)
        if str(path) not in (*TRAVELS, *REPORTS)
        and path.name != ".gitignore"
        and not (status == "??" and any(path == out or out in path.parents for out in outs))
    ]
    if changed:
        shown = ", ".join(map(str, changed[:3])) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ClusterError(f"uncommitted changes in {repo} ({shown}): commit them, the nodes check out the commit")


def connect(address: str):
    """ray, connected to the cluster at ADDRESS; ClusterError when it does not answer."""
    host, _, port = address.rpartition("//")[2].rpartition(":")
    if host and port.isdigit():  # fail in seconds where ray.init would retry for a minute
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as err:
            raise ClusterError(
                f"cannot reach the Ray cluster at {address} ({err.strerror or err}): start it (`ray start --head`)"
                " or give its address"
            ) from None
    import ray

    ray.cloudpickle.register_pickle_by_value(remote)  # a node needs Ray, git and DVC, not this mpad
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as err:  # ConnectionError, ValueError, RuntimeError by the form of the address
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {str(err).splitlines()[0]}") from None
    return ray


def preflight(address: str, repo: Path) -> None:
    """Before anything runs or is removed: the ADDRESS is reachable (ray.init), the work tree is clean, git remote
    `origin` and a default DVC remote exist and the workers can reach them; else ClusterError."""
    repo = Path(repo).resolve()
    check_clean(repo)
    url = origin_url(repo)
    name, config = dvc_remote(repo)
    ray = connect(address)
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        if not nodes:
            raise ClusterError(f"the Ray cluster at {address} has no node with CPUs: start workers (`ray start`)")
        probe = ray.remote(remote.probe)
        refs = {
            n["NodeManagerAddress"]: probe.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(url, name, config)
            for n in nodes
        }
        for node, ref in refs.items():
            try:
                problems = ray.get(ref, timeout=PROBE_S)
            except Exception as err:  # a node without DVC, or one that does not answer
                last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
                raise ClusterError(f"node {node} could not check the remotes ({last}): `make setup` it") from None
            if problems:
                raise ClusterError(f"node {node} cannot reach the {problems[0]}: every node needs both remotes")
    finally:
        ray.shutdown()
