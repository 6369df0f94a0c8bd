"""mpad.training and mpad.features.encode_batched on the tiny random-weight model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from fp_bounds import IMAGE_TERMS, assert_reordered_close

from mpad.config import LaaConfig, MptsConfig, PromptsConfig
from mpad.features import build_encoder, encode, encode_batched
from mpad.io import sha256_file
from mpad.log_maps import score_maps
from mpad.mpts import anomaly_loss
from mpad.prompt_file import PromptsFile
from mpad.prompts import meta_text_embeddings
from mpad.training import learn_prompts, learned_file, synth_features

LAA = LaaConfig(attention="vv", k=2, layers=2, cls="neighbor-cls")
PROMPTS = PromptsConfig(n_general=2, n_normal=1, n_anomaly=1)


def _set(n: int = 5, size: int = 64):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    masks = [(rng.random((size, size)) < 0.2).astype(np.float32) for _ in range(n)]
    return images, masks


@pytest.mark.numerics
def test_encode_batched_equals_one_pass(tiny_clip):
    """Batches of 2 and one of 5 may take other kernels: equal up to a summation order (tests/fp_bounds.py)."""
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    encoder = build_encoder(tiny_clip, LAA, intermediate_layers=[1, 3], image_embedding=True)
    whole = encode(encoder, tiny_clip, images)
    batched = encode_batched(encoder, tiny_clip, images, batch_size=2)
    assert_reordered_close(batched.patch_features, whole.patch_features, IMAGE_TERMS)
    assert_reordered_close(batched.image_embedding, whole.image_embedding, IMAGE_TERMS)
    assert len(batched.intermediates) == 2
    for got, want in zip(batched.intermediates, whole.intermediates, strict=True):
        assert_reordered_close(got, want, IMAGE_TERMS)


def test_prompts_file_roundtrip_and_identity(tiny_clip, tmp_path):
    """What is saved loads back equal (LAA settings included); the identity is the SHA-256 of the bytes, the
    same for the same content saved twice, another for other content."""
    learned = learn_prompts(tiny_clip, "disc", *_set(), LAA, PROMPTS, MptsConfig(meta_epochs=1, steps=1, batch_size=2))
    prompts = learned_file(tiny_clip, "disc", learned, LAA, PROMPTS, MptsConfig(meta_epochs=1, steps=1))
    saved = prompts.save(tmp_path / "a.pt")
    again = prompts.save(tmp_path / "b.pt")
    loaded = PromptsFile.load(tmp_path / "a.pt")
    assert loaded.laa == LAA and loaded.sizes == (2, 1, 1) and loaded.train == prompts.train
    assert torch.equal(loaded.text, prompts.text) and torch.equal(loaded.vectors["normal"], prompts.vectors["normal"])
    assert saved.sha256 == again.sha256 == loaded.sha256 == sha256_file(tmp_path / "a.pt")
    other = dataclasses.replace(prompts, laa=LAA.model_copy(update={"layers": 3})).save(tmp_path / "c.pt")
    assert other.sha256 != saved.sha256


def test_no_meta_epochs_is_the_hand_written_baseline(tiny_clip):
    images, masks = _set()
    rows = []
    learned = learn_prompts(
        tiny_clip, "disc", images, masks, LAA, PROMPTS, MptsConfig(meta_epochs=0), on_step=rows.append
    )
    meta = meta_text_embeddings(tiny_clip.model, tiny_clip.tokenizer, "disc")
    torch.testing.assert_close(learned.result.text, meta)  # the same computation on the same inputs: equal
    features = synth_features(tiny_clip, LAA, images)  # as learn_prompts computes them: its loss to fp32 rounding
    masks_t = torch.from_numpy(np.stack(masks))
    loss = float(anomaly_loss(score_maps(features, meta, float(tiny_clip.model.logit_scale.exp()), (64, 64)), masks_t))
    assert (
        rows
        == learned.result.history
        == [{"step": 0, "meta_epoch": 0, "loss_ano": pytest.approx(loss), "loss_div": 0.0, "cos": 0.0, "calibrated": 0}]
    )
    assert learned.calibrated_fraction == 0.0 and learned.images == 5


def test_learning_and_record(tiny_clip):
    images, masks = _set()
    mpts = MptsConfig(meta_epochs=2, steps=3, batch_size=2, lr=0.01, lam=1)
    rows = []
    learned = learn_prompts(tiny_clip, "disc", images, masks, LAA, PROMPTS, mpts, on_step=rows.append)
    assert [r["step"] for r in rows] == list(range(6)) and [r["meta_epoch"] for r in rows] == [0] * 3 + [1] * 3
    assert learned.calibrated_fraction == sum(r["calibrated"] for r in rows) / 6
    prompts = learned_file(tiny_clip, "disc", learned, LAA, PROMPTS, mpts, memory={"layers": [2]})
    record = prompts.as_stored()
    assert list(record) == ["format", "category", "model", "sizes", "vectors", "text", "laa", "memory", "train"]
    assert record["sizes"] == [2, 1, 1] and record["laa"] == {
        "attention": "vv",
        "k": 2,
        "layers": 2,
        "cls": "neighbor-cls",
    }
    assert prompts.laa == LAA and prompts.memory == {"layers": [2]}
    assert record["train"] == {
        "final_loss": rows[-1]["loss_ano"],
        "steps": 6,
        "meta_epochs": 2,
        "lambda": 1.0,
        "calibration": "projection",
        "calibrated_fraction": learned.calibrated_fraction,
        "images": 5,
        "random_weights": True,
    }
    assert isinstance(record["train"]["lambda"], float)  # as the stage always stored it
    assert torch.equal(record["vectors"]["anomaly"], learned.learner.anomaly.detach())
    assert record["vectors"]["general"].shape == (2, 128)
