"""The visual memory branch: nearest-neighbour maps, fusion, record roundtrip, Detector integration."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from tiny_records import meta_prompts

from mpad.config import LaaConfig, ScoringConfig
from mpad.detector import Detector
from mpad.memory import VisualMemory, build_memory, fuse_maps, nearest_distance

LAA = LaaConfig(attention="vv", k=2, layers=2, cls="neighbor-cls")
LAYERS = [2, 4]
# A patch's distance to itself in the bank, (1 - q.q) / 2 for a normalised 128-vector q: fp32's dot of length 128
# is off by <= 128 u, the normalisation by ~(64 + 4) u (u = 2^-24), so the distance is <= 0.75 x 128 u; a patch
# recomputed in another batch moves by the summation order only, which changes 1 - cos to second order (< 1e-7).
# 128 u = 7.6e-6, far below an unseen image's distances (> 1e-4, asserted).
SELF_DISTANCE = 128 * 2.0**-24


def _images(seed: int, n: int = 2, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


@pytest.fixture(scope="module")
def shots() -> torch.Tensor:
    return _images(0, n=2)


@pytest.fixture(scope="module")
def memory(tiny_clip, shots) -> VisualMemory:
    return build_memory(tiny_clip, LAA, shots, LAYERS, "harmonic")


def _tokens(tiny_clip, images: torch.Tensor) -> list[torch.Tensor]:
    from mpad.features import build_encoder, encode

    encoder = build_encoder(tiny_clip, LAA, intermediate_layers=LAYERS)
    return encode(encoder, tiny_clip, images).intermediates


def test_banks_shapes(memory, tiny_clip):
    grid = tiny_clip.model.visual.grid_size
    width = tiny_clip.model.visual.conv1.out_channels
    assert memory.layers == LAYERS
    for bank in memory.banks:
        assert bank.shape == (2 * grid[0] * grid[1], width)
        assert torch.allclose(bank.norm(dim=-1), torch.ones(bank.shape[0]), atol=1e-5)


@pytest.mark.numerics
def test_zero_on_shot_positive_elsewhere(memory, tiny_clip, shots):
    on_shot = memory.memory_map(_tokens(tiny_clip, shots[1:2]))  # alone in its batch, not as when built
    assert on_shot.shape == (1, *tiny_clip.model.visual.grid_size)
    assert on_shot.abs().max() <= SELF_DISTANCE
    other = memory.memory_map(_tokens(tiny_clip, _images(5, n=1)))
    assert (other > 1e-4).all()
    assert (other <= 1).all()


def test_chunked_search_equals_cdist():
    g = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(37, 16, generator=g), dim=-1)
    bank = F.normalize(torch.randn(53, 16, generator=g), dim=-1)
    # Euclidean distance of unit vectors: d^2 = 2 - 2 cos -> cos distance (1 - cos) / 2 = d^2 / 4.
    reference = torch.cdist(queries.double(), bank.double()).amin(dim=1) ** 2 / 4
    for chunk in (7, 50, 100, 1 << 24):  # bank split in chunks, queries split, one block
        got = nearest_distance(queries, bank, chunk_elements=chunk)
        assert torch.allclose(got.double(), reference, atol=1e-6)  # fp32 dot of 16: (1 - cos) / 2 within 16 u / 2


def test_fusion_by_hand():
    a = torch.tensor([[[0.0, 0.5, 1.0, 0.2]]])
    b = torch.tensor([[[0.0, 0.5, 0.0, 0.6]]])
    assert torch.allclose(fuse_maps(a, b, "harmonic"), torch.tensor([[[0.0, 0.5, 0.0, 0.3]]]))
    assert torch.allclose(fuse_maps(a, b, "arithmetic"), torch.tensor([[[0.0, 0.5, 0.5, 0.4]]]))
    with pytest.raises(ValueError, match="fusion"):
        fuse_maps(a, b, "geometric")


def test_fuse_upsamples_memory_map(memory, tiny_clip):
    tokens = _tokens(tiny_clip, _images(7, n=2))
    text = torch.full((2, 32, 40), 0.5)
    mem = F.interpolate(memory.memory_map(tokens)[:, None], size=(32, 40), mode="bilinear", align_corners=False)[:, 0]
    arithmetic = VisualMemory(memory.banks, memory.layers, "arithmetic")
    assert torch.allclose(arithmetic.fuse(text, tokens, (32, 40)), (text + mem) / 2)
    assert torch.allclose(memory.fuse(text, tokens, (32, 40)), 2 * text * mem / (text + mem))


def test_record_roundtrip(memory, tiny_clip):
    buffer = io.BytesIO()
    torch.save({"memory": memory.to_record()}, buffer)
    buffer.seek(0)
    record = torch.load(buffer, weights_only=True)
    rebuilt = VisualMemory.from_record(record["memory"])
    assert isinstance(rebuilt, VisualMemory)
    assert rebuilt.layers == memory.layers and rebuilt.fusion == memory.fusion
    tokens = _tokens(tiny_clip, _images(3, n=2))
    assert torch.equal(rebuilt.memory_map(tokens), memory.memory_map(tokens))


@pytest.mark.numerics
def test_build_sorts_layers(tiny_clip):
    shots = _images(0, n=1)
    tokens = _tokens(tiny_clip, shots)
    reversed_memory = VisualMemory.build(tokens[::-1], LAYERS[::-1])
    assert reversed_memory.layers == LAYERS
    assert reversed_memory.memory_map(tokens).abs().max() <= SELF_DISTANCE
    with pytest.raises(ValueError, match="ascending"):
        VisualMemory([b for b in reversed_memory.banks], [4, 2])


def test_detector_with_memory_differs(memory, tiny_clip):
    record = meta_prompts(tiny_clip, "stripes", LAA)
    scoring = ScoringConfig(smoothing_sigma=1.0, image_score="max")
    images = _images(9, n=2)
    plain = Detector(tiny_clip, record, scoring)(images, (48, 48))
    fused = Detector(tiny_clip, record, scoring, memory=memory)(images, (48, 48))
    assert fused.maps.shape == plain.maps.shape == (2, 48, 48)
    assert not torch.allclose(fused.maps, plain.maps)
    assert (fused.maps >= 0).all() and (fused.maps <= 1).all()


def test_build_memory_checks_layers(tiny_clip):
    with pytest.raises(ValueError, match=r"memory.layers .*1..4"):
        build_memory(tiny_clip, LAA, _images(0, n=1), [6, 9, 12])
