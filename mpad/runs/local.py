"""The local backend: a run's per-category units in concurrent `dvc repro` processes, experiments in DVC's queue.

Every process it starts goes through `call`, in a process group of its own, so that Ctrl-C or SIGTERM reaches
this process alone and `stop` then ends each group with everything DVC started in it (a stage's `mpad` command
included), instead of the terminal's SIGINT hitting them halfway through a write. DVC's queue workers are
daemons that no signal of ours reaches: `stop` kills their tasks with `dvc queue kill` and removes the queued ones,
so that a re-run queues each missing experiment once.

The same two functions as the Ray backend (mpad/runs/cluster.py), without its address: `run_units` and
`run_experiments` take {category: units} and {name: overrides} and return {category or name: exit status}.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from mpad.runs.units import next_category

DVC = "dvc"
POLL_S = 5.0  # how often the queue's status is read while its workers run
KILL_AFTER_S = 10.0  # a process group still alive this long after SIGTERM gets SIGKILL
TMP_EXPS = Path(".dvc/tmp/exps")  # where DVC's queue makes its temporary copies, tmp* (relative to the repo)


class _Stop:
    """The signal that stopped the command (None while running) and the process groups to end on one."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.children: set[subprocess.Popen] = set()
        self.lock = threading.RLock()  # re-entered by a signal handler that interrupts its own thread
        self.watch: Callable[[list[int]], None] | None = None  # told the running groups on each change


STOP = _Stop()


def reset() -> None:
    """Before a command: no signal received, no children."""
    STOP.signum, STOP.children = None, set()


def stop(signum: int) -> None:
    """Stop everything `call` started (SIGTERM to each process group, SIGKILL after KILL_AFTER_S) and start nothing
    more: the signal handler's work. Safe to call from a handler and more than once."""
    with STOP.lock:
        STOP.signum = STOP.signum or signum
        children = list(STOP.children)
    for child in children:
        _signal_group(child, signal.SIGTERM)
    if children:
        timer = threading.Timer(KILL_AFTER_S, lambda: [_signal_group(c, signal.SIGKILL) for c in children])
        timer.daemon = True
        timer.start()


def stopped() -> int | None:
    """The signal that stopped the command, or None."""
    return STOP.signum


def _signal_group(child: subprocess.Popen, signum: int) -> None:
    if child.poll() is None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass


def call(cmd: Sequence[str], env: Mapping[str, str] | None = None, out=None, capture: bool = False):
    """Run `cmd` in a process group of its own, unless stopping (then exit status 128 + signal without starting).
    `out`: a file for stdout and stderr (else this process's); `capture`: (status, stdout text) instead of the
    status."""
    with STOP.lock:
        if STOP.signum is not None:
            return (128 + STOP.signum, "") if capture else 128 + STOP.signum
        child = subprocess.Popen(
            list(cmd),
            env=None if env is None else dict(env),
            stdout=subprocess.PIPE if capture else out,
            stderr=subprocess.STDOUT if out is not None else None,
            text=True,
            start_new_session=True,
        )
        STOP.children.add(child)
        _changed()
    try:
        text, _ = child.communicate()
    finally:
        with STOP.lock:
            STOP.children.discard(child)
            _changed()
    return (child.returncode, text or "") if capture else child.returncode


def _changed() -> None:
    if STOP.watch is not None:
        STOP.watch(sorted(child.pid for child in STOP.children))


def end_groups(groups: Sequence[int], repo: Path) -> list[int]:
    """End the process groups of `groups` that a killed command left running: those whose leader still runs in
    `repo` (a reused PID elsewhere is not ours), SIGTERM, then SIGKILL after KILL_AFTER_S. Returns those ended."""
    ours = []
    for group in groups:
        try:
            if os.getpgid(group) == group and Path(f"/proc/{group}/cwd").resolve() == repo.resolve():
                os.killpg(group, signal.SIGTERM)
                ours.append(group)
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    deadline = time.monotonic() + KILL_AFTER_S
    for group in ours:
        while _alive(group) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(group):
            os.killpg(group, signal.SIGKILL)
    return ours


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{group}").exists() and "Z" not in Path(f"/proc/{group}/stat").read_text().split()[2:3]


def run_units(
    units: Mapping[str, Sequence[Sequence[str]]],
    threads: int,
    repo: Path,
    log: Callable[[str], None] = print,
    *,
    jobs: int,
    env_for: Callable[[int], Mapping[str, str]],
    logs: Path,
) -> dict[str, int]:
    """Run each category's units of work (mpad.runs.units.work_units), each one `dvc repro --single-item`, in at
    most `jobs` processes at once, by `next_category`'s rule; env_for(slot) is a worker's environment (`threads`
    CPU threads). Returns {category: exit status (its failed unit's, else 0)} of the categories that finished or
    failed; on a stop, those whose unit was stopped or never started are absent. A category's output goes to
    logs/<category>.log."""
    del threads, repo  # in env_for's environment; the working directory
    done, running, status = dict.fromkeys(units, 0), set(), {}
    changed = threading.Condition()
    logs.mkdir(parents=True, exist_ok=True)

    def worker(slot: int) -> None:
        env = env_for(slot)
        while True:
            with changed:  # wait while nothing is ready but a running unit may make something ready
                while (category := next_category(units, done, running | status.keys())) is None and running:
                    changed.wait()
                if category is None or stopped() is not None:
                    return
                running.add(category)
            stages, first = units[category][done[category]], done[category] == 0
            log_file, start = logs / f"{category}.log", time.monotonic()
            log(f"[{slot}] {' '.join(stages)}: started, log {log_file}")
            with open(log_file, "w" if first else "a") as out:
                code = call([DVC, "--wait-for-lock", "repro", "--single-item", *stages], env, out)
            if stopped() is not None:
                log(f"[{slot}] {' '.join(stages)}: stopped")
            else:
                verdict = "done" if code == 0 else f"FAILED (exit {code})"
                log(f"[{slot}] {' '.join(stages)}: {verdict} in {time.monotonic() - start:.0f} s")
            with changed:
                running.discard(category)
                if stopped() is not None:
                    pass  # neither finished nor failed: a re-run runs it
                elif code != 0:
                    status[category] = code  # none of its later units runs
                else:
                    done[category] += 1
                    if done[category] == len(units[category]):
                        status[category] = 0
                changed.notify_all()

    workers = [threading.Thread(target=worker, args=(slot,)) for slot in range(min(jobs, len(units)))]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return status


