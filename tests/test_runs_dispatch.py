"""The dispatcher's refusals, lock and stops (mpad/runs/dispatch.py, issue 34 items 1-5), on stub commands: a fake
`dvc` that writes each call to calls.txt, and a stub `mpad check`. Nothing here runs DVC."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from mpad.runs import dispatch, guard, local

ROOT = Path(__file__).resolve().parents[1]
STAGES = "fetch sample@a train@a sample@b train@b summarize"
FAKE_DVC = f"""#!/bin/sh
echo "$*" >> calls.txt
case "$*" in
  "stage list --name-only") for s in {STAGES}; do echo $s; done ;;
  *--single-item*@*) echo $$ >> units.pid; sleep "${{UNIT_S:-0}}" ;;
  *"--queue -n refused"*) echo "ERROR: refused"; exit 1 ;;
esac
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with .dvc/, presets/ and params.yaml, a fake dvc first on PATH, `mpad check` stubbed to pass."""
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets/offline.txt").write_text("# the preset\nmodel.pretrained=none\n")
    (tmp_path / "presets/ablations.yaml").write_bytes((ROOT / "presets/ablations.yaml").read_bytes())
    (tmp_path / "params.yaml").write_text("mpts:\n  lambda: 1.0\n")
    fake = tmp_path / "bin/dvc"
    fake.parent.mkdir()
    fake.write_text(FAKE_DVC)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(guard, "CHECK", ["true"])
    return tmp_path


def _calls(project: Path) -> list[str]:
    path = project / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    ("command", "kwargs", "named"),
    [
        ("ablations", {"jobs": "0", "seeds": "0,1"}, "JOBS='0'"),
        ("offline", {"jobs": "abc"}, "JOBS='abc'"),
        ("run", {"jobs": "-1"}, "JOBS='-1'"),
        ("sweep", {"jobs": "0"}, "JOBS='0'"),
        ("sweep", {"shots": "0,1"}, "SHOTS='0,1'"),
        ("sweep", {"seeds": "0,x"}, "SEEDS='0,x'"),
        ("ablations", {"seeds": "1,1"}, "SEEDS='1,1'"),
        ("ablations", {"preset": "offlne"}, "PRESET='offlne': no presets/offlne.txt (presets: offline)"),
        ("sweep", {"preset": "nonexistent"}, "PRESET='nonexistent'"),
        ("run", {"sets": ["mpts.lambda"]}, "-S 'mpts.lambda': write key=value"),
        ("run", {"cluster": " "}, "CLUSTER=' '"),
    ],
)
def test_a_bad_argument_is_refused_in_one_line_before_anything_runs(project, capsys, command, kwargs, named):
    params = (project / "params.yaml").read_bytes()
    assert dispatch.dispatch(command, project, **kwargs) == 2
    assert named in _one_error_line(capsys.readouterr().err)
    assert _calls(project) == [] and (project / "params.yaml").read_bytes() == params  # no dvc call, no write


def test_a_failed_check_of_the_overrides_is_refused_before_dvc_is_called(project, monkeypatch, capsys):
    said = "error: params.yaml with -S mpts.steps=abc: mpts.steps = 'abc': must be a whole number"
    stub = project / "check.sh"
    stub.write_text(f'#!/bin/sh\necho "$*" > check-args.txt\necho "{said}" >&2\nexit 2\n')
    stub.chmod(0o755)
    monkeypatch.setattr(guard, "CHECK", [str(stub)])
    for command in ("run", "offline", "sweep", "ablations"):
        assert dispatch.dispatch(command, project, jobs="2", sets=["mpts.steps=abc"]) == 2
        assert _one_error_line(capsys.readouterr().err) == said
        args = (project / "check-args.txt").read_text()
        assert ("-S model.pretrained=none " if command == "offline" else "") + "-S mpts.steps=abc" in args  # preset
        if command == "sweep":  # every point of the grid (a shot count beyond the training split, say)
            assert args.endswith("-S mpts.steps=abc -S shots.k=1,2,4 -S shots.seed=0,1,2\n")
    assert _calls(project) == [] and (project / "params.yaml").read_text() == "mpts:\n  lambda: 1.0\n"


def test_without_a_ray_backend_or_with_a_failed_preflight_the_cluster_is_refused(project, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mpad.runs.cluster", None)  # as on a checkout without mpad/runs/cluster.py
    monkeypatch.delattr(sys.modules["mpad.runs"], "cluster", raising=False)
    assert dispatch.dispatch("run", project, cluster="auto") == 2
    assert "the Ray backend cannot load (mpad/runs/cluster.py is missing)" in _one_error_line(capsys.readouterr().err)

    class ClusterError(Exception):
        pass

    def preflight(address, repo):
        raise ClusterError(f"cannot reach the Ray cluster at {address}: start it with `ray start --head`")

    stub = types.SimpleNamespace(ClusterError=ClusterError, preflight=preflight)
    monkeypatch.setitem(sys.modules, "mpad.runs.cluster", stub)
    monkeypatch.setattr(sys.modules["mpad.runs"], "cluster", stub, raising=False)
    assert dispatch.dispatch("sweep", project, cluster="127.0.0.1:1") == 2
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in _one_error_line(capsys.readouterr().err)
    assert _calls(project) == []


HOLD = """
import sys, time
from pathlib import Path
from mpad.runs.guard import workspace_lock
with workspace_lock(Path(sys.argv[1]), "ablations"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_in_the_workspace_refuses_at_once_and_a_dead_holders_lock_is_free(project, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(project)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert dispatch.dispatch("run", project) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"`mpad exp ablations` (PID {holder.pid}) runs in this workspace" in line and _calls(project) == []
    finally:
        holder.kill()  # as SIGKILL leaves it: the file stays, its lock goes with the process
        holder.wait()
    assert (project / guard.LOCK).is_file()
    assert dispatch.dispatch("run", project) == 0 and _calls(project) == ["repro"]
    fd = os.open(project / guard.LOCK, os.O_RDWR)  # released on exit
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


STOPPED = """
import sys
from pathlib import Path
from mpad.runs import dispatch, guard
guard.CHECK = ["true"]
sys.exit(dispatch.dispatch("run", Path.cwd(), jobs="2"))
"""


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_every_unit_says_what_finished_and_exits_128_plus_it(project, signum, status):
    env = {**os.environ, "UNIT_S": "300", "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen([sys.executable, "-c", STOPPED], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(_pids(project)) < 2:  # both workers' units are running
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    run.send_signal(signum)
    _, err = run.communicate(timeout=60)
    assert run.returncode == status and "Traceback" not in err, err
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1] == (
        f"stopped by {name}: finished fetch; not finished a, b, summarize (a re-run runs only what is not finished)"
    )
    for pid in _pids(project):  # the units' processes (and their process groups) are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any("summarize" in call or "train@" in call for call in _calls(project))  # nothing started after


def _pids(project: Path) -> list[int]:
    path = project / "units.pid"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_after_a_kill_orphaned_queue_entries_and_temporary_copies_are_cleared_in_one_line(project, monkeypatch):
    tmp = project / ".dvc/tmp/exps"
    for name in ("tmpab12", "tmpcd34"):
        (tmp / name / "data").mkdir(parents=True)
        (tmp / name / "data/x").write_bytes(b"0" * 1000)
    (tmp / "run").mkdir()  # not a temporary copy
    state = {"full": "Running", "lambda-0": "Success", "qk-laa": "Running", "k1-s0-abcdef": "Queued"}
    monkeypatch.setattr(local, "queue_state", lambda repo: (state, 1))
    said = []
    local.clear_orphans(project, said.append)  # a worker is active: its tasks and copies are its own
    assert said == [] and _calls(project) == [] and len(list(tmp.glob("tmp*"))) == 2

    monkeypatch.setattr(local, "queue_state", lambda repo: (state, 0))
    local.clear_orphans(project, said.append)
    assert _calls(project) == ["queue kill --force full qk-laa"]
    assert sorted(p.name for p in tmp.iterdir()) == ["run"]
    assert said == [
        "cleared what an interrupted run left: 2 queue entries 'Running' with no worker (full, qk-laa), "
        "2 temporary experiment folders (0.0 MB) in .dvc/tmp/exps"
    ]


def test_a_stop_kills_the_running_experiments_and_unqueues_the_others_so_none_runs_twice(project, monkeypatch):
    states = iter(
        [
            {"a": "Success", "b": "Running", "c": "Queued"},  # then Ctrl-C
        ]
    )

    def queue_state(repo):
        state = next(states)
        local.stop(signal.SIGINT)
        return state, 1

    local.reset()
    monkeypatch.setattr(local, "queue_state", queue_state)
    monkeypatch.setattr(local, "POLL_S", 0.0)
    status = local.run_experiments({"a": ["x=1"], "b": ["x=2"], "c": ["x=3"]}, 1, project, lambda line: None, jobs=2)
    local.reset()
    assert status == {"a": 0}  # b and c are neither finished nor failed: a re-run runs them, once
    assert _calls(project) == [
        "queue remove -q --all",
        "exp run --queue -n a -S x=1",
        "exp run --queue -n b -S x=2",
        "exp run --queue -n c -S x=3",
        "queue start -j 2",
        "queue kill --force b c",
        "queue remove -q --queued",
        "queue stop",
    ]


def test_a_rerun_queues_only_the_experiments_without_a_run(project, monkeypatch, capsys):
    """Ablations at seeds 0, 1: the arms already run at these params and this code are not queued again."""
    (project / "dvc.yaml").write_text("stages: {}\n")
    done = {"full-s0", "lambda-0-s1"}
    monkeypatch.setattr(dispatch, "code_unchanged", lambda rev, code: True)

    def exp_show(code):
        base = {"mpts": {"lambda": 1.0}}
        runs = []
        for name in done:
            arm, seed = name.rsplit("-s", 1)
            params = dispatch.ablation_experiments(
                dispatch.yaml.safe_load((project / "presets/ablations.yaml").read_text()), {}, [int(seed)]
            )[name]
            nested = _nest({**dispatch.flatten(base), **params})
            data = {"params": {"params.yaml": {"data": nested}}, "metrics": {"metrics.json": {"data": {}}}}
            runs.append({"revs": [{"rev": "f" * 40, "name": name, "data": data}], "name": name})
        workspace = {"rev": "workspace", "data": {"params": {"params.yaml": {"data": base}}}}
        return [workspace, {"rev": "b" * 40, "name": "main", "data": {}, "experiments": runs}]

    monkeypatch.setattr(dispatch, "exp_show", exp_show)
    queued = {}

    def run_experiments(experiments, threads, repo, log=print, *, jobs):
        queued.update(experiments)
        done.update(experiments)
        return dict.fromkeys(experiments, 0)

    monkeypatch.setattr(local, "run_experiments", run_experiments)
    monkeypatch.setattr(local, "clear_orphans", lambda repo, log: None)
    assert dispatch.dispatch("ablations", project, jobs="2", seeds="0,1") == 0
    assert len(queued) == 14 and not {"full-s0", "lambda-0-s1"} & queued.keys()
    assert queued["no-oagm-s1"][-3:] == ["shots.seed=1", "oagm.seed=1", "mpts.seed=1"]
    assert "oagm.enabled=false" in queued["no-oagm-s1"]
    queued.clear()
    assert dispatch.dispatch("ablations", project, jobs="2", seeds="0,1") == 0  # the re-run: nothing missing
    assert queued == {} and "nothing to run" in capsys.readouterr().out
    assert not any("exp remove" in call for call in _calls(project))  # nothing replaced


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def test_the_makefile_targets_are_one_line_calls_of_mpad_exp():
    text = (ROOT / "Makefile").read_text()
    for target in ("run offline", "ablations", "sweep", "compare"):
        recipe = text.split(f"\n{target}: $(STAMP)\n", 1)[1].split("\n")
        assert recipe[0].startswith("\t") and not recipe[1].startswith("\t"), target  # one line
        assert "mpad exp" in recipe[0] or recipe[0].startswith("\t$(EXP)"), target
    assert "EXP = $(BIN)/mpad exp $@ --jobs '$(JOBS)' $(if $(CLUSTER),--cluster '$(CLUSTER)')" in text


def _stub_cluster(monkeypatch, run_units):
    class ClusterError(Exception):
        pass

    stub = types.SimpleNamespace(
        ClusterError=ClusterError, preflight=lambda address, repo: None, run_units=run_units, run_experiments=print
    )
    monkeypatch.setitem(sys.modules, "mpad.runs.cluster", stub)
    monkeypatch.setattr(sys.modules["mpad.runs"], "cluster", stub, raising=False)


def test_with_a_cluster_the_units_go_to_its_run_units_between_a_local_fetch_and_summarize(project, monkeypatch):
    given = []

    def run_units(address, units, threads, repo, log=print):
        given.append((address, units, threads, repo))
        return dict.fromkeys(units, 0)

    _stub_cluster(monkeypatch, run_units)
    assert dispatch.dispatch("run", project, jobs="2", cluster="ray://127.0.0.1:10001") == 0
    units = {c: [[f"sample@{c}"], [f"train@{c}"]] for c in ("a", "b")}
    assert given == [("ray://127.0.0.1:10001", units, max(1, len(os.sched_getaffinity(0)) // 2), project)]
    assert _calls(project) == ["stage list --name-only", "repro fetch", "repro --single-item summarize"]


def test_a_signal_interrupts_the_cluster_backend_and_is_reported(project, monkeypatch, capsys):
    def run_units(address, units, threads, repo, log=print):
        os.kill(os.getpid(), signal.SIGTERM)  # as a user's kill while the driver waits on its tasks
        time.sleep(60)
        raise AssertionError("not interrupted")

    _stub_cluster(monkeypatch, run_units)
    assert dispatch.dispatch("run", project, jobs="2", cluster="auto") == 143
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().endswith(
        "not finished a, b, summarize (a re-run runs only what is not finished)"
    )
    assert "summarize" not in " ".join(_calls(project))


def test_the_process_groups_a_killed_run_left_running_are_ended_by_the_next_one(project, capsys):
    """`dvc repro` runs in a process group of its own (so that Ctrl-C reaches the dispatcher first): a SIGKILL of
    the dispatcher leaves it running. The lock file names the groups; the next run ends those still in the project."""
    ours = subprocess.Popen(["sleep", "600"], cwd=project, start_new_session=True)
    elsewhere = subprocess.Popen(["sleep", "600"], cwd=project.parent, start_new_session=True)  # a reused PID
    try:
        (project / guard.LOCK).parent.mkdir(parents=True, exist_ok=True)
        (project / guard.LOCK).write_text(f"`mpad exp run` (PID 4194304)\ngroups {ours.pid} {elsewhere.pid}\n")
        assert dispatch.dispatch("run", project) == 0
        assert ours.wait(timeout=30) == -signal.SIGTERM and elsewhere.poll() is None
        said = capsys.readouterr().out
        assert f"ended 1 process groups ({ours.pid}) that `mpad exp run` (PID 4194304) left running" in said
        assert (project / guard.LOCK).read_text() == f"`mpad exp run` (PID {os.getpid()})\ngroups \n"
    finally:
        for child in (ours, elsewhere):
            child.kill()
            child.wait()


def test_an_experiment_dvc_refuses_to_queue_leaves_nothing_queued(project):
    status = local.run_experiments({"a": ["x=1"], "refused": ["x=2"], "c": ["x=3"]}, 1, project, print, jobs=2)
    assert status == {"a": 1, "refused": 1, "c": 1}  # none ran
    assert _calls(project) == [
        "queue remove -q --all",
        "exp run --queue -n a -S x=1",
        "exp run --queue -n refused -S x=2",
        "queue remove -q --queued",  # a is not left queued for a later worker to run unasked
    ]
