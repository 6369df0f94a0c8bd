"""`mpts.stop`: every meta-epoch `steps` long (fixed), or ended once its smoothed anomaly loss stops improving."""

from __future__ import annotations

import pytest
import torch
from test_mpts import noise_blobs, striped_texture

from mpad.config import ConfigError, LaaConfig, MptsConfig
from mpad.features import build_encoder, encode, stack_images
from mpad.mpts import converged, train_prompts
from mpad.prompts import PromptLearner, TextEncoder, meta_text_embeddings

LAA = LaaConfig(attention="vv", k=2, layers=2, cls="neighbor-cls")


def test_converged_compares_the_means_of_the_last_two_windows():
    assert not converged([1.0] * 5, window=3, tolerance=0.01)  # fewer than two windows: never
    assert converged([1.0] * 6, window=3, tolerance=0.01)  # flat
    assert not converged([1.0, 1.0, 1.0, 0.9, 0.9, 0.9], window=3, tolerance=0.01)  # 10 % better
    assert converged([1.0, 1.0, 1.0, 0.995, 0.995, 0.995], window=3, tolerance=0.01)  # 0.5 % better
    assert converged([1.0, 1.0, 1.0, 1.2, 1.2, 1.2], window=3, tolerance=0.01)  # worse
    # a noisy but falling series: single steps go up, the window means fall by more than the tolerance
    assert not converged([1.0, 0.8, 0.9, 0.7, 0.8, 0.6], window=3, tolerance=0.01)
    assert converged([2.0] + [1.0] * 4, window=2, tolerance=0.0)  # only the last 2 windows count


@pytest.fixture(scope="module")
def problem(tiny_clip):
    encoder = build_encoder(tiny_clip, LAA)
    images, masks = noise_blobs(striped_texture(), 32, seed=1)
    features = encode(encoder, tiny_clip, stack_images(images, tiny_clip.image_size)).patch_features
    meta = meta_text_embeddings(tiny_clip.model, tiny_clip.tokenizer, "carpet")
    return features, torch.from_numpy(masks), meta


def _train(tiny_clip, problem, **settings):
    features, masks, meta = problem
    learner = PromptLearner(
        tiny_clip.model, tiny_clip.tokenizer, "carpet", 4, 2, 2, generator=torch.Generator().manual_seed(0)
    )
    config = MptsConfig(meta_epochs=2, steps=60, batch_size=16, seed=0, **settings)
    scale = float(tiny_clip.model.logit_scale.exp())
    return train_prompts(learner, TextEncoder(tiny_clip.model), features, masks, meta, scale, config)


def test_converged_rounds_end_early_and_repeat_the_fixed_run_until_then(tiny_clip, problem):
    fixed = _train(tiny_clip, problem)
    early = _train(tiny_clip, problem, stop="converged", tolerance=0.05, window=5)
    assert fixed.round_steps == [60, 60]
    assert len(early.history) == sum(early.round_steps) and all(10 <= n < 60 for n in early.round_steps)
    first = early.round_steps[0]
    assert early.history[:first] == fixed.history[:first]  # same steps until it stopped
    losses = [row["loss_ano"] for row in early.history[:first]]
    assert converged(losses, 5, 0.05) and not converged(losses[:-1], 5, 0.05)  # it stopped at the first chance
    assert len(early.round_texts) == 2 and early.text is not None


def test_stop_params_are_checked():
    with pytest.raises(ConfigError, match=r"mpts.stop = 'early': must be one of fixed, converged"):
        MptsConfig.from_params({"stop": "early"})
    with pytest.raises(ConfigError, match=r"mpts.tolerance = -0.1: must be a number in \[0, 1\]"):
        MptsConfig.from_params({"tolerance": -0.1})
    with pytest.raises(ConfigError, match=r"mpts.window = 0: must be an integer >= 1"):
        MptsConfig.from_params({"window": 0})
    with pytest.raises(ValueError, match="stop\n  Input should be .fixed. or .converged."):
        MptsConfig(stop="sometimes")
    assert MptsConfig.from_params({"stop": "converged", "tolerance": 0, "window": 3}).window == 3
