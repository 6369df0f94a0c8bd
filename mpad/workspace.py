"""Where the project's workspace is, seen from a stage: the dataset is read there, also from a queued run.

`dvc exp run --queue` runs each experiment in a temporary git copy (`.dvc/tmp/exps/<tmp>/`) that holds only
git- and DVC-tracked files, so a git-ignored dataset under `data/` is not in it. DVC sets `DVC_ROOT` for every
stage command, and for a queued experiment to the original workspace (not the copy), so a relative
`dataset.root` resolved against `$DVC_ROOT` finds the workspace's dataset without copying it. Outputs are
still written relative to the working directory (the copy): mpad.layout's paths are unaffected.
"""

from __future__ import annotations

import os
from pathlib import Path


def workspace_root() -> Path:
    """`$DVC_ROOT` when DVC runs the stage (the original workspace for a queued experiment), else the
    working directory (a stage run by hand, from the project root)."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def in_queued_copy() -> bool:
    """True inside a queued (temporary-copy) experiment: the working directory is not DVC's root."""
    root = os.environ.get("DVC_ROOT")
    return bool(root) and Path(root).resolve() != Path.cwd().resolve()


def data_root(root: str) -> Path:
    """A dataset root: `~` expanded; an absolute path as it is; a relative one as it is (relative to the
    working directory, the workspace), except in a queued copy: against the original workspace."""
    path = Path(root).expanduser()
    return workspace_root() / path if in_queued_copy() and not path.is_absolute() else path
