"""`make run JOBS=N`: the pipeline's per-category stages in N concurrent `dvc repro` processes.

  python -m mpad.parallel --jobs N [--set KEY=VALUE ...]

DVC does the work, the order and the locking; this only starts the processes and waits for them.
`dvc repro` holds the repository lock while it reads the pipeline and records a stage, and releases it
while the stage's command runs; `dvc --wait-for-lock` makes the others wait for it instead of failing.

1. `dvc repro fetch`, once: fetch is always changed, so a worker's own repro would re-run it and rewrite
   the fingerprints the other workers read.
2. Per category, its `<stage>@<category>` names of `dvc stage list`, in dvc.yaml's order (each reads the one
   before: tests/test_parallel.py), in two units of work: every stage but the last (sample, synthesize, train),
   then the last (evaluate), each one `dvc --wait-for-lock repro --single-item <stages>`, at most N at a time.
   A free worker takes the unit of the category with the most units left, then in params order
   (`next_category`): first every category's training, then the evaluations, which are short and of unequal
   length and so fill the workers evenly at the end. Whole categories at a time left one worker idle while the
   other ran the last category alone (15 categories on 2 workers: 8 against 7). `--single-item` keeps fetch
   out; an unchanged stage is still skipped. Each category's output goes to logs/repro/<category>.log.
3. `dvc repro --single-item summarize`, once, when every category succeeded. A failed category does not
   stop the others; the run then exits 1 naming each failed category and its log.

Each worker gets cores // N CPU threads through OMP_NUM_THREADS, from which torch takes its thread count
(N processes each using every core oversubscribe them: README, "Full-scale benchmark"), and, when more
than one GPU is visible, GPU number slot % GPUs through CUDA_VISIBLE_DEVICES. `--set` applies `dvc exp
run -S` overrides to params.yaml first, with DVC's own function, so that `make offline JOBS=N` can end
with `dvc exp save`.
"""

from __future__ import annotations

import argparse
import glob
import heapq
import os
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

FIRST, LAST = "fetch", "summarize"  # the stages that run once, before and after the per-category ones
LOGS = Path("logs/repro")
DVC = "dvc"


def category_chains(stage_names: Sequence[str]) -> dict[str, list[str]]:
    """`dvc stage list --name-only` lines -> {category: its `<stage>@<category>` names, in listed order}."""
    chains: dict[str, list[str]] = {}
    for name in stage_names:
        _, at, category = name.partition("@")
        if at:
            chains.setdefault(category, []).append(name)
    return chains


