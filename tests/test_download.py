"""Downloads against a loopback HTTP server (Range support, cut connections) and safe extraction."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mpad.data import DatasetError, summarize_category
from mpad.data.download import download, ensure_extracted, safe_extract
from mpad.data.synthetic import generate


class Server:
    """Serves `payload` at any path, honouring `Range: bytes=N-`; records each request's headers.

    cut_first: on the first request send only this many bytes (advertising the full length), then close.
    ignore_range: answer 200 with the whole payload even to Range requests (like some mirrors).
    """

    def __init__(self, payload: bytes, cut_first: int | None = None, ignore_range: bool = False) -> None:
        self.payload, self.cut_first, self.ignore_range = payload, cut_first, ignore_range
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(dict(self.headers))
                if self.path.startswith("/missing"):
                    self.send_error(404)
                    return
                data, start = server.payload, 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_first is not None and len(server.requests) == 1:
                    body = body[: server.cut_first]  # then the connection closes early
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/archive.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    """A tar.gz of a small generated dataset, under a top folder `synthetic/`; and that source tree."""
    src = tmp_path_factory.mktemp("src") / "synthetic"
    generate(src, seed=0, n_train=2, n_test=4)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="synthetic")
    return buf.getvalue(), src


@pytest.fixture
def serve() -> Iterator:
    servers: list[Server] = []

    def start(payload: bytes, **kw: object) -> Server:
        servers.append(Server(payload, **kw).__enter__())
        return servers[-1]

    yield start
    for s in servers:
        s.__exit__()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_checksum_and_extract(tmp_path: Path, archive: tuple[bytes, Path], serve) -> None:
    payload, src = archive
    server = serve(payload)
    dest = tmp_path / "dl/archive.tar.gz"
    assert download(server.url, dest, _sha(payload), progress=False, timeout=5) == dest
    assert dest.read_bytes() == payload and not dest.with_suffix(".gz.part").exists()
    assert "Range" not in server.requests[0]

    out = tmp_path / "out"
    safe_extract(dest, out)
    extracted, original = summarize_category(out / "synthetic", "disc"), summarize_category(src, "disc")
    assert extracted.pop("fingerprint") != original.pop("fingerprint")  # tar keeps mtimes to the second only
    assert extracted == original
    assert (out / "synthetic/disc/train/good/000.png").read_bytes() == (src / "disc/train/good/000.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl", "out"]  # no temporary left

    # Already there with the right checksum: no new request.
    download(server.url, dest, _sha(payload), progress=False, timeout=5)
    assert len(server.requests) == 1
    # Already there with a wrong checksum (e.g. placed by hand): error, file kept.
    with pytest.raises(DatasetError, match=r"expected 0+, got .*kept"):
        download(server.url, dest, "0" * 64, progress=False, timeout=5)
    assert dest.exists()


def test_resume_after_cut_connection(tmp_path: Path, archive: tuple[bytes, Path], serve) -> None:
    payload, _ = archive
    cut = len(payload) // 3
    server = serve(payload, cut_first=cut)
    dest = tmp_path / "a.tar.gz"
    download(server.url, dest, _sha(payload), progress=False, timeout=5)
    assert len(server.requests) == 2
    assert "Range" not in server.requests[0]
    assert server.requests[1]["Range"] == f"bytes={cut}-"
    assert dest.read_bytes() == payload


def test_cut_connection_keeps_part_and_next_call_resumes(tmp_path: Path, archive, serve) -> None:
    payload, _ = archive
    cut = 1000
    server = serve(payload, cut_first=cut)
    dest = tmp_path / "a.tar.gz"
    with pytest.raises(DatasetError, match=r"a\.tar\.gz\.part is kept; rerun to resume"):
        download(server.url, dest, _sha(payload), progress=False, timeout=5, attempts=1)
    assert (tmp_path / "a.tar.gz.part").stat().st_size == cut
    download(server.url, dest, _sha(payload), progress=False, timeout=5, attempts=1)
    assert server.requests[1]["Range"] == f"bytes={cut}-" and dest.read_bytes() == payload


def test_server_ignoring_range_restarts(tmp_path: Path, archive, serve) -> None:
    payload, _ = archive
    server = serve(payload, ignore_range=True)
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(b"garbage-that-must-not-be-kept")
    download(server.url, dest, _sha(payload), progress=False, timeout=5)
    assert "Range" in server.requests[0] and dest.read_bytes() == payload


def test_complete_part_gets_416(tmp_path: Path, archive, serve) -> None:
    payload, _ = archive
    server = serve(payload)
    (tmp_path / "a.tar.gz.part").write_bytes(payload)
    download(server.url, tmp_path / "a.tar.gz", _sha(payload), progress=False, timeout=5)
    assert server.requests[0]["Range"] == f"bytes={len(payload)}-"
    assert (tmp_path / "a.tar.gz").read_bytes() == payload


def test_checksum_mismatch_removes_part(tmp_path: Path, archive, serve) -> None:
    payload, _ = archive
    server = serve(payload)
    dest = tmp_path / "a.tar.gz"
    with pytest.raises(DatasetError) as err:
        download(server.url, dest, "ab" * 32, progress=False, timeout=5)
    msg = str(err.value)
    assert f"expected {'ab' * 32}, got {_sha(payload)}" in msg and "removed" in msg
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_offline(tmp_path: Path, archive, serve) -> None:
    server = serve(archive[0])
    with pytest.raises(DatasetError, match="HTTP 404"):
        download(server.url.replace("archive", "missing"), tmp_path / "x.tar", None, progress=False, timeout=5)

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "downloads/mvtec.tar.xz"
    with pytest.raises(DatasetError) as err:
        download(f"http://127.0.0.1:{port}/mvtec.tar.xz", dest, None, progress=False, timeout=5)
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "refused" in msg.lower()
    assert str(dest.resolve()) in msg and "dataset.root" in msg
    assert not dest.exists()


def _tar(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("good/ok.txt")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))  # a harmless member first: it must not be written either
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("member", "data", "words"),
    [
        (_member("../evil"), b"x", "outside"),
        (_member("good/../../evil"), b"x", "outside"),
        (_member("/tmp/evil-abs"), b"x", "absolute"),
        (_member("good/link", tarfile.SYMTYPE, "/etc/passwd"), None, "link"),
        (_member("good/hard", tarfile.LNKTYPE, "good/ok.txt"), None, "link"),
        (_member("good/dev", tarfile.CHRTYPE), None, "device"),
    ],
)
def test_malicious_members_rejected(tmp_path: Path, member, data, words) -> None:
    path = _tar(tmp_path, (member, data))
    dest = tmp_path / "x/out"
    with pytest.raises(DatasetError) as err:
        safe_extract(path, dest)
    assert repr(member.name) in str(err.value) and words in str(err.value)
    assert not dest.exists() and not (tmp_path / "evil").exists()
    assert not (tmp_path / "x").exists() or list((tmp_path / "x").iterdir()) == []


def test_extract_rejects_corrupt_archive_and_nonempty_dest(tmp_path: Path, archive) -> None:
    payload, _ = archive
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DatasetError, match=r"cut\.tar\.gz"):
        safe_extract(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    full = tmp_path / "full.tar.gz"
    full.write_bytes(payload)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/file").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        safe_extract(full, tmp_path / "busy")
    assert (tmp_path / "busy/file").read_text() == "mine"


def test_unextractable_archive_without_sha256_is_moved_aside(tmp_path: Path) -> None:
    archive = tmp_path / "downloads/mvtec.tar.xz"
    archive.parent.mkdir()
    archive.write_bytes(b"<html><body>Please log in</body></html>")  # what a mirror's error page looks like
    with socket.socket() as s:  # a port nobody listens on: the rerun cannot download
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/mvtec.tar.xz"
    with pytest.raises(DatasetError) as err:
        ensure_extracted(tmp_path / "mvtec", ["bottle"], url, None, archive, progress=False)
    bad = tmp_path / "downloads/mvtec.tar.xz.bad"
    assert f"cannot extract {archive}" in str(err.value) and f"it was moved to {bad} (delete it)" in str(err.value)
    assert not archive.exists() and bad.read_bytes().startswith(b"<html>")
    with pytest.raises(DatasetError, match="cannot download"):  # the rerun downloads again, not the same failure
        ensure_extracted(tmp_path / "mvtec", ["bottle"], url, None, archive, progress=False)
