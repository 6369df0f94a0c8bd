"""Resumable, checksummed downloads and tar extraction that cannot write outside its destination."""

from __future__ import annotations

import http.client
import lzma
import os
import re
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from mpad.data.mvtec import DatasetError
from mpad.io import NoSpaceError, atomic_path, bar_interval, require_space, sha256_file

CHUNK = 1 << 20  # bytes per read
# Network failures that mean "try again later / place the file by hand", not "bad data".
_NET_ERRORS = (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException)


EXTRACTED_COPY = "or set dataset.root in params.yaml to an already extracted copy"
OFFLINE_PIPELINE = "To run the whole pipeline with no network at all: `make offline` (generated data, random weights)."


def _offline_message(url: str, dest: Path, err: BaseException, part: Path, by_hand: str) -> str:
    kept = f" The partial download {part} is kept; rerun to resume." if part.exists() else ""
    return (
        f"cannot download {url}: {getattr(err, 'reason', err)}.{kept} Without network access, download "
        f"the archive on another machine and place it at {dest.resolve()} (it is then checked and "
        f"extracted), {by_hand}. {OFFLINE_PIPELINE}"
    )


def _transfer(url: str, part: Path, timeout: float, progress: bool) -> bool:
    """One request: append to `part` from its current size. True when the server says it is complete."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "mpad-fetch"})
    except ValueError as err:  # malformed or empty URL
        raise DatasetError(f"cannot download {url!r}: {err} (check dataset.url)") from err
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # range past the end: we already have every byte
            return True
        raise DatasetError(f"cannot download {url}: HTTP {err.code} {err.reason}") from err
    with response:
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        if offset and response.status == 206:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                offset = 0  # the server answered another range than asked: start over
        elif offset:
            offset = 0  # 200: the server ignores Range and sends the whole file
        mode = "ab" if offset else "wb"
        total = offset + remaining if remaining is not None else None
        received = 0
        if remaining is not None:  # before gigabytes of transfer, not after (one line, the .part kept to resume)
            require_space(part, remaining, "the rest of the archive")
        with (
            open(part, mode) as out,
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=part.name.removesuffix(".part"), disable=not progress, mininterval=bar_interval()) as bar,
        ):  # fmt: skip
            while block := response.read(CHUNK):
                out.write(block)
                received += len(block)
                bar.update(len(block))
        # http.client returns b"" (no exception) when the peer closes early: check the length ourselves.
        if remaining is not None and received < remaining:
            raise ConnectionError(f"connection closed after {offset + received} of {total} bytes")
    return True


def download(
    url: str,
    dest: Path,
    sha256: str | None,
    progress: bool = True,
    timeout: float = 60.0,
    attempts: int = 4,
    by_hand: str = EXTRACTED_COPY,
) -> Path:
    """Download `url` to `dest` and return `dest`.

    Streams into `dest` + ".part", resuming an existing partial file with an HTTP Range request (and
    up to `attempts` times within one call when the connection drops). A 200 answer to a Range request
    restarts from zero; 416 means the partial file is already complete. The sha256 (hex, if given) is
    checked before the file is renamed to `dest`; a mismatch removes the partial file and raises
    DatasetError. An existing `dest` is only checked, not downloaded again. Without network,
    DatasetError says where to place the archive by hand, the other way round `by_hand` (for MVTec AD: an
    extracted copy as dataset.root) and `make offline`.
    """
    dest = Path(dest)
    part = dest.with_suffix(dest.suffix + ".part")
    expected = sha256.lower() if sha256 else None
    if dest.exists():
        if expected:
            got = sha256_file(dest)
            if got != expected:
                raise DatasetError(
                    f"{dest}: sha256 mismatch (expected {expected}, got {got}); the file was kept: "
                    "remove it or replace it with the right archive"
                )
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        try:
            _transfer(url, part, timeout, progress)
            break
        except _NET_ERRORS as err:
            progressed = part.exists() and part.stat().st_size > 0
            # Retry only cut transfers (bytes arrived); an unreachable host fails at once.
            if attempt == attempts or not progressed:
                raise DatasetError(_offline_message(url, dest, err, part, by_hand)) from err
    if expected:
        got = sha256_file(part)
        if got != expected:
            part.unlink()
            raise DatasetError(
                f"{url}: sha256 mismatch (expected {expected}, got {got}); the downloaded file was "
                "removed, rerun to download it again (or check dataset.url / dataset.sha256)"
            )
    os.replace(part, dest)
    return dest


def _check_member(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The member's safe relative path; DatasetError naming it if it could escape or is not plain."""
    name = member.name
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("\\") or re.match(r"^[A-Za-z]:", name):
        raise DatasetError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    if ".." in path.parts or "\\" in name:
        raise DatasetError(f"{archive}: member {name!r} points outside the destination; refusing to extract")
    if member.issym() or member.islnk():
        raise DatasetError(f"{archive}: member {name!r} is a link; refusing to extract")
    if not (member.isfile() or member.isdir()):
        raise DatasetError(f"{archive}: member {name!r} is a device or special file; refusing to extract")
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive (.tar, .tar.gz, .tar.xz, ...) into the new folder `dest`.

    Every member is checked first (no absolute paths, no `..`, no links, no devices); nothing is
    written unless all pass. Files are extracted into a temporary folder beside `dest`, which is
    renamed to `dest` only once complete. `dest` must not exist or be empty. Ownership and
    permission bits from the archive are ignored (files 0644, folders 0755 modulo umask).
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DatasetError(f"cannot extract {archive}: {dest} already exists and is not empty")
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            checked = [(m, _check_member(m, archive)) for m in members]
            require_space(dest, sum(m.size for m in members), "the archive's files")
            with atomic_path(dest) as tmp:
                tmp.mkdir()
                for member, rel in checked:
                    target = tmp / rel
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # regular files always have data
                    with source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out, CHUNK)
    except NoSpaceError:
        raise  # a full disk, not a bad archive
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as err:
        raise DatasetError(f"cannot extract {archive}: {err} (corrupt or truncated archive?)") from err


