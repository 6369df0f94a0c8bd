from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fp_bounds import IMAGE_TERMS, assert_reordered_close

from mpad import laa
from mpad.laa import LocalityAwareEncoder, locality_mask, token_mask


@pytest.mark.parametrize(("h", "w", "k"), [(3, 3, 1), (4, 5, 1.5), (5, 4, 2), (6, 6, 0.5), (2, 7, 10)])
def test_locality_mask_is_eq12(h, w, k):
    mask = locality_mask(h, w, k)
    assert mask.shape == (h * w, h * w)
    for i in range(h):
        for j in range(w):
            for m in range(h):
                for n in range(w):
                    near = math.sqrt((i - m) ** 2 + (j - n) ** 2) <= k
                    assert mask[i * w + j, m * w + n] == (0.0 if near else -math.inf)


def test_locality_mask_counts_neighbours():
    mask = locality_mask(5, 5, 1)
    # the centre patch sees itself and its 4 direct neighbours; a corner patch 3
    assert (mask[12] == 0).sum() == 5
    assert (mask[0] == 0).sum() == 3
    assert (locality_mask(5, 5, math.sqrt(2))[12] == 0).sum() == 9


def test_token_mask_cls_modes():
    with_cls = token_mask(3, 3, 1, "neighbor-cls")
    only = token_mask(3, 3, 1, "neighbor")
    assert with_cls.shape == (10, 10)
    assert torch.all(with_cls[1:, 0] == 0) and torch.all(only[1:, 0] == -math.inf)
    assert torch.all(with_cls[0] == 0)
    assert torch.equal(with_cls[1:, 1:], locality_mask(3, 3, 1))
    assert token_mask(3, 3, None) is None and token_mask(3, 3, 0) is None


VARIANTS = [
    ("vv", None, "neighbor-cls"),  # VV-att
    ("qk", 1.5, "neighbor-cls"),  # QK-LAA
    ("vv", 1.0, "neighbor-cls"),  # VV-LAA
    ("vv", 2, "neighbor"),
]


@pytest.mark.numerics
@pytest.mark.parametrize(("attention", "k", "cls"), VARIANTS)
@pytest.mark.parametrize("layers", [1, 3])
def test_global_embedding_is_encode_image(tiny_clip, attention, k, cls, layers):
    """The original path is encode_image's blocks called alike: equal up to a summation order at most
    (tests/fp_bounds.py); the patch features are unit vectors (norm 1 within ~(64 + 4) 2^-24 = 4e-6)."""
    encoder = LocalityAwareEncoder(tiny_clip.model.visual, layers, attention, k, cls)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = encoder(images)
        expected = tiny_clip.model.encode_image(images)
    assert_reordered_close(out.image_embedding, expected, IMAGE_TERMS)
    assert out.patch_features.shape == (3, 8, 8, 64)
    torch.testing.assert_close(out.patch_features.norm(dim=-1), torch.ones(3, 8, 8))


def _reference_dense(tiny_clip, images, attention, mask):
    """The second path over the last block only, written out from the formula (per head, explicit softmax)."""
    visual = tiny_clip.model.visual
    x = visual._embeds(images)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    block = visual.transformer.resblocks[-1]
    y = block.ln_1(x)
    attn = block.attn
    heads, width = attn.num_heads, y.shape[-1]
    d = width // heads
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).split(width, dim=-1)
    outs = []
    for head in range(heads):
        sl = slice(head * d, (head + 1) * d)
        qh, kh, vh = (v[..., sl], v[..., sl], v[..., sl]) if attention == "vv" else (q[..., sl], k[..., sl], v[..., sl])
        logits = (qh @ kh.transpose(1, 2) + (0 if mask is None else mask)) / math.sqrt(d)
        outs.append(torch.softmax(logits, dim=-1) @ vh)
    dense = x + attn.out_proj(torch.cat(outs, dim=-1))
    patches = visual.ln_post(dense[:, 1:]) @ visual.proj
    return F.normalize(patches, dim=-1).reshape(images.shape[0], 8, 8, -1)


@pytest.mark.numerics
@pytest.mark.parametrize(("attention", "k", "cls"), VARIANTS)
def test_second_path_matches_its_formula(tiny_clip, attention, k, cls):
    """Scaled-dot-product attention against per-head matmuls and softmax: the same formula in another summation
    order, through the whole image tower at most (tests/fp_bounds.py, relative to unit vectors: 2.6e-4)."""
    encoder = LocalityAwareEncoder(tiny_clip.model.visual, 1, attention, k, cls)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = encoder(images).patch_features
        expected = _reference_dense(tiny_clip, images, attention, token_mask(8, 8, k, cls))
    assert_reordered_close(got, expected, IMAGE_TERMS)


