"""Atomic writes: every output is written to a temporary sibling, then renamed into place.

A stage killed halfway leaves either the old output or the new one, never half a file. A full disk or quota
(ENOSPC, EDQUOT) while writing is a `NoSpaceError` naming the output and the space it needs, with the temporary
removed and the previous output as it was; `require_space` refuses before a large write where that is cheap.
"""

from __future__ import annotations

import csv
import errno
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


FULL = (errno.ENOSPC, errno.EDQUOT)  # the disk is full; the user's quota is


class NoSpaceError(OSError):
    """The disk or quota is full (errno ENOSPC or EDQUOT) for writing `path`, which needs `needed` bytes (at least
    that many when `at_least`; `estimate`: how they were estimated, when they were); `written`: False when
    refused before writing (require_space). str(): one line saying so, with the bytes free there now."""

    def __init__(
        self, path: str | os.PathLike[str], needed: int, code: int = errno.ENOSPC, at_least: bool = False,
        estimate: str = "", written: bool = True,
    ) -> None:  # fmt: skip
        self.path, self.needed, self.at_least = Path(path), needed, at_least
        self.estimate, self.written = estimate, written
        self.free = free_space(self.path)
        super().__init__(code, os.strerror(code), str(path))

    def __str__(self) -> str:
        needs = ("at least " if self.at_least else "") + _size(self.needed)
        needs += f" ({self.estimate})" if self.estimate else ""
        free = "" if self.free is None else f", {_size(self.free)} free there"
        if not self.written:
            what, kept = "not enough free space", "nothing was written"
        else:
            what = self.strerror.lower()
            kept = "the previous one is kept" if self.path.exists() else "nothing was left half-written"
        return f"{self.path}: {what}: it needs {needs}{free}; {kept}. Free some space and re-run"


def _size(n: int) -> str:
    """Bytes for a reader: 812 B, 3.4 kB, 1.2 MB, 4.9 GB (SI units, as df -H)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def free_space(path: str | os.PathLike[str]) -> int | None:
    """Bytes free for this user on the filesystem that holds (or would hold) `path`; None when unknown."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None


def require_space(path: str | os.PathLike[str], needed: int, estimate: str = "") -> None:
    """NoSpaceError unless the filesystem of `path` has `needed` bytes free (`estimate`: how they were estimated):
    before a large write, when its size can be told cheaply (one statvfs call)."""
    free = free_space(path)
    if free is not None and free < needed:
        raise NoSpaceError(path, needed, estimate=estimate, written=False)


def disk_usage_of(path: str | os.PathLike[str]) -> int:
    """Bytes of the file at `path`, or of every file under the folder at `path`; 0 when it does not exist."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


@contextmanager
def atomic_path(path: str | os.PathLike[str], size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path` (file or folder).

    Whatever the body writes there (a file, or a folder it creates) replaces `path` only if the body
    returns normally; on an exception the temporary is removed and `path` is untouched. A full disk or quota
    is a NoSpaceError naming `path` and the space it needs: `size` bytes when the caller knows it, else at least
    what was written before the disk filled plus what was being written then, or the previous output's size.
    """
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
        yield tmp / path.name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp / path.name, path)
    except OSError as err:
        if err.errno not in FULL:
            raise
        written = (disk_usage_of(tmp) if tmp is not None else 0) + getattr(err, "needed", 0)
        needed = size if size is not None else max(written, disk_usage_of(path))  # the previous one's size, if more
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # before NoSpaceError measures the free space
        raise NoSpaceError(path, needed, err.errno, at_least=size is None) from err
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


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
    """Write `data` to `path` atomically (NoSpaceError: the disk is full)."""
    with atomic_path(path, len(data)) as tmp:
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
