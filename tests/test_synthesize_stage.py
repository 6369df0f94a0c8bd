"""Stage `synthesize` end to end on the generated dataset with the tiny random-weight model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from e2e import TINY_MODEL, update_params, write_params
from PIL import Image
from typer.testing import CliRunner

from mpad import layout
from mpad.data import Sample, synthetic
from mpad.data.shots import save_shots
from stages import synthesize

PARAMS = {
    "dataset": {"name": "synthetic", "root": "data/synthetic", "textures": ["stripes", "weave"], "seed": 0},
    "shots": {"k": 2, "seed": 0},
    "model": TINY_MODEL,
    "oagm": {
        "enabled": True,
        "region": "blobs",
        "samples": 5,
        "sigma": 0.25,
        "clean_fraction": 0.2,
        "mask_method": "border",
        "mask_threshold": 0.5,
        "mask_layers": 6,
        "seed": 0,
    },
}


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(synthesize.main)
    return app


def _write_shots(root: Path, category: str, names: list[str]) -> None:
    picks = [Sample(root / category / "train" / "good" / name, None, 0, "good") for name in names]
    save_shots(layout.shots_file(category), category, root, len(names), 0, picks)


@pytest.fixture
def project(workdir):
    root = Path("data/synthetic")
    synthetic.generate(root, seed=0, n_train=3, n_test=2)
    for category in ("disc", "stripes"):
        _write_shots(root, category, ["000.png", "002.png"])
    write_params(workdir, PARAMS)
    return workdir


def _run(*args: str):
    return CliRunner().invoke(_app(), ["--category", *args])


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_stage_writes_manifest_images_and_masks(project):
    result = _run("disc")
    assert result.exit_code == 0, result.output
    assert "10 images" in result.output and "RANDOM WEIGHTS" in result.output
    out = Path("data/synth/disc")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["category"] == "disc"
    assert manifest["image_size"] == [64, 64]
    assert manifest["object_mask_method"] == "border"
    assert manifest["random_weights"] is True and "RANDOM WEIGHTS" in manifest["note"]
    samples = manifest["samples"]
    assert len(samples) == 10
    assert {s["shot"] for s in samples} == {"disc/train/good/000.png", "disc/train/good/002.png"}
    assert [s["image"] for s in samples] == [f"images/{i:04d}.png" for i in range(10)]
    n_clean = 0
    for index, s in enumerate(samples):
        image = np.asarray(Image.open(out / s["image"]))
        mask = np.asarray(Image.open(out / s["mask"]))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        assert s["anomalous_fraction"] == pytest.approx((mask > 0).mean())
        obj = np.asarray(Image.open(out / "object_masks" / f"{index // 5}.png")) > 0
        assert not ((mask > 0) & ~obj).any()  # M'_a inside M_obj
        n_clean += not mask.any()
    assert n_clean == 2  # round(0.2 * 5) per shot
    for i in range(2):
        obj = np.asarray(Image.open(out / "object_masks" / f"{i}.png")) > 0
        assert 0.05 < obj.mean() < 0.6  # the disc, not the whole image
    assert not list(Path("data/synth").glob(".*tmp"))  # atomic: no temporary left


def test_stage_is_deterministic(project):
    assert _run("disc").exit_code == 0
    first = _pngs(Path("data/synth/disc"))
    manifest = Path("data/synth/disc/manifest.json").read_bytes()
    assert _run("disc").exit_code == 0
    assert _pngs(Path("data/synth/disc")) == first
    assert Path("data/synth/disc/manifest.json").read_bytes() == manifest
    assert len(first) == 10 + 10 + 2


def test_texture_category_gets_whole_image_object_mask(project):
    result = _run("stripes")
    assert result.exit_code == 0, result.output
    manifest = json.loads(Path("data/synth/stripes/manifest.json").read_text())
    assert manifest["texture"] is True
    for i in range(2):
        assert (np.asarray(Image.open(f"data/synth/stripes/object_masks/{i}.png")) == 255).all()


def test_null_textures_means_dataset_default(project):
    update_params(project, "dataset", textures=None)
    assert _run("stripes").exit_code == 0
    assert json.loads(Path("data/synth/stripes/manifest.json").read_text())["texture"] is True
    assert _run("disc").exit_code == 0
    assert json.loads(Path("data/synth/disc/manifest.json").read_text())["texture"] is False


def test_changed_shot_fails_naming_the_file(project):
    assert _run("disc").exit_code == 0
    before = _pngs(Path("data/synth/disc"))
    shot = Path("data/synthetic/disc/train/good/002.png")
    pixels = np.asarray(Image.open(shot)).copy()
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(shot)
    result = _run("disc")
    assert result.exit_code == 1
    assert "002.png" in result.output and "changed" in result.output
    assert _pngs(Path("data/synth/disc")) == before  # previous output untouched


def test_missing_shots_file_fails(project):
    result = _run("weave")
    assert result.exit_code == 1
    assert "data/shots/weave.json" in result.output


def test_sigma_change_changes_images(project):
    assert _run("disc").exit_code == 0
    first = _pngs(Path("data/synth/disc/images"))
    update_params(project, "oagm", sigma=0.1)
    assert _run("disc").exit_code == 0
    assert _pngs(Path("data/synth/disc/images")) != first


def test_clip_method_runs(project):
    update_params(project, "oagm", mask_method="clip", samples=2)
    result = _run("disc")
    assert result.exit_code == 0, result.output
    manifest = json.loads(Path("data/synth/disc/manifest.json").read_text())
    assert manifest["object_mask_method"] == "clip" and len(manifest["samples"]) == 4


@pytest.mark.parametrize("texture_mask", ["mask_method", "whole"])
def test_texture_mask_clip_on_a_texture(project, texture_mask):
    update_params(project, "oagm", mask_method="clip", mask_layers=2, texture_mask=texture_mask)
    result = _run("stripes")
    assert result.exit_code == 0, result.output
    manifest = json.loads(Path("data/synth/stripes/manifest.json").read_text())
    assert manifest["texture"] is True and manifest["texture_mask"] == texture_mask
    whole = [(np.asarray(Image.open(f"data/synth/stripes/object_masks/{i}.png")) == 255).all() for i in range(2)]
    assert whole == [texture_mask == "whole"] * 2
