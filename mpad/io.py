"""Atomic writes: every output is written to a temporary sibling, then renamed into place.

A stage killed halfway leaves either the old output or the new one, never half a file.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def bar_interval() -> float:
    """Seconds between two redraws of a progress bar: tqdm's 0.1 on a terminal; 15 when stderr goes to a file
    or a pipe (a DVC log), where every redraw is a new line kept for good."""
    return 0.1 if sys.stderr.isatty() else 15.0


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks: the identity of an artifact (prompts, ONNX model,
    downloaded archive, shot image)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path` (file or folder).

    Whatever the body writes there (a file, or a folder it creates) replaces `path` only if the body
    returns normally; on an exception the temporary is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries `atomic_path` left beside `path` in processes that no longer run (killed with
    SIGKILL, or the machine stopped: no `finally` ran). Their names carry the writer's pid; one without a pid
    (written before they did) is stale too."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2 :].split(".", 1)[0]
        if not (pid.isdigit() and _running(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON to `path` atomically (stable bytes for DVC)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def png_bytes(pixels: np.ndarray) -> bytes:
    """Pixels (H, W) or (H, W, 3) uint8 as PNG bytes; no metadata and fixed settings, so the bytes depend on
    the pixels only."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def write_png(path: str | os.PathLike[str], pixels: np.ndarray) -> None:
    """Write `png_bytes(pixels)` to `path` atomically."""
    write_bytes(path, png_bytes(pixels))


def write_csv(path: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a CSV (header line, then `rows`, "\n" line ends) to `path` atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_json_object(path: str | os.PathLike[str], error: type[Exception], what: str) -> dict[str, Any]:
    """The JSON object in `path`; `error` naming the file and `what` it should be when unreadable or not an object."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise error(f"{path}: not a readable {what} ({err})") from err
    if not isinstance(record, dict):
        raise error(f"{path}: expected a JSON object ({what})")
    return record


def check_format(
    record: Any, path: str | os.PathLike[str], error: type[Exception], kind: str, version: int, required: Sequence[str],
    again: str,
) -> None:  # fmt: skip
    """`record` must be a mapping of format `version` holding `required`; else `error` naming `path` and what to do."""
    if not isinstance(record, dict) or record.get("format") != version:
        raise error(f"{path}: not an mpad {kind} of format {version}")
    lacking = [key for key in required if key not in record]
    if lacking:
        raise error(f"{path}: incomplete {kind}, it lacks {', '.join(lacking)} ({again})")
