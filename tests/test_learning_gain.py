"""Learned prompts beat the hand-written ones on defects they were not trained on (random weights).

One small case of the former `bench/learning.py` (docs/decisions.md): the tiny random-weight model, one shot
of the generated `weave` texture, OAGM's Gaussian-noise blobs, MPTS 3 x 10 steps; tested on scratches, holes
and stains, which training never saw. The bench measured gains of +0.25 to +0.35 pixel AUROC over the hand-written
ensembles on this category (3 seeds); on the held-out `grain` defects the gain varies from +0.04 to
+0.3 with the draw, too unsteady to pin (docs/decisions.md, "Learned prompts: no default change").

The bounds are not rounding bounds: 30 Adam steps compound rounding differences like a change of seed, so
another CPU's kernels give another trajectory. They hold across seeds (the bench's 3 seeds gained >= 0.25 where
0.15 is asserted) and were checked on the kernel sets of tests/fp_bounds.py (marker `numerics`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpad.config import LaaConfig, MptsConfig, OagmConfig, PromptsConfig
from mpad.data import synthetic
from mpad.evaluation import resize_mask
from mpad.features import build_encoder, encode_batched, stack_images
from mpad.metrics import auroc
from mpad.oagm import synthesize_set
from mpad.object_masks import object_masks
from mpad.prompts import meta_text_embeddings
from mpad.scoring import anomaly_maps, gaussian_blur
from mpad.training import learn_prompts

LAA = LaaConfig(attention="vv", k=2, layers=2, cls="neighbor-cls")


@pytest.mark.numerics
def test_learned_prompts_gain_on_held_out_defects(tiny_clip):
    bundle = tiny_clip
    rng = np.random.default_rng(0)
    kinds = synthetic.DEFECTS["weave"]
    rgb = lambda image: np.repeat(image[..., None], 3, axis=2)  # noqa: E731 (weave is grayscale)
    shot = rgb(synthetic.render("weave", rng).image)
    test = [synthetic.render("weave", rng, None if j < 6 else kinds[j % 3]) for j in range(15)]
    shot_t = stack_images([shot], bundle.image_size)
    masks = object_masks(shot_t, "weave", "border", texture=True)
    oagm = OagmConfig(samples=32, sigma=0.25, clean_fraction=0.2, seed=0)
    samples = [s for drawn in synthesize_set(shot_t, masks, "weave", oagm) for s in drawn]
    mpts = MptsConfig(meta_epochs=3, steps=10, lr=0.002, batch_size=16, seed=0)
    learned = learn_prompts(
        bundle,
        "weave",
        [s.image for s in samples],
        [s.mask.astype(np.float32) for s in samples],
        LAA,
        PromptsConfig(),
        mpts,
    )
    history = learned.result.history
    assert history[-1]["loss_ano"] < history[0]["loss_ano"]

    features = encode_batched(
        build_encoder(bundle, LAA), bundle, stack_images([rgb(r.image) for r in test], bundle.image_size), 16
    ).patch_features
    gt = torch.stack([resize_mask(r.mask, 96) for r in test]).flatten()
    scale = float(bundle.model.logit_scale.exp())

    def pixel_auroc(text: torch.Tensor) -> float:
        return auroc(gaussian_blur(anomaly_maps(features, text.float(), scale, (96, 96)), 1.5).flatten(), gt)

    hand = pixel_auroc(meta_text_embeddings(bundle.model, bundle.tokenizer, "weave"))
    ours = pixel_auroc(learned.result.text)
    assert ours - hand >= 0.15, (hand, ours)
    assert ours >= 0.75, (hand, ours)