def worker_env(slot: int, jobs: int, cores: int, gpus: Sequence[str], base: Mapping[str, str]) -> dict[str, str]:
    """The environment of worker `slot` (0..jobs-1): cores // jobs threads (at least 1) and, with more than one
    visible GPU, its own one (slot % len(gpus)), which the worker's model.device auto / cuda sees as cuda:0."""
    env = {**base, "OMP_NUM_THREADS": str(max(1, cores // jobs))}
    if len(gpus) > 1:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """CUDA_VISIBLE_DEVICES values of the GPUs torch sees here ([] without one). Without an NVIDIA device node
    there is none; else torch is asked in a child process, so that this one does not keep it loaded (~4 s)."""
    if not glob.glob("/dev/nvidia[0-9]*"):
        return []
    probe = [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"]
    count = int(subprocess.run(probe, env=dict(env), capture_output=True, text=True, check=True).stdout)
    listed = env.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in listed.split(",")] if listed is not None else [str(i) for i in range(count)]
    return ids[:count]


def work_units(chain: Sequence[str]) -> list[list[str]]:
    """A category's stages as the units one `dvc repro` runs: all but the last, then the last."""
    return [list(chain[:-1]), list(chain[-1:])] if len(chain) > 1 else [list(chain)]


def next_category(units: Mapping[str, Sequence], done: Mapping[str, int], busy: Collection[str]) -> str | None:
    """The category whose next unit a free worker runs: of those not `busy` (running, or failed) and with a unit
    left (`done`: units finished), the one with the most units left, then the first listed."""
    ready = [c for c in units if c not in busy and done[c] < len(units[c])]
    return max(ready, key=lambda c: (len(units[c]) - done[c], -list(units).index(c)), default=None)


def makespan(durations: Mapping[str, Sequence[float]], jobs: int) -> float:
    """Wall time of running each category's units of work (their durations, in order) on `jobs` workers by
    `next_category`'s rule, as `run_units` does."""
    done, busy = dict.fromkeys(durations, 0), set()
    idle, ends, now = jobs, [], 0.0  # ends: (time, category) of the running units
    while True:
        while idle and (category := next_category(durations, done, busy)) is not None:
            idle -= 1
            busy.add(category)
            heapq.heappush(ends, (now + durations[category][done[category]], category))
        if not ends:
            return now
        now, category = heapq.heappop(ends)
        busy.discard(category)
        done[category] += 1
        idle += 1


def run_units(
    units: Mapping[str, Sequence[Sequence[str]]], jobs: int, env_for, logs: Path, dvc: str = DVC
) -> dict[str, int]:
    """Run each category's units of work (`work_units`), each one `dvc repro --single-item`, in at most `jobs`
    processes at once, by `next_category`'s rule; env_for(slot) is a worker's environment. Returns {category: exit
    status (its failed unit's, else 0)}; a category's output goes to logs/<category>.log."""
    done, running, status = dict.fromkeys(units, 0), set(), {}
    changed = threading.Condition()
    logs.mkdir(parents=True, exist_ok=True)

    def worker(slot: int) -> None:
        env = env_for(slot)
        while True:
            with changed:  # wait while nothing is ready but a running unit may make something ready
                while (category := next_category(units, done, running | status.keys())) is None and running:
                    changed.wait()
                if category is None:
                    return
                running.add(category)
            stages, first = units[category][done[category]], done[category] == 0
            log, start = logs / f"{category}.log", time.monotonic()
            print(f"[{slot}] {' '.join(stages)}: started, log {log}", flush=True)
            with open(log, "w" if first else "a") as out:
                command = [dvc, "--wait-for-lock", "repro", "--single-item", *stages]
                code = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
            verdict = "done" if code == 0 else f"FAILED (exit {code})"
            print(f"[{slot}] {' '.join(stages)}: {verdict} in {time.monotonic() - start:.0f} s", flush=True)
            with changed:
                running.discard(category)
                if code != 0:
                    status[category] = code  # none of its later units runs
                else:
                    done[category] += 1
                    if done[category] == len(units[category]):
                        status[category] = 0
                changed.notify_all()

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(min(jobs, len(units)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", "-j", type=int, required=True, help="concurrent dvc repro processes (>= 1)")
    parser.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE", help="as dvc exp run -S")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.set:
        from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls: params.yaml written alike

        apply_overrides("params.yaml", args.set)
    dvc = subprocess.run([DVC, "stage", "list", "--name-only"], capture_output=True, text=True)
    if dvc.returncode != 0:
        print(dvc.stdout + dvc.stderr, file=sys.stderr)
        return 1
    chains = category_chains(dvc.stdout.split("\n"))
    if subprocess.run([DVC, "repro", FIRST]).returncode != 0:
        return 1
    cores, gpus = len(os.sched_getaffinity(0)), visible_gpus(os.environ)
    print(
        f"{len(chains)} categories, {args.jobs} at a time, {max(1, cores // args.jobs)} CPU threads each"
        + (f", GPUs {', '.join(gpus)} in turn" if len(gpus) > 1 else ""),
        flush=True,
    )
    units = {category: work_units(chain) for category, chain in chains.items()}
    status = run_units(units, args.jobs, lambda slot: worker_env(slot, args.jobs, cores, gpus, os.environ), LOGS)
    failed = [category for category in chains if status.get(category) != 0]
    if failed:
        lines = "\n".join(f"  {category}: see {LOGS / f'{category}.log'}" for category in failed)
        print(f"error: {len(failed)} of {len(chains)} categories failed ({LAST} not run):\n{lines}", file=sys.stderr)
        return 1
    return subprocess.run([DVC, "repro", "--single-item", LAST]).returncode


if __name__ == "__main__":
    sys.exit(main())