def queue_state(repo: Path) -> tuple[dict[str, str], int]:
    """({experiment name (or task id): Queued | Running | Success | Failed}, active queue workers), from DVC's
    queue (`dvc queue status`, whose text has no stable columns)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        queue = dvc.experiments.celery_queue
        entries = {e.get("name") or e["rev"][:7]: e["status"] for e in queue.status()}
        active = sum(1 for tasks in queue.worker_status().values() if tasks)
    return entries, active


def clear_orphans(repo: Path, log: Callable[[str], None] = print) -> None:
    """After a killed run: queue entries "Running" with no active worker (which a re-run would wait on for ever)
    killed, and DVC's temporary experiment folders (.dvc/tmp/exps/tmp*) removed, said in one line. With an
    active worker (a run of someone else's queue) nothing is touched."""
    entries, active = queue_state(repo)
    if active:
        return
    orphans = [name for name, state in entries.items() if state == "Running"]
    if orphans:
        subprocess.run([DVC, "queue", "kill", "--force", *orphans], cwd=repo, capture_output=True)
    folders = sorted(p for p in (repo / TMP_EXPS).glob("tmp*") if p.is_dir())
    size = sum(f.stat().st_size for p in folders for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    if orphans or folders:
        log(
            f"cleared what an interrupted run left: {len(orphans)} queue entries 'Running' with no worker"
            + (f" ({', '.join(orphans)})" if orphans else "")
            + f", {len(folders)} temporary experiment folders ({size / 1e6:.1f} MB) in {TMP_EXPS}"
        )


def run_experiments(
    experiments: Mapping[str, Sequence[str]],
    threads: int,
    repo: Path,
    log: Callable[[str], None] = print,
    *,
    jobs: int,
) -> dict[str, int]:
    """Each experiment {name: its `-S key=value` overrides} queued (`dvc exp run --queue -n NAME -S ...`) and run by
    `jobs` DVC queue workers with `threads` torch threads each, each in a temporary copy that reads the workspace's
    dataset (mpad.workspace). Returns {name: 0 (an exp ref NAME exists) or 1 (`dvc queue logs NAME` says why)};
    on a stop, the running ones are killed, the queued ones removed, and both are absent."""
    dvc_queue = [DVC, "queue"]
    call([*dvc_queue, "remove", "-q", "--all"])  # earlier entries of the same names would confuse the status
    for name, overrides in experiments.items():
        if call([DVC, "exp", "run", "--queue", "-n", name, *(a for o in overrides for a in ("-S", o))]):
            subprocess.run([*dvc_queue, "remove", "-q", "--queued"], cwd=repo, capture_output=True)  # none waits
            return {} if stopped() is not None else dict.fromkeys(experiments, 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    call([*dvc_queue, "start", "-j", str(jobs)], env)
    status: dict[str, int] = {}
    while stopped() is None:
        entries, _ = queue_state(repo)  # a name gone from the queue (removed by hand) has failed
        ended = [n for n in experiments if entries.get(n) not in ("Queued", "Running")]
        status = {n: int(entries.get(n) != "Success") for n in ended}
        if len(status) == len(experiments):
            return status
        time.sleep(POLL_S)
    running = [n for n in experiments if n not in status]
    subprocess.run([*dvc_queue, "kill", "--force", *running], cwd=repo, capture_output=True)
    subprocess.run([*dvc_queue, "remove", "-q", "--queued"], cwd=repo, capture_output=True)
    subprocess.run([*dvc_queue, "stop"], cwd=repo, capture_output=True)
    return status


@contextmanager
def interrupted() -> Iterator[None]:
    """A KeyboardInterrupt raised for a stop (`signals`) ends the work; the report says what finished."""
    try:
        yield
    except KeyboardInterrupt:
        if stopped() is None:
            raise


@contextmanager
def signals(cluster: bool) -> Iterator[None]:
    """SIGINT and SIGTERM stop the children (`stop`); on a cluster they also interrupt the Ray backend's
    driver (KeyboardInterrupt), whose exit cancels the tasks it owns (Ray's fate sharing)."""
    reset()

    def handler(signum: int, frame: object) -> None:
        stop(signum)
        if cluster:
            raise KeyboardInterrupt

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, handler) for s in handled}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