def _layout_top(extracted: Path, archive: Path) -> Path:
    """The folder of `extracted` holding the category folders: itself, or its single sub-folder."""
    subdirs = [p for p in extracted.iterdir() if p.is_dir()]
    if any((p / "train").is_dir() for p in subdirs):
        return extracted
    if len(subdirs) == 1 and any((p / "train").is_dir() for p in subdirs[0].iterdir() if p.is_dir()):
        return subdirs[0]
    raise DatasetError(f"{archive} does not contain category folders (<category>/train/good/...)")


def ensure_extracted(
    root: Path, categories: list[str], url: str, sha256: str | None, archive: Path, progress: bool = True
) -> bool:
    """Make `root/<category>` exist for every requested category, downloading `url` if needed.

    Nothing is downloaded when `root` already holds every requested category (a complete MVTec AD,
    or a partial copy with just the categories asked for). Otherwise `root` must be absent or empty:
    the archive is downloaded to `archive` (resumed, checksummed), extracted beside `root`, and its
    category folders (at the top of the archive or inside its single top folder) renamed to `root`.
    Returns True when it downloaded/extracted. The archive is kept (delete it to save space); one that
    cannot be extracted (truncated, an HTML error page, ...) is moved to `<archive>.bad`, so that the next
    run downloads it again instead of failing on it each time.
    """
    root, archive = Path(root), Path(archive)
    missing = [c for c in categories if not (root / c / "train").is_dir()]
    if not missing:
        return False
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(
            f"{root} exists but lacks categories {missing}: complete it, remove it to download the "
            "dataset again, or point dataset.root to a complete copy"
        )
    download(url, archive, sha256, progress=progress)
    # Extract beside root (same filesystem, so the final rename is atomic); the name is ours alone.
    staging = root.parent / f".{root.name}.extract"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            safe_extract(archive, staging)
        except DatasetError as err:  # kept in place, a bad archive (no sha256 to catch it) would fail every rerun
            bad = archive.with_name(archive.name + ".bad")
            os.replace(archive, bad)
            raise DatasetError(
                f"{err}; it was moved to {bad} (delete it) so that the next run downloads the archive again; "
                "check dataset.url, and set dataset.sha256 to catch a bad download before extraction"
            ) from err
        top = _layout_top(staging, archive)
        if root.exists():
            root.rmdir()  # empty, checked above
        os.replace(top, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    still = [c for c in categories if not (root / c / "train").is_dir()]
    if still:
        raise DatasetError(f"{archive} was extracted to {root} but has no categories {still}")
    return True