@pytest.mark.numerics
@pytest.mark.parametrize("attention", ["vv", "qk"])
def test_shared_projection_equals_the_blocks_own(tiny_clip, monkeypatch, attention):
    """open_clip's plain blocks get one in-projection for both paths (`_both_paths`); other blocks are called as
    they are, with the second path's projection apart. The two give the same outputs within the image tower's
    summation-order bound (tests/fp_bounds.py); a second path started from the wrong stream is off by O(1)."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    build = lambda: LocalityAwareEncoder(tiny_clip.model.visual, 2, attention, 1, intermediate_layers=(3, 4))  # noqa: E731
    encoder = build()
    monkeypatch.setattr(laa, "plain_blocks", lambda transformer: False)
    plain = build()
    assert encoder.shared_projection and not plain.shared_projection
    with torch.no_grad():
        shared, apart = encoder(images), plain(images)
    assert_reordered_close(shared.patch_features, apart.patch_features, IMAGE_TERMS)
    assert_reordered_close(shared.image_embedding, apart.image_embedding, IMAGE_TERMS)
    for got, expected in zip(shared.intermediates, apart.intermediates, strict=True):
        assert_reordered_close(got, expected, IMAGE_TERMS)


@pytest.mark.numerics
@pytest.mark.parametrize("attention", ["vv", "qk"])
@pytest.mark.parametrize("shared", [True, False])
def test_without_the_global_embedding_the_last_block_runs_the_second_path_only(
    tiny_clip, monkeypatch, attention, shared
):
    """image_embedding=False: the last block's original attention and MLP are not run (its MLP is never called),
    the embedding is None, and the patch features equal the full encoder's within the image tower's
    summation-order bound (tests/fp_bounds.py). Asking for the last block's tokens runs it again. A skipped
    second-path update in the last block would be off by O(1)."""
    if not shared:
        monkeypatch.setattr(laa, "plain_blocks", lambda transformer: False)
    visual = tiny_clip.model.visual
    depth = len(visual.transformer.resblocks)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    encoders = {
        "full": LocalityAwareEncoder(visual, 2, attention, 1),
        "lean": LocalityAwareEncoder(visual, 2, attention, 1, image_embedding=False),
        "last tokens": LocalityAwareEncoder(
            visual, 2, attention, 1, intermediate_layers=(depth,), image_embedding=False
        ),
    }
    calls: list[str] = []
    hook = visual.transformer.resblocks[-1].mlp.register_forward_hook(lambda *_: calls.append(current))
    outs = {}
    try:
        with torch.no_grad():
            for current, encoder in encoders.items():
                assert encoder.shared_projection == shared
                outs[current] = encoder(images)
    finally:
        hook.remove()
    assert calls == ["full", "last tokens"]
    assert outs["lean"].image_embedding is None and outs["last tokens"].image_embedding is None
    assert outs["full"].image_embedding is not None
    for name in ("lean", "last tokens"):
        assert_reordered_close(outs[name].patch_features, outs["full"].patch_features, IMAGE_TERMS)
    assert len(outs["last tokens"].intermediates) == 1


@pytest.mark.numerics
def test_variants_differ_and_mask_matters(tiny_clip):
    """Variants differ by > 1e-3 (unit vectors; rounding moves them by < 2.6e-4, tests/fp_bounds.py); a mask
    that covers the whole grid is no mask: attention with an all-zero mask may take another kernel than without."""
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        vv = LocalityAwareEncoder(tiny_clip.model.visual, 2, "vv", None)(images).patch_features
        vv_laa = LocalityAwareEncoder(tiny_clip.model.visual, 2, "vv", 1)(images).patch_features
        qk_laa = LocalityAwareEncoder(tiny_clip.model.visual, 2, "qk", 1)(images).patch_features
        far = LocalityAwareEncoder(tiny_clip.model.visual, 2, "vv", 100)(images).patch_features
    assert (vv - vv_laa).abs().max() > 1e-3 and (vv_laa - qk_laa).abs().max() > 1e-3
    assert_reordered_close(far, vv, IMAGE_TERMS)


@pytest.mark.numerics
def test_intermediates_and_bad_arguments(tiny_clip):
    visual = tiny_clip.model.visual
    encoder = LocalityAwareEncoder(visual, 2, intermediate_layers=(2, 4))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = encoder(images)
        x = visual._embeds(images)
        for block in visual.transformer.resblocks[:2]:
            x = block(x)
    assert [t.shape for t in out.intermediates] == [(1, 8, 8, 128)] * 2
    assert_reordered_close(out.intermediates[0], x[:, 1:].reshape(1, 8, 8, 128), IMAGE_TERMS)  # the same blocks
    with pytest.raises(ValueError, match="laa.layers"):
        LocalityAwareEncoder(visual, 5)
    with pytest.raises(ValueError, match="laa.attention"):
        LocalityAwareEncoder(visual, 1, "kv")


# ViT-B-16-plus-240's image tower, 226 tokens: patch embedding 768, 12 blocks x (qkv 896 + scores 64 + attention
# x V 226 + out_proj 896 + c_fc 896 + c_proj 3584 = 6562), projection 896: 80408 reduction terms (bound 9.6e-3).
PAPER_IMAGE_TERMS = 80408


def test_paper_backbone_global_embedding_and_grid():  # not `numerics`: both sides run the same kernels
    """The default architecture (random weights): 15x15 grid at 240 px, original path still exact (up to a
    summation order, tests/fp_bounds.py)."""
    from mpad.clip import load_clip

    bundle = load_clip("ViT-B-16-plus-240", "none")
    encoder = LocalityAwareEncoder(bundle.model.visual, 6, "vv", 2)
    images = torch.randn(1, 3, 240, 240, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = encoder(images)
        expected = bundle.model.encode_image(images)
    assert out.patch_features.shape == (1, 15, 15, 640)
    assert_reordered_close(out.image_embedding, expected, PAPER_IMAGE_TERMS)
