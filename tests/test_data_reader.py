"""The MVTec-layout reader: the real `screw` sample, and broken trees made in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mpad.data import (
    MVTEC_CATEGORIES,
    MVTEC_TEXTURES,
    DatasetError,
    Sample,
    image_size,
    is_complete_mvtec,
    list_categories,
    list_split,
    load_image,
    load_mask,
    summarize_category,
)
from mpad.data.manifest import pin, shapes

SAMPLE_ROOT = Path(__file__).resolve().parents[1].parent / "shared/data/mvtec-sample"


@pytest.fixture
def mvtec_sample() -> Path:
    if not (SAMPLE_ROOT / "screw").is_dir():
        pytest.skip(f"real MVTec AD sample not found at {SAMPLE_ROOT} (../shared is not checked out here)")
    return SAMPLE_ROOT


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _tree(root: Path, size: tuple[int, int] = (16, 20)) -> Path:
    """A valid one-category tree: 2 train, 1 test good, 1 test 'crack' with its mask."""
    h, w = size
    img = np.full((h, w, 3), 120, np.uint8)
    for i in range(2):
        _png(root / "cat/train/good" / f"{i:03d}.png", img)
    _png(root / "cat/test/good/000.png", img)
    _png(root / "cat/test/crack/000.png", img)
    mask = np.zeros((h, w), np.uint8)
    mask[2:5, 3:9] = 255
    _png(root / "cat/ground_truth/crack/000_mask.png", mask)
    return root


def test_real_screw_sample(mvtec_sample: Path) -> None:
    train = list_split(mvtec_sample, "screw", "train")
    test = list_split(mvtec_sample, "screw", "test")
    assert len(train) == 10 and all(s.label == 0 and s.defect == "good" and s.mask is None for s in train)
    assert [s.image.name for s in train] == [f"{i:03d}.png" for i in range(10)]
    assert [(s.defect, s.label) for s in test] == [("good", 0)] * 5 + [("scratch_neck", 1)]
    defect = test[-1]
    assert defect.mask == mvtec_sample / "screw/ground_truth/scratch_neck/024_mask.png"

    assert image_size(defect.image) == (1024, 1024)
    img = load_image(defect.image)
    assert img.shape == (1024, 1024, 3) and img.dtype == np.uint8
    # Grayscale source: the three channels are identical and match the file's single channel.
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    assert np.array_equal(img[..., 0], np.asarray(Image.open(defect.image)))
    assert img.std() > 5  # a real picture, not a blank

    mask = load_mask(defect, img.shape[:2])
    assert mask.dtype == bool and mask.shape == (1024, 1024)
    assert 0 < mask.sum() < mask.size * 0.05
    raw = np.asarray(Image.open(defect.mask))
    assert np.array_equal(mask, raw > 0)
    for s in test[:5]:
        good = load_mask(s, (1024, 1024))
        assert good.shape == (1024, 1024) and not good.any()

    summary = summarize_category(mvtec_sample, "screw")
    assert summary["train"] == 10 and summary["test"] == {"good": 5, "scratch_neck": 1}
    assert summary["image_sizes"] == [[1024, 1024]]
    assert [len(summary["fingerprint"][s]) for s in ("train", "test")] == [64, 64]
    # The sample is one category, not the whole dataset.
    assert not is_complete_mvtec(mvtec_sample)


def test_constants() -> None:
    assert len(MVTEC_CATEGORIES) == 15 and len(set(MVTEC_CATEGORIES)) == 15
    assert set(MVTEC_TEXTURES) == {"carpet", "grid", "leather", "tile", "wood"} <= set(MVTEC_CATEGORIES)


def test_is_complete_mvtec(tmp_path: Path) -> None:
    for c in MVTEC_CATEGORIES:
        for sub in ("train/good", "test/good", "ground_truth"):
            (tmp_path / c / sub).mkdir(parents=True)
    assert is_complete_mvtec(tmp_path)
    (tmp_path / "zipper/ground_truth").rmdir()
    assert not is_complete_mvtec(tmp_path)


def test_folder_dataset_any_name_and_order(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _png(root / "cat/test/bent/001.png", np.zeros((16, 20, 3), np.uint8))
    _png(root / "cat/ground_truth/bent/001_mask.png", np.full((16, 20), 255, np.uint8))
    (root / "cat/test/good/Thumbs.db").write_bytes(b"x")  # non-images are ignored
    (root / "cat/test/good/.hidden.png").write_bytes(b"x")
    test = list_split(root, "cat", "test")
    names = [(s.defect, s.image.name) for s in test]
    assert names == [("good", "000.png"), ("bent", "001.png"), ("crack", "000.png")]
    assert list_categories(root) == ["cat"]
    mask = load_mask(test[2], (16, 20))
    assert mask.sum() == 3 * 6 and mask[2:5, 3:9].all()
    summary = summarize_category(root, "cat")
    assert summary["test"] == {"bent": 1, "crack": 1, "good": 1} and summary["image_sizes"] == [[16, 20]]
    # Each split's fingerprint follows its files: a new size changes it, and so does a same-size file's new mtime
    # (a replaced file); the other split's stays.
    before = summary["fingerprint"]
    _png(root / "cat/train/good/000.png", np.random.default_rng(0).integers(0, 255, (16, 20, 3), np.uint8))
    after = summarize_category(root, "cat")["fingerprint"]
    assert after["train"] != before["train"] and after["test"] == before["test"]
    mask = root / "cat/ground_truth/bent/001_mask.png"
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 1))
    again = summarize_category(root, "cat")["fingerprint"]
    assert again["test"] != after["test"] and again["train"] == after["train"]


def test_pin_takes_the_coordinators_manifest_of_a_copy_with_the_same_files_and_sizes(tmp_path: Path) -> None:
    """A Ray node's copy of the dataset has other mtimes: fetch writes the coordinator's manifest instead of its
    own when the copy has the same files and sizes, and refuses one that differs in either."""
    coordinator, node = _tree(tmp_path / "coordinator"), _tree(tmp_path / "node")

    def manifest(root: Path) -> dict:
        return {"root": "data/x", "categories": {"cat": summarize_category(root, "cat")}}

    for f in node.rglob("*.png"):
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    ours, theirs = manifest(node), manifest(coordinator)
    assert ours["categories"]["cat"]["fingerprint"] != theirs["categories"]["cat"]["fingerprint"]
    pinned = {"manifest": theirs, "shapes": shapes(coordinator, ["cat"])}
    assert pin(ours, pinned, node) == theirs
    (node / "cat/test/good/Thumbs.db").write_bytes(b"x")  # not an image: not the dataset's
    assert pin(ours, pinned, node) == theirs
    _png(node / "cat/test/good/000.png", np.zeros((16, 21, 3), np.uint8))  # another size
    with pytest.raises(DatasetError, match=r"cat/test differs from the coordinator's copy"):
        pin(ours, pinned, node)
    (node / "cat/test/good/000.png").unlink()
    with pytest.raises(DatasetError, match=r"cat/test differs"):
        pin(ours, pinned, node)
    with pytest.raises(DatasetError, match="not the dataset of the coordinator's manifest"):
        pin({**ours, "root": "elsewhere"}, pinned, node)


def test_missing_category_and_train(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    with pytest.raises(DatasetError, match=r"nope"):
        list_split(root, "nope", "train")
    for p in (root / "cat/train/good").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"train/good holds no images"):
        list_split(root, "cat", "train")
    (root / "cat/train/good").rmdir()
    with pytest.raises(DatasetError, match=r"cat/train/good not found"):
        list_split(root, "cat", "train")
    with pytest.raises(DatasetError, match="unknown split"):
        list_split(root, "cat", "val")


def test_defect_class_in_train_is_rejected(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _png(root / "cat/train/crack/000.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"crack.*only contain good"):
        list_split(root, "cat", "train")


def test_missing_mask_names_image_and_expected_mask(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "cat/ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(DatasetError) as err:
        list_split(root, "cat", "test")
    assert "cat/test/crack/000.png" in str(err.value)
    assert "ground_truth/crack/000_mask.png" in str(err.value)


def test_mask_of_wrong_size_names_both_files(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    _png(root / "cat/ground_truth/crack/000_mask.png", np.full((8, 8), 255, np.uint8))
    sample = list_split(root, "cat", "test")[-1]
    with pytest.raises(DatasetError) as err:
        load_mask(sample, image_size(sample.image))
    assert "000_mask.png" in str(err.value) and "test/crack/000.png" in str(err.value)
    assert "8x8" in str(err.value) and "16x20" in str(err.value)
    with pytest.raises(DatasetError, match="000_mask.png"):
        summarize_category(root, "cat")


def test_truncated_and_garbage_images(tmp_path: Path) -> None:
    path = _png(tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    data = path.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cut\.png"):
        load_image(cut)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"junk\.png"):
        load_image(junk)
    with pytest.raises(DatasetError, match=r"junk\.png"):
        image_size(junk)
    with pytest.raises(DatasetError, match=r"absent\.png"):
        load_image(tmp_path / "absent.png")


def test_image_modes_become_rgb(tmp_path: Path) -> None:
    rgba = np.zeros((5, 7, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    out = load_image(_png(tmp_path / "rgba.png", rgba))
    assert out.shape == (5, 7, 3) and (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()

    pal = Image.fromarray(np.full((5, 7, 3), [10, 20, 30], np.uint8))
    pal = pal.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "pal.png")
    assert (load_image(tmp_path / "pal.png") == [10, 20, 30]).all()

    gray16 = Image.fromarray(np.full((5, 7), 65535, np.uint16))
    gray16.save(tmp_path / "g16.png")
    out16 = load_image(tmp_path / "g16.png")
    assert out16.shape == (5, 7, 3) and (out16 == 255).all()


def test_float_tiff_is_scaled_or_refused(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")
    out = load_image(tmp_path / "f.tif")  # 0..1 floats: scaled by 255, not clipped to black
    assert out.shape == (2, 2, 3) and (out == out[..., :1]).all()
    assert out[..., 0].tolist() == [[0, 64], [128, 255]]
    Image.fromarray(np.array([[0.0, 3.5]], np.float32)).save(tmp_path / "g.tif")
    with pytest.raises(DatasetError, match=r"g\.tif: float image with values 0\.\.3\.5; only 0\.\.1 is read"):
        load_image(tmp_path / "g.tif")


def test_rgb_mask_is_binarised(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    m = np.zeros((16, 20, 3), np.uint8)
    m[0, 0, 2] = 1
    _png(root / "cat/ground_truth/crack/000_mask.png", m)
    sample = Sample(root / "cat/test/crack/000.png", root / "cat/ground_truth/crack/000_mask.png", 1, "crack")
    mask = load_mask(sample, (16, 20))
    assert mask.sum() == 1 and mask[0, 0]


def test_missing_root_says_how_to_get_it_back(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere does not exist.*dvc repro -f fetch"):
        list_split(tmp_path / "nowhere", "screw", "train")
