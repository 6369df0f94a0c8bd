"""The Ray backend (mpad/runs/cluster.py) on two kinds of simulated cluster, each a head without CPUs (the
coordinator's) and two worker nodes of 1 CPU, each node with its own MPAD_WORKDIR, sharing with the coordinator
only a bare git repository (`origin`) and a local-directory DVC remote:

- `ray start` processes (tests/ray_nodes.py) in a network namespace whose only interface is loopback, driven
  as a user drives them: `make offline CLUSTER=ADDRESS` and `make sweep ... CLUSTER=ADDRESS`;
- `ray.cluster_utils.Cluster` on 127.0.0.1, driven through mpad.runs.cluster's functions: a node removed
  mid-run, a failing unit, the preflight's messages.

The local `make sweep` the Ray sweep compares with is checked here too (against each experiment's own files), so
that `make test` runs it once. The end-to-end tests are marked slow; they are in one module, which `make test`
(`--dist loadscope`) gives to one xdist worker, so that they never run side by side (Ray's tests get flaky when they
do).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from e2e import commit, copy_project, preset_overrides, run, stages_ran, with_remotes
from ray_nodes import LoopbackNodes, add_simulated_node, simulated_cluster, unavailable
from test_pipeline import LIGHTER
from test_queue import TINY

from mpad.runs import remote
from mpad.runs.units import category_chains, work_units

# Before Ray is imported, which reads it: Ray's own address lookup then answers 127.0.0.1, not the network's.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
cluster_mod = pytest.importorskip("mpad.runs.cluster")

OVERRIDES = [*preset_overrides("offline"), *LIGHTER, "dataset.categories=[stripes,disc]"]
SWEEP = [*preset_overrides("offline"), *TINY]  # the sweeps' preset, of 4 whole experiments each
VENV = Path(sys.executable).parent.parent  # the test's own environment; never reinstalled (-o its stamp)
MAKE = ["make", "--no-print-directory", "-o", str(VENV / ".installed"), f"VENV={VENV}"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(Cluster, [its two worker nodes], [their MPAD_WORKDIRs])."""
    workdirs = [tmp_path_factory.mktemp(f"node{i}") for i in range(2)]
    with simulated_cluster(workdirs) as (cluster, nodes):
        ray.init(address=cluster.address)
        addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
        ray.shutdown()
        assert addresses == {"127.0.0.1"}
        yield cluster, nodes, workdirs


def units_of(project: Path) -> dict[str, list[list[str]]]:
    names = run(["dvc", "stage", "list", "--name-only"], project).split("\n")
    return {category: work_units(chain) for category, chain in category_chains(names).items()}


def dvc_status(project: Path) -> dict:
    return json.loads(run(["dvc", "status", "--json"], project))


@pytest.fixture(scope="module")
def local_metrics(tmp_path_factory) -> str:
    """metrics.md of a local `dvc repro` of the same project (1 torch thread, as each unit has on the cluster)."""
    project = copy_project(tmp_path_factory.mktemp("local") / "project", OVERRIDES)
    run(["dvc", "repro"], project)
    return (project / "metrics.md").read_text()


def cluster_run(project: Path, address: str, lines: list[str]) -> dict[str, int]:
    """What `make run CLUSTER=ADDRESS` does around the backend: fetch, the units on the cluster, summarize."""
    run(["dvc", "repro", "fetch"], project)
    status = cluster_mod.run_units(address, units_of(project), 1, project, log=lines.append)
    assert status == {"stripes": 0, "disc": 0}, "\n".join(lines)
    run(["dvc", "repro", "--single-item", "summarize"], project)
    return status


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """LoopbackNodes: `ray start` nodes, each worker with its own MPAD_WORKDIR."""
    if why := unavailable():
        pytest.skip(f"no network namespace for the `ray start` nodes: {why}")
    started = LoopbackNodes([tmp_path_factory.mktemp(f"rays{i}") for i in range(2)])
    yield started
    started.close()


