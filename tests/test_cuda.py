"""CUDA: the GPU gives the CPU's numbers (within float tolerances), and half precision stays close to fp32.

Marked `cuda`: skipped where torch.cuda.is_available() is False (tests/conftest.py), e.g. in CI. Setting
MPAD_CUDA_TEST_DEVICE=cpu runs them on the CPU instead (comparing the CPU with itself and bf16 with fp32),
which checks the tests themselves on a machine without a GPU. `bench/gpu_check.sh` runs them on a GPU.
TF32 is switched off here, so that fp32 means fp32 on both sides; the pipeline itself runs with torch's
defaults (TF32 convolutions), which bench/offline_compare.py covers.

Their tolerances (1e-4 on unit vectors, cosines 0.999 / 0.99 for fp16 / bf16, 1e-3 after 20 Adam steps) predate
tests/fp_bounds.py and were not re-derived here (no GPU): by its reasoning fp32 CPU vs GPU is bounded by 2.6e-4,
and one bf16 pass by cosine 0.970 (tests/test_precision.py).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mpad.clip import load_clip
from mpad.config import LaaConfig, MptsConfig
from mpad.features import build_encoder, encode, stack_images
from mpad.mpts import train_prompts
from mpad.prompts import PromptLearner, TextEncoder, meta_text_embeddings

DEVICE = os.environ.get("MPAD_CUDA_TEST_DEVICE", "cuda")
HALF = "fp16" if DEVICE.startswith("cuda") else "bf16"  # CPUs run bf16, not fp16, at speed
LAA = LaaConfig(attention="vv", k=2, layers=2, cls="neighbor-cls")

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", autouse=True)
def exact_fp32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def device_clip():
    return load_clip("mpad-tiny", "none", device=DEVICE)


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    """Stripes with noise, (n, 3, 64, 64) in [0, 1]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    base = 0.5 + 0.3 * np.sin(2 * np.pi * (x + 0.5 * y) / 9.0)
    out = [np.clip(base[..., None] + rng.normal(0, 0.1, (64, 64, 3)), 0, 1) for _ in range(n)]
    return stack_images([(img * 255).astype(np.uint8) for img in out], (64, 64))


def patch_features(clip, pixels: torch.Tensor) -> torch.Tensor:
    return encode(build_encoder(clip, LAA), clip, pixels).patch_features.cpu()


def test_random_weights_are_the_same_on_the_device(tiny_clip, device_clip):
    ours = device_clip.model.state_dict()
    for name, value in tiny_clip.model.state_dict().items():
        assert torch.equal(value, ours[name].cpu()), name


def test_laa_patch_features_match_the_cpu(tiny_clip, device_clip):
    pixels = images()
    cpu, dev = patch_features(tiny_clip, pixels), patch_features(device_clip, pixels)
    assert dev.shape == cpu.shape == (6, 8, 8, tiny_clip.model.text_projection.shape[1])
    # Unit vectors: 1e-4 is ~1000x fp32's rounding after a few layers, far below any real discrepancy.
    torch.testing.assert_close(dev, cpu, atol=1e-4, rtol=0)


def test_half_precision_encode_is_close_to_fp32(device_clip):
    half = load_clip("mpad-tiny", "none", device=DEVICE, precision=HALF)
    pixels = images()
    full, low = patch_features(device_clip, pixels), patch_features(half, pixels)
    assert torch.isfinite(low).all()
    cosine = (full * low).sum(-1)  # both L2-normalised
    # fp16 keeps ~3 decimal digits, bf16 ~2: per-patch directions agree to within about 1e-2 over 4 layers.
    assert cosine.min() > (0.999 if HALF == "fp16" else 0.99), float(cosine.min())
    assert not torch.equal(full, low)  # the half model really computed in half precision


def train(clip, features: torch.Tensor, masks: torch.Tensor, init: dict[str, torch.Tensor]) -> torch.Tensor:
    learner = PromptLearner(clip.model, clip.tokenizer, "carpet", 4, 2, 2).to(clip.device)
    with torch.no_grad():
        for name, value in init.items():
            getattr(learner, name).copy_(value)
    meta = meta_text_embeddings(clip.model, clip.tokenizer, "carpet")
    config = MptsConfig(meta_epochs=2, steps=10, batch_size=4, seed=0)
    result = train_prompts(
        learner,
        TextEncoder(clip.model),
        features.to(clip.device),
        masks.to(clip.device),
        meta,
        float(clip.model.logit_scale.exp()),
        config,
    )
    assert len(result.history) == 20
    return result.text.cpu()


def test_mpts_training_gives_the_cpu_prompts(tiny_clip, device_clip):
    pixels = images(8, seed=1)
    features = patch_features(tiny_clip, pixels)
    masks = torch.zeros(8, 64, 64)
    masks[::2, 16:40, 20:44] = 1.0  # half the images with an "anomalous" square
    gen, width = torch.Generator().manual_seed(0), tiny_clip.model.token_embedding.weight.shape[1]
    init = {
        name: torch.randn(n, width, generator=gen) * 0.02 for name, n in (("general", 4), ("normal", 2), ("anomaly", 2))
    }
    start = train(tiny_clip, features, masks, {k: v.clone() for k, v in init.items()})
    cpu = train(tiny_clip, features, masks, init)
    dev = train(device_clip, features, masks, init)
    torch.testing.assert_close(cpu, start)  # the CPU reference is deterministic
    moved = (cpu - meta_text_embeddings(tiny_clip.model, tiny_clip.tokenizer, "carpet").cpu()).abs().max()
    assert moved > 0.1  # training changed the prompts (0.33 on the CPU): the comparison below is not trivial
    # Rounding differences stay small through 20 Adam steps: perturbing the initial vectors by 1e-6 moves
    # the result by 3e-5 on the CPU; 1e-3 leaves a wide margin and still catches any real discrepancy.
    torch.testing.assert_close(dev, cpu, atol=1e-3, rtol=0)
