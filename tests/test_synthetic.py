"""The generated dataset: layout, exact masks, determinism, never overwriting user data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mpad.data import DatasetError, list_split, load_image, load_mask, summarize_category
from mpad.data.catalog import SYNTHETIC_CATEGORIES, SYNTHETIC_TEXTURES
from mpad.data.synthetic import (
    DEFECTS,
    MARKER,
    generate,
    read_marker,
    render,
)


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate(root, seed=3)
    return root


def test_layout_counts_sizes_modes(synthetic_root: Path) -> None:
    assert SYNTHETIC_CATEGORIES == ("stripes", "weave", "disc")
    assert SYNTHETIC_TEXTURES == ("stripes", "weave")
    expected = {"stripes": ((96, 96), "RGB"), "weave": ((80, 112), "L"), "disc": ((112, 96), "RGB")}
    for cat, (size, mode) in expected.items():
        summary = summarize_category(synthetic_root, cat)
        assert summary["train"] == 8
        assert summary["test"] == {"good": 6, **dict.fromkeys(DEFECTS[cat], 2)}
        assert summary["image_sizes"] == [list(size)]
        for s in list_split(synthetic_root, cat, "train") + list_split(synthetic_root, cat, "test"):
            with Image.open(s.image) as im:
                assert im.mode == mode and (im.height, im.width) == size
    assert set(DEFECTS["disc"]) >= {"missing_piece"} and set(DEFECTS["stripes"]) >= {"scratch", "hole", "stain"}
    # Good images have no masks; ground_truth holds only defect folders.
    assert sorted(p.name for p in (synthetic_root / "disc/ground_truth").iterdir()) == sorted(DEFECTS["disc"])


def test_masks_binary_nonempty_and_local(synthetic_root: Path) -> None:
    for cat in SYNTHETIC_CATEGORIES:
        for s in list_split(synthetic_root, cat, "test"):
            img = load_image(s.image)
            mask = load_mask(s, img.shape[:2])
            if s.label == 0:
                assert not mask.any()
                continue
            raw = np.asarray(Image.open(s.mask))
            assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 255}
            # A defect is a local change: visible, but far from the whole image.
            assert 10 <= mask.sum() <= 0.1 * mask.size, (s.image, mask.sum())


def test_images_are_not_trivial(synthetic_root: Path) -> None:
    a = load_image(synthetic_root / "stripes/train/good/000.png").astype(float)
    b = load_image(synthetic_root / "stripes/train/good/001.png").astype(float)
    assert a.std() > 15 and np.abs(a - b).mean() > 1  # textured, and images differ
    discs = [load_image(synthetic_root / f"disc/train/good/{i:03d}.png") for i in range(8)]
    red = [np.argwhere(d[..., 0].astype(int) - d[..., 1] > 60).mean(axis=0) for d in discs]
    assert np.ptp(np.array(red), axis=0).max() > 5  # the disc moves between images


def test_mask_is_exactly_the_changed_pixels_and_on_the_object() -> None:
    for seed in range(25):
        for cat in SYNTHETIC_CATEGORIES:
            for kind in DEFECTS[cat]:
                clean = render(cat, np.random.default_rng(seed))
                broken = render(cat, np.random.default_rng(seed), kind)
                # Same rng prefix: the base image is identical, only the defect differs.
                changed = broken.image != clean.image
                changed = changed.any(axis=2) if changed.ndim == 3 else changed
                assert np.array_equal(broken.mask, changed)
                assert broken.mask.any()
                assert not (broken.mask & ~broken.object).any(), (seed, cat, kind)
                assert not clean.mask.any()
    disc = render("disc", np.random.default_rng(0))
    assert 0.1 < disc.object.mean() < 0.5  # the object is a part of the image, not all of it


def test_deterministic_bytes_and_seed_dependence(tmp_path: Path, synthetic_root: Path) -> None:
    generate(tmp_path / "a", seed=3)
    assert _hashes(tmp_path / "a") == _hashes(synthetic_root)
    generate(tmp_path / "b", seed=4)
    ha, hb = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert ha.keys() == hb.keys()
    assert sum(ha[k] != hb[k] for k in ha) > len(ha) - 2  # all images differ (marker too)


def test_marker_and_overwrite_rules(tmp_path: Path) -> None:
    root = tmp_path / "gen"
    generate(root, seed=1, n_train=2, n_test=4)
    marker = read_marker(root)
    assert marker is not None and marker["seed"] == 1 and marker["n_train"] == 2
    assert json.loads((root / MARKER).read_text())["generator"] == "mpad.data.synthetic"
    (root / "stale.txt").write_text("left over")
    generate(root, seed=2, n_train=2, n_test=4)  # marked: may be replaced
    assert read_marker(root)["seed"] == 2 and not (root / "stale.txt").exists()
    assert len(list_split(root, "weave", "train")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["gen"]  # no temporary left behind

    user = tmp_path / "mine"
    (user / "screw").mkdir(parents=True)
    (user / "screw/keep.png").write_bytes(b"precious")
    with pytest.raises(DatasetError, match=r"mine.*refusing"):
        generate(user, seed=0)
    assert (user / "screw/keep.png").read_bytes() == b"precious"
    with pytest.raises(DatasetError, match="n_test"):
        generate(tmp_path / "x", seed=0, n_test=1)


def test_held_out_defects_exact_masks_and_kept_out_of_the_dataset(synthetic_root: Path) -> None:
    from mpad.data.synthetic import HELD_OUT_CATEGORIES, HELD_OUT_DEFECTS

    for seed in range(5):
        for cat in ("grain", *SYNTHETIC_TEXTURES):
            for kind in HELD_OUT_DEFECTS:
                clean = render(cat, np.random.default_rng(seed))
                broken = render(cat, np.random.default_rng(seed), kind)
                changed = broken.image != clean.image
                changed = changed.any(axis=2) if changed.ndim == 3 else changed
                assert np.array_equal(broken.mask, changed) and broken.mask.any(), (seed, cat, kind)
                assert broken.mask.mean() < 0.05  # small defects: under about three 8x8 patches of 64 px
    assert render("grain", np.random.default_rng(0)).image.shape == (192, 192, 3)
    with pytest.raises(ValueError, match="not generated"):
        render("disc", np.random.default_rng(0), "spots")
    # the generated dataset is unchanged: no held-out category, no held-out kind
    assert not any((synthetic_root / c).exists() for c in HELD_OUT_CATEGORIES)
    kinds = {p.name for c in SYNTHETIC_CATEGORIES for p in (synthetic_root / c / "test").iterdir()}
    assert not kinds & set(HELD_OUT_DEFECTS)