def make(nodes: LoopbackNodes, project: Path, *args: str) -> str:
    """`make ARGS` in `project` inside the nodes' namespace; its output, asserting exit status 0."""
    done = nodes.run([*MAKE, *args], cwd=project)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"make {' '.join(args)} failed:\n{output[-4000:]}"
    return output


def use_preset(project: Path, overrides: list[str]) -> None:
    """The project's presets/offline.txt as `overrides` (the tests' lighter offline preset), committed."""
    (project / "presets" / "offline.txt").write_text("\n".join(overrides) + "\n")
    commit(project, "a lighter offline preset")


def logs(workdirs) -> list[set[Path]]:
    return [set(Path(w).glob("logs/*.log")) for w in workdirs]


@pytest.mark.slow
def test_make_offline_on_ray_start_nodes_equals_local_run(nodes, local_metrics, tmp_path):
    project = copy_project(tmp_path / "project", OVERRIDES)
    use_preset(project, OVERRIDES)
    with_remotes(project)
    cluster = f"CLUSTER={nodes.address}"

    output = make(nodes, project, "offline", cluster)
    assert (project / "metrics.md").read_text() == local_metrics
    assert set(dvc_status(project)) == {"fetch"}  # always changed; every other stage is up to date
    assert not stages_ran_again(project)
    ran = logs(nodes.workdirs)
    assert all(ran) and len(ran[0] | ran[1]) == 4, f"each node runs units in its MPAD_WORKDIR:\n{output}"
    for workdir, here in zip(nodes.workdirs, ran, strict=True):  # and holds the outputs of those units
        for log in here:
            category, unit = re.match(r"([a-z]+)-(\d)-", log.name).groups()
            made = f"data/shots/{category}.json" if unit == "1" else f"metrics/{category}.json"
            assert list(workdir.glob(f"clone-*/{made}")), f"{workdir} ran {log.name} but holds no {made}"
    assert not (project / cluster_mod.JOURNAL).exists()
    # The coordinator started again: every unit has its result, none runs again.
    again = make(nodes, project, "offline", cluster)
    assert again.count("restored its result of an earlier run") == 4 and logs(nodes.workdirs) == ran, again
    assert (project / "metrics.md").read_text() == local_metrics


SWEEP_ARGS = ["sweep", "PRESET=offline", "SHOTS=1,2", "SEEDS=0,1"]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory) -> tuple[Path, str, str, str]:
    """(project, output of its first `make sweep ... JOBS=2`, of a second one after a commit, sweep.md as they left
    it) on the SWEEP preset: 4 experiments of the DVC queue, 2 workers. The Ray sweep's reference, checked on its own
    below (which then applies an experiment to the project)."""
    project = copy_project(tmp_path_factory.mktemp("sweep") / "project", [])
    use_preset(project, SWEEP)
    try:
        first = run([*MAKE, *SWEEP_ARGS, "JOBS=2"], project)
        commit(project, "the sweep's table")  # experiments of the commit before still count: same code
        second = run([*MAKE, *SWEEP_ARGS, "JOBS=2"], project)
    finally:  # the workers stop once idle; this makes sure
        subprocess.run([str(VENV / "bin" / "dvc"), "queue", "stop"], cwd=project, capture_output=True, timeout=120)
    return project, first, second, (project / "sweep.md").read_text()


