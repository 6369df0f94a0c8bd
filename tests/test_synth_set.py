"""mpad.synth_set: the synthesized set round-trips exactly and every broken part is named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mpad.oagm import SynthesizedSample
from mpad.object_masks import ObjectMask
from mpad.synth_set import SynthSetError, read_synth_set, write_synth_set


def _set(tmp_path, category="disc", shots=2, per_shot=3, size=(12, 16)):
    rng = np.random.default_rng(0)
    drawn = [
        [
            SynthesizedSample(rng.integers(0, 256, (*size, 3), dtype=np.uint8), rng.random(size) < 0.3)
            for _ in range(per_shot)
        ]
        for _ in range(shots)
    ]
    objects = [ObjectMask(np.ones(size, bool)), ObjectMask(np.ones(size, bool), fallback="empty mask")][:shots]
    folder = tmp_path / category
    manifest = write_synth_set(
        folder, category, size, [f"s{i}.png" for i in range(shots)], objects, iter(drawn), {"texture": False}
    )
    return folder, drawn, manifest


def test_roundtrip_is_exact(tmp_path):
    folder, drawn, manifest = _set(tmp_path)
    images, masks, read = read_synth_set(folder)
    flat = [s for shot in drawn for s in shot]
    assert len(images) == len(masks) == 6
    for sample, image, mask in zip(flat, images, masks, strict=True):
        np.testing.assert_array_equal(image, sample.image)
        np.testing.assert_array_equal(mask, sample.mask.astype(np.float32))
    assert read == manifest == json.loads((folder / "manifest.json").read_text())
    assert manifest["image_size"] == [12, 16] and manifest["texture"] is False
    assert [s["shot"] for s in manifest["samples"]] == ["s0.png"] * 3 + ["s1.png"] * 3
    assert manifest["samples"][4]["anomalous_fraction"] == pytest.approx(flat[4].mask.mean())
    assert [o["fallback"] for o in manifest["object_masks"]] == [None, "empty mask"]


def test_failed_write_keeps_previous_set(tmp_path):
    folder, _, _ = _set(tmp_path)
    before = (folder / "manifest.json").read_bytes()

    def broken():
        yield []
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_synth_set(folder, "disc", (12, 16), ["a", "b"], [ObjectMask(np.ones((12, 16), bool))] * 2, broken())
    assert (folder / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disc"]  # no temporary left


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: (f / "manifest.json").unlink(), "manifest.json: manifest not found"),
        (lambda f: (f / "manifest.json").write_text("{"), "manifest.json: not a valid synthesis manifest"),
        (lambda f: (f / "masks" / "0002.png").unlink(), "masks/0002.png: file listed in the manifest is missing"),
        (lambda f: (f / "images" / "0001.png").write_bytes(b"x"), "images/0001.png: not a readable image"),
        (
            lambda f: Image.fromarray(np.zeros((8, 8), np.uint8)).save(f / "masks" / "0000.png"),
            "masks/0000.png: mask is 8x8, the manifest says 16x12",
        ),
    ],
)
def test_broken_set_is_named(tmp_path, breakage, message):
    folder, _, _ = _set(tmp_path)
    breakage(folder)
    with pytest.raises(SynthSetError, match=message):
        read_synth_set(folder)


def test_set_of_another_category_is_refused(tmp_path):
    folder, _, _ = _set(tmp_path)
    folder.rename(tmp_path / "grid")
    with pytest.raises(SynthSetError, match="made for category 'disc', not 'grid'"):
        read_synth_set(tmp_path / "grid")
