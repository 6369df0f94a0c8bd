"""Transport between the coordinator's workspace and the nodes' clones: git carries the code, the project's default
DVC remote carries data and results. Nodes share no filesystem.

- Code: the coordinator's commit is pushed to `refs/mpad/runs/<sha>` on the git remote `origin`; a node fetches it
  into a clone of its own under `$MPAD_WORKDIR` (default: `<temp dir>/mpad-work`), one clone per unit running at
  once (a lock file each), sharing one DVC cache. params.yaml and dvc.lock travel as text with each unit (they may
  differ from the commit: `-S` overrides, the coordinator's fresh `fetch` entry).
- Data: the coordinator pushes its fetch outputs (`dvc push fetch`); a node pulls them and the outputs of the
  category's earlier units, and never runs fetch (fingerprints hold mtimes: its own listing would change them).
  The dataset itself is prepared on the node as `mpad fetch` would (generated, downloaded, or the user's folder at
  dataset.root), without writing fetch's outputs. A whole experiment runs fetch, which writes the coordinator's
  manifest (the job's `pinned`) once the node's copy has the same files and sizes (stages/fetch.py).
- Results: a unit's cached outputs go to the DVC remote (`dvc push <stages>`); its dvc.lock entries and its
  `cache: false` outputs (metrics, plots: the run cache does not carry them, DVC #10472) go as one tar file to
  `<remote>/mpad-results/<key>.tar`, written under a temporary name and renamed, so that a reader never sees half
  a result and two tries of one unit leave one. The key hashes everything the unit's result depends on (commit,
  params.yaml, the dvc.lock entries of its inputs, its stages): a coordinator started again finds what is done.

Ray ships this module to the workers by value, so a node needs git, DVC and Ray, not this version of mpad: imports
are the standard library's and DVC's only, and the unit's own commands import the mpad of the node's clone.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

RUNS_REF = "refs/mpad/runs/"  # the coordinator's commits, on origin
RESULTS = "mpad-results"  # the folder of unit results in the DVC remote
LOCK_MEMBER = "dvc.lock.json"  # the bundle's member holding the unit's dvc.lock entries
TAIL = 20  # lines of a failed unit's log in its error
# The dataset, made available as `mpad fetch` does, but its manifest and fingerprints are not written.
PREPARE = (
    "from pathlib import Path; from stages.common import load_config; from mpad import layout;"
    "from mpad.data.prepare import prepare_dataset;"
    "prepare_dataset(load_config(Path('params.yaml'), 'dataset')[0], layout.DOWNLOADS, print)"
)


class UnitFailed(Exception):
    """A unit's command failed on a node: `str()` is one line; `.tail` the last lines of its log."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


