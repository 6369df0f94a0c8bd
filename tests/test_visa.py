"""VisA: a small archive shaped like VisA_20220922.tar, served from a loopback HTTP server, downloaded,
extracted and converted to the MVTec layout by the fetch stage's work (prepare_dataset)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_download import Server

from mpad.config import DatasetConfig
from mpad.data import DatasetError, list_split, load_mask
from mpad.data.catalog import MVTEC
from mpad.data.prepare import prepare_dataset
from mpad.data.visa import extracted_dir

HEADER = "object,split,label,image,mask\n"


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _label_png() -> bytes:
    """A VisA label PNG: defect indices 1 and 38 on 0, not 0/255."""
    values = np.zeros((24, 32), np.uint8)
    values[2:6, 3:9], values[10:12, 20:30] = 1, 38
    buf = io.BytesIO()
    Image.fromarray(values, mode="L").save(buf, "PNG")
    return buf.getvalue()


def _visa_tar(csv_extra: str = "") -> tuple[bytes, dict[str, bytes]]:
    """(tar bytes, its files): candle with 3 train, 1 test normal, 2 anomalies; pcb1 with 1 + 1 + 1."""
    files: dict[str, bytes] = {}
    rows = []
    for obj, n_train, n_good, n_bad in (("candle", 3, 1, 2), ("pcb1", 1, 1, 1)):
        for i in range(n_train + n_good):
            path = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            files[path] = _jpeg(len(files))
            rows.append(f"{obj},{'train' if i < n_train else 'test'},normal,{path},")
        for i in range(n_bad):
            path, mask = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            files[path], files[mask] = _jpeg(len(files)), _label_png()
            rows.append(f"{obj},test,anomaly,{path},{mask}")
    files["split_csv/1cls.csv"] = (HEADER + "\n".join(rows) + "\n" + csv_extra).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), files


def _config(root: Path, url: str, payload: bytes, categories: list[str]) -> DatasetConfig:
    return DatasetConfig(
        name="visa",
        root=str(root),
        url=url,
        sha256=hashlib.sha256(payload).hexdigest(),
        categories=categories,
        textures=None,
    )


def test_visa_archive_is_downloaded_and_converted(tmp_path: Path) -> None:
    payload, files = _visa_tar()
    root, downloads = tmp_path / "data/visa", tmp_path / "data/downloads"
    with Server(payload) as server:
        manifest = prepare_dataset(_config(root, server.url, payload, ["candle", "pcb1"]), downloads, print)
        assert len(server.requests) == 1
    assert (downloads / "VisA_20220922.tar").read_bytes() == payload
    assert manifest["name"] == "visa" and "CC BY 4.0" in manifest["note"]
    candle = manifest["categories"]["candle"]
    assert candle["train"] == 3 and candle["test"] == {"good": 1, "bad": 2} and candle["group"] == "object"
    assert manifest["categories"]["pcb1"]["test"] == {"good": 1, "bad": 1}

    # JPEGs byte for byte; masks binarised: 255 exactly where the label PNG is non-zero
    assert (root / "candle/train/good/0002.JPG").read_bytes() == files["candle/Data/Images/Normal/0002.JPG"]
    assert (root / "candle/test/good/0003.JPG").read_bytes() == files["candle/Data/Images/Normal/0003.JPG"]
    anomalies = [s for s in list_split(root, "candle", "test") if s.label == 1]
    assert [s.image.name for s in anomalies] == ["000.JPG", "001.JPG"]
    assert anomalies[0].image.read_bytes() == files["candle/Data/Images/Anomaly/000.JPG"]
    mask = np.asarray(Image.open(root / "candle/ground_truth/bad/000_mask.png"))
    assert sorted(np.unique(mask).tolist()) == [0, 255]
    assert np.array_equal(mask > 0, np.asarray(Image.open(io.BytesIO(files["candle/Data/Masks/Anomaly/000.png"]))) > 0)
    assert load_mask(anomalies[0], (24, 32)).sum() == 4 * 6 + 2 * 10

    # the extraction is left exactly as the archive has it, and nothing is written outside data/
    raw = extracted_dir(root)
    assert {p.relative_to(raw).as_posix(): p.read_bytes() for p in raw.rglob("*") if p.is_file()} == files
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["downloads", "visa", "visa_extracted"]

    # complete: a second fetch reads nothing and asks the server for nothing (the URL is now dead)
    before = (root / "candle/train/good/0000.JPG").stat().st_mtime_ns
    again = prepare_dataset(_config(root, "http://127.0.0.1:9/gone.tar", payload, ["candle"]), downloads, print)
    assert again["categories"]["candle"] == candle
    assert (root / "candle/train/good/0000.JPG").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG\n", "4 fields instead of 5"),
        ("candle,val,normal,candle/Data/Images/Normal/0000.JPG,\n", "split 'val'"),
        ("candle,test,anomaly,candle/Data/Images/Anomaly/001.JPG,\n", "an anomaly needs mask"),
        ("candle,train,normal,../escape.JPG,\n", "must be relative, inside the archive"),
    ],
)
def test_malformed_split_row_is_refused_naming_its_line(tmp_path: Path, extra: str, problem: str) -> None:
    payload, files = _visa_tar(extra)
    line = len(files["split_csv/1cls.csv"].decode().splitlines())  # the extra row is the last line
    root = tmp_path / "data/visa"
    with Server(payload) as server, pytest.raises(DatasetError) as err:
        prepare_dataset(_config(root, server.url, payload, ["candle"]), tmp_path / "data/downloads", print)
    assert f"1cls.csv, line {line}: " in str(err.value) and problem in str(err.value)
    assert not root.exists()  # nothing half-converted


def test_visa_without_network_says_where_to_put_the_archive(tmp_path: Path) -> None:
    config = DatasetConfig(
        name="visa",
        root=str(tmp_path / "data/visa"),
        url="http://127.0.0.1:9/VisA_20220922.tar",
        categories=["candle"],
        textures=None,
    )
    with pytest.raises(DatasetError) as err:
        prepare_dataset(config, tmp_path / "data/downloads", print)
    assert str((tmp_path / "data/downloads/VisA_20220922.tar").resolve()) in str(err.value)
    # the other way it names works: the archive extracted there by hand is converted, with no network
    extracted = (tmp_path / "data/visa_extracted").resolve()
    assert f"or extract it yourself into {extracted} (the folder holding split_csv/1cls.csv)" in str(err.value)
    assert "`make offline`" in str(err.value)
    with tarfile.open(fileobj=io.BytesIO(_visa_tar()[0])) as tar:
        tar.extractall(extracted, filter="data")
    manifest = prepare_dataset(config, tmp_path / "data/downloads", print)
    assert manifest["categories"]["candle"]["test"] == {"good": 1, "bad": 2}


def test_one_name_switches_the_dataset_defaults() -> None:
    visa = DatasetConfig.from_params({"name": "visa", "categories": ["candle"]})
    assert (visa.root, visa.sha256) == ("data/visa", None) and visa.url.endswith("/VisA_20220922.tar")
    mvtec = DatasetConfig.from_params({"name": "mvtec", "categories": ["screw"]})
    assert mvtec.root == "data/mvtec" and mvtec.sha256 == MVTEC.sha256
    own = DatasetConfig.from_params({"name": "mvtec", "url": "http://mirror/x.tar.xz", "categories": ["screw"]})
    assert own.sha256 is None  # another archive: the official pin would be wrong
