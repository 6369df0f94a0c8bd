"""A full disk or quota (issue 34, item 7): one line naming the path and the space it needs, exit status 1, no
temporary left, the previous output as it was; large writes refused before they start where that is cheap.

The error mapping is tested by patching; the real thing on a 2 MB tmpfs (root can mount one; skipped otherwise).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import yaml
from e2e import commit, copy_project, preset_overrides, run
from serving import THRESHOLDS
from test_download import Server
from tiny_records import tiny_record
from typer.testing import CliRunner

from mpad.data.download import download, safe_extract
from mpad.io import NoSpaceError, atomic_path, write_bytes, write_png
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
Usage = namedtuple("Usage", "total used free")
MiB = 1 << 20


def full_after(limit: int, code: int = errno.ENOSPC):
    """A Path.write_bytes that writes at most `limit` bytes in all, then fails as a full disk (half a file)."""
    written = [0]

    def write(self: Path, data: bytes) -> int:
        room = max(0, limit - written[0])
        with open(self, "wb") as out:
            out.write(data[:room])
        written[0] += min(room, len(data))
        if room < len(data):
            raise OSError(code, os.strerror(code), str(self))
        return len(data)

    return write


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def free_bytes(n: int):
    return lambda path: Usage(10 * n, 9 * n, n)


@pytest.mark.parametrize(("code", "said"), [(errno.ENOSPC, "no space left on device"), (errno.EDQUOT, "disk quota")])
def test_a_full_disk_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch, code, said):
    out = tmp_path / "prompts.pt"
    out.write_bytes(b"old")
    monkeypatch.setattr(Path, "write_bytes", full_after(1000, code))
    monkeypatch.setattr(shutil, "disk_usage", free_bytes(1000))
    with pytest.raises(NoSpaceError) as caught:
        write_bytes(out, b"x" * 5000)
    assert caught.value.errno == code
    assert str(caught.value) == (
        f"{out}: {said}{' exceeded' if code == errno.EDQUOT else ''}: it needs 5.0 kB, 1.0 kB free there; "
        "the previous one is kept. Free some space and re-run"
    )
    assert out.read_bytes() == b"old" and entries(tmp_path) == ["prompts.pt"]


def test_a_full_disk_while_writing_a_folder_names_the_folder_and_what_it_took(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_bytes", full_after(2500))
    monkeypatch.setattr(shutil, "disk_usage", free_bytes(0))
    with pytest.raises(NoSpaceError) as caught, atomic_path(tmp_path / "synth") as tmp:
        tmp.mkdir()
        for i in range(5):
            write_bytes(tmp / f"{i}.png", b"p" * 1000)  # the third fills the disk
    assert str(caught.value) == (
        f"{tmp_path / 'synth'}: no space left on device: it needs at least 3.0 kB, 0 B free there; nothing was "
        "left half-written. Free some space and re-run"
    )  # the two files written, and the one it was writing
    assert entries(tmp_path) == []


def test_a_folder_that_filled_the_disk_early_needs_at_least_its_previous_size(tmp_path, monkeypatch):
    (tmp_path / "curves").mkdir()
    (tmp_path / "curves" / "metrics.tsv").write_bytes(b"m" * 5000)
    monkeypatch.setattr(Path, "write_bytes", full_after(100))
    with pytest.raises(NoSpaceError, match=r"curves: no space left on device: it needs at least 5\.0 kB, .*previous"):
        with atomic_path(tmp_path / "curves") as tmp:
            tmp.mkdir()
            write_bytes(tmp / "metrics.tsv", b"n" * 300)
    assert (tmp_path / "curves" / "metrics.tsv").read_bytes() == b"m" * 5000 and entries(tmp_path) == ["curves"]


def test_every_command_ends_a_full_disk_in_one_line(tmp_path, monkeypatch):
    """The stages' commands (here `mpad schema`, writing with mpad.io) print one line, exit 1, no traceback; under
    DVC, which removed the outputs before the stage ran, the line says how to get them back."""
    out = tmp_path / "schema.json"
    out.write_text("old")
    monkeypatch.setattr(Path, "write_bytes", full_after(10))
    monkeypatch.setattr(shutil, "disk_usage", free_bytes(10))
    args = ["schema", "--params", str(ROOT / "params.yaml"), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.startswith(f"error: {out}: no space left on device: it needs ")
    assert result.output.strip().endswith("10 B free there; the previous one is kept. Free some space and re-run")
    assert len(result.output.strip().splitlines()) == 1 and out.read_text() == "old" and entries(tmp_path) == [out.name]
    out.unlink()
    monkeypatch.setenv("DVC_STAGE", "schema")
    result = CliRunner().invoke(app, args)
    assert result.output.strip().endswith("nothing was left half-written. Free some space and re-run; `dvc checkout` "
                                          "restores the previous outputs")  # fmt: skip


def test_a_full_disk_outside_mpad_io_is_one_line_too(tmp_path, monkeypatch):
    import stages.schema

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "dvclive/train/carpet/metrics.json")

    monkeypatch.setattr(stages.schema, "comments", full)
    result = CliRunner().invoke(app, ["schema", "--params", str(ROOT / "params.yaml"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert result.output == "error: dvclive/train/carpet/metrics.json: No space left on device while writing it\n"


def test_train_refuses_before_training_without_room_for_its_outputs(tmp_path, monkeypatch):
    """Twice the previous run's outputs (the new ones, then DVC's copy into its cache), sized from dvc.lock when
    DVC has removed them; `least` (1 MiB) an output without a previous size."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path)
    lock = {"stages": {"train@carpet": {"outs": [{"path": "data/prompts/carpet.pt", "size": 3 * MiB}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    needed = 2 * (3 * MiB + MiB)
    monkeypatch.setattr(shutil, "disk_usage", free_bytes(needed - 1))
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert result.exit_code == 1 and not (tmp_path / "data").exists()
    assert result.output.strip() == (
        f"error: data/prompts/carpet.pt: not enough free space: it needs {needed / 1e6:.1f} MB (twice the previous "
        f"run's outputs: the new ones and DVC's cache copy), {(needed - 1) / 1e6:.1f} MB free there; nothing was "
        "written. Free some space and re-run"
    )
    monkeypatch.setattr(shutil, "disk_usage", free_bytes(needed))
    result = CliRunner().invoke(app, ["train", "--category", "carpet"])
    assert "data/synth/carpet" in result.output  # past the check: it stops at the missing synthesized set


def test_export_refuses_before_tracing_when_the_vision_tower_cannot_fit(tmp_path, monkeypatch, tiny_clip):
    prompts, out = tmp_path / "disc.pt", tmp_path / "disc.onnx"
    tiny_record(tiny_clip, "disc", memory=False).save(prompts)
    (tmp_path / "disc.json").write_text(json.dumps(THRESHOLDS))
    weights = sum(t.numel() * t.element_size() for t in tiny_clip.model.visual.state_dict().values())
    monkeypatch.setattr(shutil, "disk_usage", free_bytes(weights - 1))
    result = CliRunner().invoke(app, ["export", "--prompts", str(prompts), "--out", str(out),
                                      "--thresholds-file", str(tmp_path / "disc.json"), "--force"])  # fmt: skip
    assert result.exit_code == 1 and entries(tmp_path) == ["disc.json", "disc.pt"]
    assert f"error: {out}: not enough free space: it needs {weights / 1e6:.1f} MB (the vision tower's " in result.output


def test_a_download_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    payload = b"a" * 5000
    monkeypatch.setattr(shutil, "disk_usage", free_bytes(4999))
    with Server(payload) as server, pytest.raises(NoSpaceError) as caught:
        download(server.url, tmp_path / "archive.tar.gz", None, progress=False)
    assert "archive.tar.gz.part: not enough free space: it needs 5.0 kB (the rest of the archive)" in str(caught.value)
    assert not (tmp_path / "archive.tar.gz").exists()


def test_an_archive_that_cannot_be_extracted_for_space_is_no_corrupt_archive(tmp_path, monkeypatch):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("top/file.bin")
        info.size = 4000
        tar.addfile(info, io.BytesIO(b"b" * 4000))
    monkeypatch.setattr(shutil, "disk_usage", free_bytes(3999))
    with pytest.raises(
        NoSpaceError, match=r"extracted: not enough free space: it needs 4.0 kB \(the archive's files\)"
    ):
        safe_extract(archive, tmp_path / "extracted")
    assert entries(tmp_path) == ["a.tar"]


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount(kib): a tmpfs of that size at a new folder under tmp_path (root only; skips the test otherwise),
    unmounted afterwards."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'mount failed'})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


@pytest.fixture
def tmpfs(mount_tmpfs):
    """A 2 MiB tmpfs."""
    return mount_tmpfs(2048)


def test_on_a_real_full_disk_a_stage_fails_in_one_line_and_keeps_the_previous_output(tmpfs):
    out = tmpfs / "params.schema.json"
    out.write_text("old")
    (tmpfs / "filler").write_bytes(b"\0" * (shutil.disk_usage(tmpfs).free - 4096))  # leaves less than a schema
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "stages", "schema", "--params", str(ROOT / "params.yaml"), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {out}: no space left on device: it needs ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert out.read_text() == "old" and entries(tmpfs) == ["filler", "params.schema.json"]


def test_on_a_real_full_disk_a_folder_leaves_nothing_half_written(tmpfs):
    rng = np.random.default_rng(0)
    with pytest.raises(NoSpaceError, match=r"synth: no space left on device: it needs at least 2\.\d MB"):
        with atomic_path(tmpfs / "synth") as tmp:
            tmp.mkdir()
            for i in range(20):  # about 270 kB each, incompressible
                write_png(tmp / f"{i}.png", rng.integers(0, 255, (300, 300, 3), dtype=np.uint8))
    assert entries(tmpfs) == []


@pytest.mark.slow
def test_under_dvc_a_stage_without_room_refuses_before_its_work_and_checkout_restores(tmp_path, mount_tmpfs):
    """The issue's case: a train re-run on a nearly full disk. DVC removes the stage's outputs, then the stage
    refuses in one line (it needs twice its outputs: the new ones and DVC's cache copy), before any training
    and before DVC's commit could fail; nothing half-written; `dvc checkout` brings the previous prompts back."""
    one = ["dataset.categories=[stripes]", "dataset.textures=[stripes]", "mpts.steps=5", "mpts.meta_epochs=1"]
    project = copy_project(tmp_path / "run", [*preset_overrides("offline"), *one, "oagm.samples=8"])
    run(["dvc", "repro"], project)
    commit(project, "run")
    prompts = (project / "data" / "prompts" / "stripes.pt").read_bytes()
    used = int(subprocess.run(["du", "-sk", str(project)], capture_output=True, text=True).stdout.split()[0])
    disk = mount_tmpfs(used + 2048)  # about 2 MB free: less than train's 2 x (1 MiB least + 1 MiB least)
    shutil.copytree(project, disk, symlinks=True, dirs_exist_ok=True)
    params = yaml.safe_load((disk / "params.yaml").read_text())
    params["mpts"]["seed"] = 1  # train and evaluate must run again
    (disk / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["dvc", "repro"], cwd=disk, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in output and "train stripes" not in output  # no step taken
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: data/prompts/stripes.pt: not enough free space: it needs")
    assert errors[0].endswith(
        "nothing was written. Free some space and re-run; `dvc checkout` restores the previous outputs"
    )
    assert not list(disk.rglob("*.tmp")) and not (disk / "data" / "prompts" / "stripes.pt").exists()
    run(["dvc", "checkout"], disk)
    assert (disk / "data" / "prompts" / "stripes.pt").read_bytes() == prompts
