"""OAGM (paper sec. 3.4): noise only where the mask says, object masks, blobs, clean samples."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mpad.config import OagmConfig
from mpad.data.shots import stable_hash
from mpad.oagm import add_noise, random_blobs, synthesize, synthesize_set
from mpad.object_masks import (
    ObjectMask,
    border_object_probability,
    clean_mask,
    clip_object_probability,
    object_masks,
)


def _image(h: int = 48, w: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def _disc_scene(h: int = 64, w: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """A red disc on a plain light, slightly noisy background: (1, 3, H, W) image and the disc mask."""
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - 30) ** 2 + (xx - 36) ** 2 <= 16**2
    rng = np.random.default_rng(0)
    pixels = np.where(disc[..., None], [200.0, 60.0, 40.0], [205.0, 205.0, 198.0]) + rng.normal(0, 2, (h, w, 3))
    image = torch.from_numpy(np.clip(pixels, 0, 255) / 255.0).permute(2, 0, 1).float()[None]
    return image, disc


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_add_noise_outside_mask_bit_identical_inside_changed():
    image = _image()
    mask = torch.zeros(48, 40, dtype=torch.bool)
    mask[10:30, 5:25] = True
    out = add_noise(image, mask, 0.3, _gen())
    assert out.shape == image.shape
    assert torch.equal(out[:, ~mask], image[:, ~mask])
    changed = (out != image).any(dim=0)
    assert changed[mask].float().mean() > 0.95
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(image, out)  # input untouched, a new tensor returned
    assert torch.equal(image, _image())


def test_add_noise_sigma_zero_and_determinism():
    image = _image()
    mask = torch.ones(48, 40, dtype=torch.bool)
    assert torch.equal(add_noise(image, mask, 0.0, _gen()), image)
    a = add_noise(image, mask, 0.2, _gen(5))
    b = add_noise(image, mask, 0.2, _gen(5))
    c = add_noise(image, mask, 0.2, _gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_add_noise_noise_scale():
    image = torch.full((3, 64, 64), 0.5)
    mask = torch.ones(64, 64, dtype=torch.bool)
    out = add_noise(image, mask, 0.1, _gen())
    assert abs(float((out - image).std()) - 0.1) < 0.01  # sample std of 12288 draws: sd 0.1 / sqrt(2n) = 6e-4


def test_add_noise_rejects_bad_shapes():
    with pytest.raises(ValueError):
        add_noise(_image(), torch.ones(10, 10, dtype=torch.bool), 0.1, _gen())


def test_blobs_inside_object_and_partial():
    _, disc = _disc_scene()
    rng = np.random.default_rng(0)
    for _ in range(20):
        blobs = random_blobs(disc, rng)
        assert not (blobs & ~disc).any()
        coverage = blobs.sum() / disc.sum()
        assert 0 < coverage < 1


def test_synthesize_blobs_stay_on_object_when_enabled():
    image, disc = _disc_scene()
    out = synthesize(image[0], disc, 12, 0.3, np.random.default_rng(1), _gen(1), region="blobs", enabled=True)
    assert len(out) == 12
    for sample in out:
        assert sample.image.dtype == np.uint8 and sample.image.shape == (64, 64, 3)
        assert sample.mask.any() and not (sample.mask & ~disc).any()
        # outside M'_a the image is the (quantised) shot
        clean = np.rint(image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        assert np.array_equal(sample.image[~sample.mask], clean[~sample.mask])


def test_synthesize_disabled_puts_noise_outside_object():
    image, disc = _disc_scene()
    for region in ("blobs", "object"):
        out = synthesize(image[0], disc, 16, 0.3, np.random.default_rng(2), _gen(2), region=region, enabled=False)
        outside = sum(int((s.mask & ~disc).sum()) for s in out)
        assert outside > 0, region
    whole = synthesize(image[0], disc, 1, 0.3, np.random.default_rng(2), _gen(2), region="object", enabled=False)
    assert whole[0].mask.all()


def test_synthesize_object_region_is_the_object():
    image, disc = _disc_scene()
    out = synthesize(image[0], disc, 3, 0.3, np.random.default_rng(3), _gen(3), region="object")
    for sample in out:
        assert np.array_equal(sample.mask, disc)
        assert sample.anomalous_fraction == pytest.approx(disc.mean())


@pytest.mark.parametrize(("fraction", "samples", "expected"), [(0.0, 10, 0), (0.2, 10, 2), (0.25, 8, 2), (1.0, 5, 5)])
def test_clean_fraction(fraction, samples, expected):
    image, disc = _disc_scene()
    out = synthesize(image[0], disc, samples, 0.3, np.random.default_rng(4), _gen(4), clean_fraction=fraction)
    clean = [s for s in out if not s.mask.any()]
    assert len(clean) == expected
    original = np.rint(image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    for sample in clean:
        assert np.array_equal(sample.image, original)


def test_synthesize_deterministic():
    image, disc = _disc_scene()

    def run():
        return synthesize(image[0], disc, 6, 0.3, np.random.default_rng(9), _gen(9), clean_fraction=0.3)

    a, b = run(), run()
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)


def test_synthesize_rejects_bad_settings():
    image, disc = _disc_scene()
    with pytest.raises(ValueError):
        synthesize(image[0], disc, 2, 0.3, np.random.default_rng(0), _gen(), region="everywhere")
    with pytest.raises(ValueError):
        synthesize(image[0], disc, 2, 0.3, np.random.default_rng(0), _gen(), clean_fraction=1.5)


def test_border_method_finds_disc():
    image, disc = _disc_scene()
    prob = border_object_probability(image)
    assert prob.shape == (1, 64, 64)
    mask = object_masks(image, "disc", "border", 0.5)[0]
    assert mask.fallback is None
    iou = (mask.mask & disc).sum() / (mask.mask | disc).sum()
    assert iou > 0.9


def test_texture_gets_whole_image(tiny_clip):
    image, _ = _disc_scene()
    for method in ("border", "clip"):
        masks = object_masks(image, "stripes", method, 0.5, texture=True, bundle=tiny_clip)
        assert masks[0].mask.all() and masks[0].fallback is None


def test_empty_mask_falls_back_and_says_why_without_warning():
    flat = torch.full((1, 3, 32, 32), 0.5)  # nothing differs from the border: empty mask
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reason is returned, not printed: reporting is the stage's
        masks = object_masks(flat, "disc", "border", 0.5)
    assert masks[0].mask.all()
    assert masks[0].fallback == (
        "disc image 0: the border object mask is empty (0.0% of the pixels); "
        "using the whole image as the object instead"
    )


def test_clip_method_shapes(tiny_clip):
    image, _ = _disc_scene()
    prob = clip_object_probability(tiny_clip, image, "disc", layers=6)  # capped at the tiny model's depth
    assert prob.shape == (1, 64, 64)
    assert float(prob.min()) >= 0 and float(prob.max()) <= 1
    masks = object_masks(image, "disc", "clip", 0.5, bundle=tiny_clip)
    assert masks[0].mask.shape == (64, 64) and masks[0].mask.dtype == bool


def test_clean_mask_removes_specks_and_fills_holes():
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:40, 10:40] = True
    mask[20, 20] = False
    mask[60, 60] = True
    cleaned = clean_mask(mask)
    assert cleaned[20, 20] and not cleaned[60, 60]
    assert cleaned[10:40, 10:40].all()


def test_synthesize_set_is_seeded_by_config_and_category():
    image, disc = _disc_scene()
    images = torch.cat([image, image.flip(-1)])
    masks = [ObjectMask(disc), ObjectMask(np.fliplr(disc).copy())]
    oagm = OagmConfig(samples=3, sigma=0.3, clean_fraction=1 / 3, seed=5)
    got = list(synthesize_set(images, masks, "disc", oagm))
    # the draws: one numpy rng from (seed, category) for every shot, the noise generator seeded from it
    rng = np.random.default_rng([5, stable_hash("disc")])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    want = [synthesize(im, m.mask, 3, 0.3, rng, gen, clean_fraction=1 / 3) for im, m in zip(images, masks, strict=True)]
    assert [len(shot) for shot in got] == [3, 3]
    for got_shot, want_shot, obj in zip(got, want, masks, strict=True):
        assert sum(not s.mask.any() for s in got_shot) == 1  # round(1/3 * 3) clean sample per shot
        for a, b in zip(got_shot, want_shot, strict=True):
            assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
            assert not (a.mask & ~obj.mask).any()
    other = list(synthesize_set(images, masks, "ring", oagm))
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(other[0], got[0], strict=True))


def _set_of(images, masks, category, oagm):
    return [(s.image, s.mask) for shot in synthesize_set(images, masks, category, oagm) for s in shot]


def _same_sets(a, b) -> bool:
    return all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


def _stripes_shot(size: int = 64) -> torch.Tensor:
    from mpad.data import synthetic

    image = synthetic.render("stripes", np.random.default_rng(0)).image
    t = torch.from_numpy(image / 255.0).permute(2, 0, 1).float()[None]
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)


def test_table3_texture_with_and_without_oagm_differ_under_mask_method(tiny_clip):
    """Table 3 on textures (README): with the texture's own M_obj, "with" and "without OAGM" sets differ;
    texture_mask = whole gives identical sets, bit-for-bit today's (whole-image M_obj) behaviour."""
    from mpad.object_masks import shot_object_masks

    images = _stripes_shot()
    base = dict(samples=6, sigma=0.25, clean_fraction=0.0, mask_method="clip", mask_layers=2, seed=0)
    sets = {}
    for texture_mask in ("mask_method", "whole"):
        for enabled in (True, False):
            oagm = OagmConfig(enabled=enabled, texture_mask=texture_mask, **base)
            masks = shot_object_masks(images, "stripes", oagm, texture=True, bundle=tiny_clip)
            if texture_mask == "mask_method":
                assert masks[0].fallback is None and 0.01 < masks[0].fraction < 0.97
            sets[texture_mask, enabled] = _set_of(images, masks, "stripes", oagm)
    assert not _same_sets(sets["mask_method", True], sets["mask_method", False])
    assert _same_sets(sets["whole", True], sets["whole", False])
    # the former behaviour: object_masks(texture=True), the whole image
    before = object_masks(images, "stripes", "clip", 0.5, texture=True, bundle=tiny_clip)
    assert before[0].mask.all()
    assert _same_sets(sets["whole", True], _set_of(images, before, "stripes", OagmConfig(enabled=True, **base)))


def test_table3_object_with_and_without_oagm_differ():
    from mpad.object_masks import shot_object_masks

    image, _ = _disc_scene()
    for texture_mask in ("mask_method", "whole"):  # no effect on objects
        got = []
        for enabled in (True, False):
            oagm = OagmConfig(
                enabled=enabled, texture_mask=texture_mask, samples=6, clean_fraction=0.0, mask_method="border"
            )
            masks = shot_object_masks(image, "disc", oagm, texture=False)
            got.append(_set_of(image, masks, "disc", oagm))
        assert not _same_sets(*got)


def test_texture_mask_validated():
    with pytest.raises(ValueError, match="texture_mask"):
        OagmConfig.from_params({"texture_mask": "all"})
