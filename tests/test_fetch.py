"""The `fetch` stage run in-process: synthetic, folder and mvtec (local copy, loopback download, offline)."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mpad.data.synthetic import MARKER, generate
from stages.cli import app

SAMPLE_ROOT = Path(__file__).resolve().parents[1].parent / "shared/data/mvtec-sample"
runner = CliRunner()


def _fetch(tmp_path: Path, **dataset: object):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"dataset": dataset, "shots": {"k": 1, "seed": 0}}))
    return runner.invoke(app, ["fetch", "--params", str(params)])


def _manifest() -> dict:
    return json.loads(Path("data/manifest.json").read_text())


def _hashes(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fetch_synthetic(in_tmp: Path) -> None:
    ds = {"name": "synthetic", "root": "data/synthetic", "categories": ["stripes", "weave", "disc"],
          "textures": ["stripes", "weave"], "seed": 0}  # fmt: skip
    result = _fetch(in_tmp, **ds)
    assert result.exit_code == 0, result.output
    assert "generated" in result.output and "weave (texture): train 8" in result.output
    m = _manifest()
    assert m["name"] == "synthetic" and m["root"] == "data/synthetic" and m["seed"] == 0 and "note" in m
    assert list(m["categories"]) == ["disc", "stripes", "weave"]  # sorted keys (stable JSON)
    disc = m["categories"]["disc"]
    assert disc["group"] == "object" and m["categories"]["weave"]["group"] == "texture"
    assert disc["train"] == 8 and disc["test"] == {"good": 6, "missing_piece": 2, "scratch": 2, "stain": 2}
    assert disc["image_sizes"] == [[112, 96]] and [len(disc["fingerprint"][s]) for s in ("train", "test")] == [64, 64]
    assert json.loads(Path("data/fingerprints/disc/test.json").read_text()) == {
        "root": "data/synthetic",
        "category": "disc",
        "split": "test",
        "images": 12,
        "fingerprint": disc["fingerprint"]["test"],
    }
    first = Path("data/manifest.json").read_bytes()

    result = _fetch(in_tmp, **ds)  # same seed: kept, not regenerated
    assert result.exit_code == 0 and "generated" not in result.output
    assert Path("data/manifest.json").read_bytes() == first
    result = _fetch(in_tmp, **{**ds, "seed": 1})
    assert "generated" in result.output and _manifest()["categories"]["disc"]["fingerprint"] != disc["fingerprint"]

    result = _fetch(in_tmp, **{**ds, "textures": None})  # null: the dataset's default groups
    assert result.exit_code == 0 and _manifest()["categories"]["stripes"]["group"] == "texture"
    result = _fetch(in_tmp, **{**ds, "categories": None})  # DVC cannot expand null: refused, saying what to write
    assert result.exit_code == 1 and "synthetic: [stripes, weave, disc]" in " ".join(result.output.split())

    result = _fetch(in_tmp, **{**ds, "categories": ["carpet", "disc"]})
    assert result.exit_code == 1
    assert "['carpet'] not found under data/synthetic" in result.output and "stripes" in result.output


def test_fetch_folder_reads_only(in_tmp: Path) -> None:
    root = in_tmp / "mine"
    generate(root, seed=2, n_train=3, n_test=4)
    (root / MARKER).unlink()  # now just a user's tree
    before = _hashes(root)
    result = _fetch(in_tmp, name="folder", root=str(root), categories=["disc", "stripes", "weave"], textures=["weave"])
    assert result.exit_code == 0, result.output
    m = _manifest()
    assert sorted(m["categories"]) == ["disc", "stripes", "weave"]
    assert m["categories"]["stripes"]["train"] == 3 and m["categories"]["stripes"]["test"]["good"] == 2
    assert m["categories"]["weave"]["group"] == "texture" and m["categories"]["stripes"]["group"] == "object"
    assert _hashes(root) == before and not (root / MARKER).exists()

    (root / "disc/ground_truth/scratch/000_mask.png").unlink()
    result = _fetch(in_tmp, name="folder", root=str(root), categories=["disc"])
    assert result.exit_code == 1 and "disc/test/scratch/000.png has no mask" in result.output
    result = _fetch(in_tmp, name="folder", root=str(in_tmp / "nowhere"), categories=["disc"])
    assert result.exit_code == 1 and "nowhere does not exist" in result.output
    assert _fetch(in_tmp, name="bogus", root="x").exit_code == 1


def test_fetch_mvtec_local_copy(in_tmp: Path) -> None:
    if not (SAMPLE_ROOT / "screw").is_dir():
        pytest.skip(f"real MVTec AD sample not found at {SAMPLE_ROOT} (../shared is not checked out here)")
    result = _fetch(in_tmp, name="mvtec", root=str(SAMPLE_ROOT), categories=["screw"], textures=["grid"],
                    url="http://127.0.0.1:9/never-used", sha256=None)  # fmt: skip
    assert result.exit_code == 0, result.output
    screw = _manifest()["categories"]["screw"]
    assert screw["train"] == 10 and screw["test"] == {"good": 5, "scratch_neck": 1}
    assert screw["group"] == "object" and screw["image_sizes"] == [[1024, 1024]]
    assert not Path("data/downloads").exists()


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_fetch_mvtec_downloads_and_extracts(in_tmp: Path, file_server: tuple[str, Path]) -> None:
    base, served = file_server
    src = in_tmp / "src/mvtec_anomaly_detection"
    generate(src, seed=0, n_train=2, n_test=2)
    archive = served / "mvtec.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:  # categories inside one top folder
        tar.add(src, arcname="mvtec_anomaly_detection")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    ds = {"name": "mvtec", "root": "data/mvtec", "categories": ["disc"], "textures": [],
          "url": f"{base}/mvtec.tar.xz", "sha256": sha}  # fmt: skip
    result = _fetch(in_tmp, **ds)
    assert result.exit_code == 0, result.output
    assert Path("data/downloads/mvtec_anomaly_detection.tar.xz").read_bytes() == archive.read_bytes()
    assert (in_tmp / "data/mvtec/disc/train/good/000.png").is_file()
    assert _manifest()["categories"]["disc"]["train"] == 2
    listed = sorted(p.name for p in (in_tmp / "data").iterdir())
    assert listed == ["downloads", "fingerprints", "manifest.json", "mvtec"]

    # Extracted and archive present: a rerun uses them, even with the server gone.
    archive.unlink()
    assert _fetch(in_tmp, **ds).exit_code == 0

    # A half-filled root is not overwritten.
    shutil.rmtree("data/mvtec/disc")
    result = _fetch(in_tmp, **ds)
    assert result.exit_code == 1 and "lacks categories ['disc']" in result.output


def test_fetch_mvtec_offline(in_tmp: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _fetch(in_tmp, name="mvtec", root="data/mvtec", categories=["disc"],
                    url=f"http://127.0.0.1:{port}/mvtec.tar.xz", sha256="0" * 64)  # fmt: skip
    assert result.exit_code == 1
    out = " ".join(result.output.split())  # undo terminal wrapping
    assert "mvtec_anomaly_detection.tar.xz" in out and "dataset.root" in out and "refused" in out.lower()
    assert "with no network at all: `make offline`" in out
    assert not Path("data/manifest.json").exists()