@pytest.mark.slow
def test_make_sweep_2x2_agrees_with_each_experiments_metrics_and_reruns_nothing(local_sweep):
    project, first, second, table = local_sweep
    # one named experiment per point, each queued once
    assert first.count("Queued experiment") == 4 and "4 of 4 experiments to run: k1-s0-" in first
    assert "'shots.k=2', 'shots.seed=1'" in first  # DVC's "Queueing with overrides"
    assert "nothing to run" in second and "Queued experiment" not in second

    sweep = json.loads((project / "sweep.json").read_text())
    assert max(map(len, table.splitlines())) <= 120 and "**2-shot** (seeds 0, 1: n = 2)" in table
    assert table.startswith("> **RANDOM WEIGHTS")
    assert second.endswith(table)  # the report is printed
    diffed = run(["dvc", "metrics", "diff", "HEAD~1", "--targets", "sweep.json", "--json"], project)
    diff = json.JSONDecoder().raw_decode(diffed)[0]  # then a line on stderr: HEAD~1 has no sweep.json
    assert diff["sweep.json"]["k.2.disc.aupro.mean"]["new"] == sweep["k"]["2"]["disc"]["aupro"]["mean"]
    # each experiment's own files, read from its git commit, not through mpad
    shown = json.loads(run(["dvc", "exp", "show", "--json", "-n", "2"], project))  # they belong to HEAD~1
    revs = [exp["revs"][0]["rev"] for row in shown for exp in row.get("experiments") or []]
    assert len(revs) == 4
    files: dict[int, list[dict]] = {1: [], 2: []}
    for rev in revs:
        params = yaml.safe_load(run(["git", "show", f"{rev}:params.yaml"], project))
        assert params["mpts"]["steps"] == 3 and params["shots"]["seed"] in (0, 1)
        disc = json.loads(run(["git", "show", f"{rev}:metrics/disc.json"], project))
        summary = json.loads(run(["git", "show", f"{rev}:metrics.json"], project))
        files[params["shots"]["k"]].append({"disc": disc, "mean": summary["mean"]})
    for k, runs in files.items():
        assert len(runs) == 2
        for row in ("disc", "mean"):
            for metric in ("pixel_auroc", "aupro", "image_auroc"):
                values = [r[row][metric] for r in runs]
                cell = sweep["k"][str(k)][row][metric]
                # sweep.json rounds to 4 decimals: within 5e-5 of the exact statistic
                assert cell["mean"] == pytest.approx(statistics.fmean(values), abs=6e-5)
                assert cell["std"] == pytest.approx(statistics.stdev(values), abs=6e-5)
                assert [cell["min"], cell["max"]] == pytest.approx([min(values), max(values)], abs=6e-5)
                assert cell["n"] == 2
    # An experiment applied to the workspace is up to date: its commit holds every uncached output (train's curves)
    run(["dvc", "exp", "apply", revs[0]], project)
    assert stages_ran(run(["dvc", "repro"], project)) == {"fetch"}


@pytest.mark.slow
def test_make_sweep_on_ray_start_nodes_equals_local_sweep(nodes, local_sweep, tmp_path):
    project = copy_project(tmp_path / "project", [])
    use_preset(project, SWEEP)
    with_remotes(project)
    before = logs(nodes.workdirs)
    output = make(nodes, project, *SWEEP_ARGS, f"CLUSTER={nodes.address}")
    names = re.findall(r"^(k\d-s\d-\w+): done on node", output, re.M)
    assert len(set(names)) == 4, output
    reference = local_sweep[-1]
    assert (project / "sweep.md").read_text() == reference
    after = logs(nodes.workdirs)
    assert len((after[0] | after[1]) - (before[0] | before[1])) == 4  # each experiment ran on a node
    # 4 exp refs on the coordinator, each with its metrics, as `dvc exp show` reads them
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project))
    revs = [rev for row in shown for exp in row.get("experiments") or [] for rev in exp["revs"]]
    metrics = {rev["name"]: rev["data"]["metrics"]["metrics.json"]["data"]["mean"] for rev in revs}
    assert sorted(metrics) == sorted(names) and all(m["pixel_auroc"] > 0 for m in metrics.values()), metrics

    # The coordinator lost its exp refs before it pulled them: their results are on the remotes, nothing runs.
    run(["dvc", "exp", "remove", *names], project)
    again = make(nodes, project, *SWEEP_ARGS, f"CLUSTER={nodes.address}")
    assert again.count("restored from an earlier run") == 4, again
    assert (project / "sweep.md").read_text() == reference
    # An experiment applied to the workspace is up to date: its node wrote the coordinator's dataset listing.
    run(["dvc", "exp", "apply", names[0]], project)
    assert stages_ran(run(["dvc", "repro"], project)) == {"fetch"}


