"""A run's units of work: each category's stages as the `dvc repro` calls that run them, the order in which free
workers take them, and each local worker's threads and GPU.

`mpad exp run --jobs N` (`make run JOBS=N`) runs, per category, its `<stage>@<category>` names of `dvc stage
list`, in dvc.yaml's order (each reads the one before: tests/test_parallel.py), in two units of work: every stage
but the last (sample, synthesize, train), then the last (evaluate), each one `dvc --wait-for-lock repro
--single-item <stages>`, at most N at a time; fetch runs once before (it is always changed, so a worker's own
repro would re-run it and rewrite the fingerprints the other workers read) and summarize once after, when every
category succeeded. DVC does the work, the order and the locking: `dvc repro` holds the repository lock while it
reads the pipeline and records a stage, and `--wait-for-lock` makes the others wait for it instead of failing.

A free worker takes the unit of the category with the most units left, then in params order (`next_category`):
first every category's training, then the evaluations, which are short and of unequal length and so fill the
workers evenly at the end. Whole categories at a time left one worker idle while the other ran the last category
alone (15 categories on 2 workers: 8 against 7). `--single-item` keeps fetch out; an unchanged stage is still
skipped.

Each local worker gets cores // N CPU threads through OMP_NUM_THREADS, from which torch takes its thread count
(N processes each using every core oversubscribe them: README, "Full-scale benchmark"), and, when more than one
GPU is visible, GPU number slot % GPUs through CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import glob
import heapq
import subprocess
import sys
from collections.abc import Collection, Mapping, Sequence

FIRST, LAST = "fetch", "summarize"  # the stages that run once, before and after the per-category ones


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
