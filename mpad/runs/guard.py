"""What every `mpad exp` command does before it changes anything (issue 34): its arguments checked, the
workspace locked, and params.yaml with the overrides checked by `mpad check -S`. A refusal is one line, exit 2.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from mpad.runs import local
from mpad.runs.sweep import parse_overrides

CHECK = [sys.executable, "-m", "stages", "check"]  # `mpad check`, from this interpreter's packages
LOCK = Path(".dvc/tmp/mpad-exp.lock")
PRESETS = Path("presets")


class Refused(Exception):
    """One line: which argument (or the workspace) is wrong and what to do; nothing was changed."""


def parse_jobs(text: str) -> int:
    """JOBS as a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise Refused(f"JOBS={text!r}: write a whole number >= 1 (the processes or queue workers at once)")
    return int(text)


def parse_sets(items: Sequence[str]) -> list[str]:
    """The `-S key=value` overrides, each checked for its form (what the value may be is `mpad check`'s)."""
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip() or " " in key.strip():
            raise Refused(f"-S {item!r}: write key=value, e.g. -S mpts.lambda=0.5")
    return list(items)


def preset_lines(name: str | None, repo: Path) -> list[str]:
    """presets/<name>.txt's `key=value` lines (none without a name)."""
    if not name:
        return []
    path = repo / PRESETS / f"{name}.txt"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (repo / PRESETS).glob("*.txt"))) or "none"
        raise Refused(f"PRESET={name!r}: no {PRESETS / (name + '.txt')} (presets: {known})")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    try:
        parse_overrides(lines)
    except (ValueError, yaml.YAMLError) as error:
        raise Refused(f"{path.relative_to(repo)}: {str(error).splitlines()[0]}") from None
    return lines


def values(overrides: Sequence[str]) -> dict[str, Any]:
    try:
        return parse_overrides(overrides)
    except yaml.YAMLError as error:
        raise Refused(f"-S: {str(error).splitlines()[0]}") from None


@contextmanager
def workspace_lock(repo: Path, command: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold .dvc/tmp/mpad-exp.lock (flock) for the command; Refused when another command holds it. The file names
    the holder (for that message) and the process groups it runs (`local.call`); the lock itself dies with its
    holder, so it is never stale, and the groups a killed holder left running are ended here, in one line."""
    if not (repo / ".dvc").is_dir():
        raise Refused(f"{repo}: not a DVC project (no .dvc folder); run mpad exp from the project's root")
    path = repo / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text().partition("\n")[0].strip() or "another command"
        os.close(fd)
        raise Refused(f"{holder} runs in this workspace ({LOCK}); wait for it to end, or stop it") from None
    holder, _, rest = path.read_text().partition("\n")
    groups = [int(g) for line in rest.splitlines() if line.startswith("groups") for g in line.split()[1:]]
    if ended := local.end_groups(groups, repo):
        log(f"ended {len(ended)} process groups ({', '.join(map(str, ended))}) that {holder} left running")
    me = f"`mpad exp {command}` (PID {os.getpid()})\n"

    def watch(running: list[int]) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (me + f"groups {' '.join(map(str, running))}\n").encode(), 0)

    try:
        watch([])
        local.STOP.watch = watch
        yield
    finally:
        local.STOP.watch = None
        os.close(fd)


def check(overrides: Sequence[str], repo: Path) -> None:
    """`mpad check -S ...`: params.yaml with the overrides is valid; else Refused with the check's words."""
    result = subprocess.run(
        [*CHECK, *(a for o in overrides for a in ("-S", o))], cwd=repo, capture_output=True, text=True
    )
    if result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}").removeprefix("error: ")
        raise Refused(said if said.startswith("params") else f"mpad check: {said}")