def run(cmd: Sequence[str], cwd: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """A command's stdout; UnitFailed with its output when it fails."""
    done = subprocess.run(list(cmd), cwd=cwd, env=None if env is None else dict(env), capture_output=True, text=True)
    if done.returncode != 0:
        raise UnitFailed(f"`{' '.join(cmd)}` failed (exit {done.returncode})", (done.stdout + done.stderr)[-4000:])
    return done.stdout


def git(repo: Path, *args: str) -> str:
    return run(["git", *args], cwd=repo).strip()


def work_dir() -> Path:
    """This node's scratch folder: $MPAD_WORKDIR, else `mpad-work` under the temp dir."""
    return Path(os.environ.get("MPAD_WORKDIR") or Path(tempfile.gettempdir()) / "mpad-work")


def unit_key(sha: str, params: str, inputs: Mapping[str, object], stages: Sequence[str]) -> str:
    """The name of a unit's result: a hash of its commit, params.yaml text, the dvc.lock entries of the stages it
    reads (fetch and the category's earlier units) and its stage names."""
    blob = json.dumps([sha, params, inputs, list(stages)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def result_path(remote, key: str) -> str:
    return remote.fs.join(remote.path, RESULTS, f"{key}.tar")


def open_remote(repo: Path):
    """The default DVC remote of the repository at `repo` (dvc.data_cloud.Remote: .fs, .path)."""
    from dvc.repo import Repo

    with Repo(os.fspath(repo)) as dvc:
        return dvc.cloud.get_remote()


def targets(repo: Path, stages: Sequence[str]) -> list[str]:
    """Stage names as DVC targets that hold whatever the working directory is (DVC reads a bare name against it)."""
    return [f"{repo / 'dvc.yaml'}:{name}" for name in stages]


def put_result(remote, key: str, data: bytes) -> None:
    """Write a result to the remote under a temporary name, then rename it into place (one writer wins, whole)."""
    final = result_path(remote, key)
    tmp = f"{final}.tmp-{uuid.uuid4().hex}"
    with tempfile.NamedTemporaryFile(suffix=".tar") as local:
        local.write(data)
        local.flush()
        remote.fs.makedirs(remote.fs.parent(final), exist_ok=True)
        remote.fs.put_file(local.name, tmp)
    remote.fs.mv(tmp, final)


def get_result(remote, key: str) -> bytes | None:
    """A unit's result from the remote, or None when it has none."""
    final = result_path(remote, key)
    if not remote.fs.exists(final):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        remote.fs.get_file(final, os.path.join(tmp, "r.tar"))
        return Path(tmp, "r.tar").read_bytes()


def pack(entries: Mapping[str, object], files: Mapping[str, bytes]) -> bytes:
    """A result: the unit's dvc.lock entries ({stage: entry}) and its uncached output files ({path: bytes})."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in [(LOCK_MEMBER, json.dumps(entries).encode()), *sorted(files.items())]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def unpack(data: bytes) -> tuple[dict[str, object], dict[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    return json.loads(members.pop(LOCK_MEMBER)), members


@contextmanager
def clone_slot(root: Path) -> Iterator[Path]:
    """A clone under `root` that no other unit on this node uses meanwhile (the first free one, else a new one)."""
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        handle = open(root / f"clone-{n}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield root / f"clone-{n}"
        finally:
            handle.close()
        return
    raise RuntimeError(f"no free clone under {root}")


def checkout(clone: Path, job: Mapping) -> None:
    """The coordinator's commit in `clone`, with its params.yaml and dvc.lock, the default DVC remote's URL and the
    node's shared DVC cache in .dvc/config.local (untracked files that are not ignored are removed)."""
    if not (clone / ".git").is_dir():
        clone.mkdir(parents=True, exist_ok=True)
        git(clone, "init", "-q")
    sha = job["sha"]
    git(clone, "fetch", "-q", job["git_url"], f"+{RUNS_REF}{sha}:{RUNS_REF}{sha}")
    git(clone, "checkout", "-q", "-f", "--detach", sha)
    git(clone, "clean", "-fdq")
    (clone / "params.yaml").write_text(job["params"])
    if job.get("lock") is not None:
        (clone / "dvc.lock").write_text(job["lock"])
    remote, url = job["dvc_remote"], job["dvc_url"]
    cache = work_dir() / "cache"
    (clone / ".dvc" / "config.local").write_text(
        f"[core]\n    remote = {remote}\n[cache]\n    dir = {cache}\n['remote \"{remote}\"']\n    url = {url}\n"
    )


def unit_env(clone: Path, threads: int) -> dict[str, str]:
    """The environment of a unit's commands: the clone's mpad first on the path (whatever PYTHONPATH the node
    has), this interpreter's scripts (`dvc`, `mpad`) on PATH, and `threads` torch threads."""
    env = {**os.environ, "PYTHONPATH": str(clone), "OMP_NUM_THREADS": str(threads)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in ("DVC_EXP_NAME", "DVC_ROOT", "RAY_ADDRESS"):
        env.pop(name, None)
    return env


def logged(cmd: Sequence[str], clone: Path, env: Mapping[str, str], log: Path) -> None:
    """Run a unit's command with its output appended to `log`; UnitFailed with the log's last lines."""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.run(list(cmd), cwd=clone, env=dict(env), stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-TAIL:])
        raise UnitFailed(f"`{' '.join(cmd)}` failed (exit {code}), log {log}", tail)


def stage_outputs(clone: Path, stages: Sequence[str]) -> tuple[dict[str, object], dict[str, bytes]]:
    """The clone's dvc.lock entries of `stages` and the bytes of their `cache: false` outputs."""
    from dvc.repo import Repo
    from dvc.utils.serialize import load_yaml

    entries = load_yaml(clone / "dvc.lock")["stages"]
    files: dict[str, bytes] = {}
    with Repo(os.fspath(clone)) as dvc:
        for name in stages:
            for stage in dvc.stage.collect(targets(clone, [name])[0]):
                for out in stage.outs:
                    if out.use_cache:
                        continue
                    path = Path(out.fs_path)
                    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
                        if f.is_file():
                            files[f.relative_to(clone).as_posix()] = f.read_bytes()
    return {name: entries[name] for name in stages}, files


@contextmanager
def unit_clone(job: Mapping) -> Iterator[tuple[Path, dict[str, str], Path]]:
    """A free clone of this node's MPAD_WORKDIR checked out at the job's commit, the job's environment and its
    emptied log file (under MPAD_WORKDIR/logs/<name>.log)."""
    root = work_dir()
    with clone_slot(root) as clone:
        checkout(clone, job)
        log = root / "logs" / f"{job['name']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        yield clone, unit_env(clone, job["threads"]), log


def run_unit(job: Mapping) -> dict:
    """On a node: one unit of a run (`dvc repro --single-item <stages>`) in a clone of the coordinator's commit;
    its result pushed to the DVC remote. Returns {"node", "log", "times"} (epoch seconds: started, repro_start,
    repro_end, pushed); UnitFailed when a command fails."""
    from dvc.repo import Repo

    started = time.time()
    with unit_clone(job) as (clone, env, log):
        prepared = clone / ".dvc" / "tmp" / "mpad-prepared"  # the dataset of these params is there already
        if not prepared.is_file() or prepared.read_text() != job["params"]:
            logged([sys.executable, "-c", PREPARE], clone, env, log)
            prepared.parent.mkdir(parents=True, exist_ok=True)
            prepared.write_text(job["params"])
        with Repo(os.fspath(clone)) as dvc:  # fetch's outputs and the category's earlier ones
            dvc.pull(targets=targets(clone, job["inputs"]), force=True)
        repro_start = time.time()
        logged(["dvc", "repro", "--single-item", *job["stages"]], clone, env, log)
        repro_end = time.time()
        with Repo(os.fspath(clone)) as dvc:
            dvc.push(targets=targets(clone, job["stages"]))
        put_result(open_remote(clone), job["key"], pack(*stage_outputs(clone, job["stages"])))
    return {"log": str(log), "times": [started, repro_start, repro_end, time.time()]}


def run_experiment(job: Mapping) -> dict:
    """On a node: one whole `dvc exp run -n NAME -S ...` in a clone of the coordinator's commit (its fetch writing
    the coordinator's manifest of the dataset, stages/fetch.py's MPAD_PINNED_DATASET), then `dvc exp push`
    of it to origin (its git ref) and the DVC remote (its cached outputs), then a marker under its key in the
    results folder, by which a coordinator started again knows it is done."""
    started = time.time()
    with unit_clone(job) as (clone, env, log):
        pinned = clone / ".dvc" / "tmp" / "mpad-pinned-dataset.json"  # its fetch writes the coordinator's manifest
        pinned.parent.mkdir(parents=True, exist_ok=True)
        pinned.write_text(job["pinned"])
        sets = [arg for kv in job["overrides"] for arg in ("-S", kv)]
        env = {**env, "MPAD_PINNED_DATASET": str(pinned)}
        logged(["dvc", "exp", "run", "-n", job["name"], *sets], clone, env, log)
        ended = time.time()
        logged(["dvc", "exp", "push", "--force", job["git_url"], job["name"]], clone, env, log)
        put_result(open_remote(clone), job["key"], job["name"].encode())  # its marker, once the ref is on origin
    return {"log": str(log), "times": [started, started, ended, time.time()]}


def task(kind: str, job: Mapping) -> dict:
    """The Ray task: `run_unit` or `run_experiment` with this node's name in the result, a failure returned as data
    (its one line and its log's last lines) rather than raised."""
    import ray

    node = f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]}, {work_dir()})"
    try:
        return {"node": node, **{"run_unit": run_unit, "run_experiment": run_experiment}[kind](job)}
    except UnitFailed as err:
        return {"node": node, "error": str(err), "tail": err.tail}
    except Exception as err:  # anything else on the node: named, not a traceback
        return {"node": node, "error": f"{type(err).__name__}: {err}", "tail": ""}


def probe(git_url: str, remote_name: str, remote_config: Mapping) -> list[str]:
    """On a node: what of the git remote and the DVC remote it cannot reach ([] when both answer)."""
    from dvc.fs import get_cloud_fs

    problems = []
    done = subprocess.run(["git", "ls-remote", "--heads", git_url], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        problems.append(f"git remote {git_url}: {(done.stderr.strip().splitlines() or ['no answer'])[-1]}")
    try:
        cls, config, path = get_cloud_fs({"remote": {remote_name: dict(remote_config)}}, name=remote_name)
        if not cls(**config).exists(path):
            problems.append(f"DVC remote {remote_config.get('url')}: not found")
    except Exception as err:  # any backend's error: the node cannot use the remote
        problems.append(f"DVC remote {remote_config.get('url')}: {str(err).splitlines()[0] if str(err) else err!r}")
    return problems
