from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mpad.scoring import anomaly_maps, gaussian_blur, image_scores, patch_probabilities


def test_pair_softmax_values():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feats = F.normalize(torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]]), dim=-1)  # (1, 1, 2, 2)
    probs = patch_probabilities(feats, text, 10.0)
    assert probs.shape == (1, 2, 1, 2)
    expected = torch.sigmoid(torch.tensor(10.0))
    torch.testing.assert_close(probs[0, 0, 0, 0], expected)  # normal-like patch: normal prob
    torch.testing.assert_close(probs[0, 1, 0, 1], expected)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1, 1, 2))


def test_maps_upsample_and_smooth():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    feats = torch.zeros(1, 4, 4, 2)
    feats[..., 0] = 1
    feats[0, 1, 2] = torch.tensor([0.0, 1.0])
    raw = anomaly_maps(feats, text, 20.0, (32, 32))
    smooth = gaussian_blur(raw, 2)
    assert raw.shape == (1, 32, 32)
    peak = divmod(int(raw[0].argmax()), 32)
    assert 8 <= peak[0] < 16 and 16 <= peak[1] < 24  # patch (1, 2) of a 4x4 grid
    assert smooth.max() < raw.max()
    # Reflect padding keeps the mass only up to what it folds back at a border (the peak's bilinear ramp reaches 4 px
    # from the top, 2 sigma): 6.6e-5 of 0.0625 here, exactly computable and the same on any CPU; fp32 adds ~1e-8.
    # The 2e-3 is a property's tolerance, 30x that: a blur that loses or doubles its border mass moves it by more.
    torch.testing.assert_close(smooth.mean(), raw.mean(), atol=2e-3, rtol=0)


def test_gaussian_blur_of_constant_is_constant():
    maps = torch.full((2, 20, 30), 0.25)
    torch.testing.assert_close(gaussian_blur(maps, 3.0), maps)


def test_image_scores():
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, 0] = 1.0
    maps[1, :2, :] = 0.5
    assert image_scores(maps, "max").tolist() == [1.0, 0.5]
    torch.testing.assert_close(image_scores(maps, "topk_mean", topk=0.1), torch.tensor([0.1, 0.5]))
    text = torch.eye(2)
    glob = image_scores(
        maps, "global", image_embedding=torch.tensor([[0.0, 3.0], [3.0, 0.0]]), text=text, logit_scale=5.0
    )
    assert glob[0] > 0.99 and glob[1] < 0.01
    with pytest.raises(ValueError, match="image_score"):
        image_scores(maps, "median")


def test_detector_builds_the_global_embedding_only_for_the_global_score(tiny_clip):
    """The encoder skips the global embedding (and the last block's original path) unless the image score is
    `global`; with it, the score is the global embedding's anomaly probability (that this embedding is
    encode_image's: tests/test_laa.py), computed alike, so equal to the bit."""
    from tiny_records import tiny_record

    from mpad.config import ScoringConfig
    from mpad.detector import Detector
    from mpad.features import build_encoder, encode

    record = tiny_record(tiny_clip, memory=False)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    found = {}
    for method in ("max", "global"):
        detector = Detector(tiny_clip, record, ScoringConfig(smoothing_sigma=0.0, image_score=method))
        assert detector.encoder.image_embedding == (method == "global")
        found[method] = detector(images, (32, 32))
    embedding = encode(build_encoder(tiny_clip, record.laa, image_embedding=True), tiny_clip, images).image_embedding
    logit_scale = float(tiny_clip.model.logit_scale.exp())
    expected = image_scores(
        found["global"].maps, "global", image_embedding=embedding, text=record.text.float(), logit_scale=logit_scale
    )
    assert torch.equal(found["global"].scores, expected)
    assert not torch.allclose(found["global"].scores, found["max"].scores)