def stages_ran_again(project: Path) -> set[str]:
    """Stages a plain `dvc repro` would run again (dry run), but fetch."""
    output = run(["dvc", "repro", "--dry"], project)
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")} - {"fetch"}


@pytest.mark.slow
def test_node_lost_mid_run_gives_the_same_metrics(cluster, local_metrics, tmp_path):
    c, nodes, workdirs = cluster
    project = with_remotes(copy_project(tmp_path / "project", OVERRIDES))
    before = [set(w.glob("logs/*.log")) for w in workdirs]
    lines: list[str] = []
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(status=cluster_run(project, c.address, lines)))
    runner.start()
    deadline = time.monotonic() + 300

    def started() -> list[int]:  # the nodes on which a unit of this run has started
        return [i for i, (w, b) in enumerate(zip(workdirs, before, strict=True)) if set(w.glob("logs/*.log")) - b]

    while time.monotonic() < deadline and not started():
        time.sleep(0.2)
    lost = started()[0]
    cut = {log.name for log in set(workdirs[lost].glob("logs/*.log")) - before[lost]}
    c.remove_node(nodes[lost])  # mid-unit: its first unit has started
    runner.join(600)
    nodes[lost] = add_simulated_node(c, workdirs[lost])  # for the tests after this one
    assert result.get("status") == {"stripes": 0, "disc": 0}, "\n".join(lines)
    survivor = {log.name for log in workdirs[1 - lost].glob("logs/*.log")}
    assert cut <= survivor, f"{cut} did not run again on the other node:\n" + "\n".join(lines)
    assert (project / "metrics.md").read_text() == local_metrics
    assert set(dvc_status(project)) == {"fetch"}


@pytest.mark.slow
def test_failed_unit_names_unit_node_and_log_and_others_go_on(cluster, tmp_path):
    c, _, _ = cluster
    project = with_remotes(copy_project(tmp_path / "project", OVERRIDES))
    sample = project / "stages" / "sample.py"  # this commit's sample stage fails for disc only
    text = sample.read_text().replace(
        "    root = dataset.path\n",
        "    if category == 'disc':\n        fail('disc breaks here')\n    root = dataset.path\n",
    )
    assert text != sample.read_text()
    sample.write_text(text)
    commit(project, "sample fails for disc")
    run(["dvc", "repro", "fetch"], project)
    lines: list[str] = []
    units = {"stripes": [["sample@stripes"]], "disc": [["sample@disc"]]}
    # 2 threads a unit: more than a node's CPU, which would wait forever; each unit gets the 1 there is.
    assert cluster_mod.run_units(c.address, units, 2, project, log=lines.append) == {"stripes": 0, "disc": 1}
    assert "2 CPU threads a unit, but the largest node has 1 CPUs: 1 a unit" in lines
    [error] = [line for line in lines if line.startswith("error:")]
    assert re.match(r"error: unit disc \(sample@disc\) failed on node 127\.0\.0\.1 .*log .*\.log", error), error
    assert "error: disc breaks here" in error  # the last lines of its log
    assert json.loads((project / "data/shots/stripes.json").read_text())["category"] == "stripes"
    assert not (project / "data/shots/disc.json").exists()
    assert "sample@stripes" not in dvc_status(project)


@pytest.mark.slow
def test_preflight_says_what_is_wrong_in_one_line(cluster, tmp_path):
    c, _, _ = cluster
    bare = copy_project(tmp_path / "bare", OVERRIDES)  # no remotes
    errors = []

    def error(address: str, expected: str) -> None:
        with pytest.raises(cluster_mod.ClusterError, match=expected) as err:
            cluster_mod.preflight(address, bare)
        errors.append(str(err.value))

    error(c.address, "no git remote `origin`")
    subprocess.run(["git", "remote", "add", "origin", str(tmp_path / "nowhere.git")], cwd=bare, check=True)
    error(c.address, "no default DVC remote")
    run(["dvc", "remote", "add", "-d", "store", str(tmp_path / "no-store")], bare)
    commit(bare, "remotes")
    error("127.0.0.1:1", r"cannot reach the Ray cluster at 127\.0\.0\.1:1")
    error(c.address, r"node 127\.0\.0\.1 cannot reach the git remote .*nowhere\.git")
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "nowhere.git")], check=True)
    error(c.address, r"node 127\.0\.0\.1 cannot reach the DVC remote .*no-store")
    (tmp_path / "no-store").mkdir()
    cluster_mod.preflight(c.address, bare)  # all well
    (bare / "params.yaml").write_text((bare / "params.yaml").read_text() + "# travels with each unit\n")
    cluster_mod.preflight(c.address, bare)
    (bare / "README.md").write_text("edited")
    error(c.address, r"uncommitted changes in .* \(README\.md\): commit them")
    assert all("\n" not in e for e in errors), errors


def test_result_bundle_round_trip_and_keys():
    entries = {"evaluate@disc": {"cmd": "mpad evaluate --category 'disc'", "outs": [{"path": "x", "md5": "1"}]}}
    files = {"metrics/disc.json": b'{"a": 1}', "plots/overlays/disc/0.png": bytes(range(256))}
    assert remote.unpack(remote.pack(entries, files)) == (entries, files)
    assert remote.pack(entries, files) == remote.pack(
        entries, dict(reversed(files.items()))
    )  # one result, one byte string
    key = remote.unit_key("abc", "k: 1\n", {"fetch": {"md5": "1"}}, ["train@disc"])
    changed = [
        remote.unit_key("abd", "k: 1\n", {"fetch": {"md5": "1"}}, ["train@disc"]),
        remote.unit_key("abc", "k: 2\n", {"fetch": {"md5": "1"}}, ["train@disc"]),
        remote.unit_key("abc", "k: 1\n", {"fetch": {"md5": "2"}}, ["train@disc"]),
        remote.unit_key("abc", "k: 1\n", {"fetch": {"md5": "1"}}, ["train@weave"]),
    ]
    assert len({key, *changed}) == 5 and key == remote.unit_key(
        "abc", "k: 1\n", {"fetch": {"md5": "1"}}, ["train@disc"]
    )


def test_a_restore_cut_off_is_put_back(tmp_path):
    journal, lock = tmp_path / cluster_mod.JOURNAL, tmp_path / "dvc.lock"
    journal.parent.mkdir(parents=True)
    said: list[str] = []
    for before, after in [("schema: '2.0'\nstages: {}\n", True), (None, False)]:
        lock.write_text("schema: '2.0'\nstages: {train@disc: {}}\n")  # names outputs that did not arrive
        journal.write_text(json.dumps({"unit": "disc-2", "lock": before}))
        cluster_mod.recover(tmp_path, said.append)
        assert (lock.read_text() if lock.exists() else None) == before and lock.exists() == after
        assert not journal.exists()
    cluster_mod.recover(tmp_path, said.append)  # nothing cut off: nothing said
    assert said == ["disc-2: its restore was cut off (the coordinator stopped): dvc.lock is as before it"] * 2


def test_two_units_writing_one_stage_are_refused(tmp_path):
    with pytest.raises(cluster_mod.ClusterError, match="a stage is in two units"):
        cluster_mod.run_units("127.0.0.1:1", {"a": [["train@a"], ["train@a"]]}, 1, tmp_path)
