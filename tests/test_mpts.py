"""MPTS (sec. 3.3): log-space score maps and losses (eq. 3-7), the gradient calibration of eq. 10, the
meta-epoch loop, and that it learns.

Learning assertions follow /work/shared/notes/random-weights-learnability.md: with random weights the
trained prompts must beat untrained ones by >= 0.15 pixel AUROC on new images with the same kind of
noise blobs, reach >= 0.65, and the training loss must at least halve. These are not rounding bounds: 100 Adam
steps compound rounding differences like a change of seed, so another CPU's kernels give another trajectory; the
note measured a gain >= 0.22 and trained AUROC >= 0.75 on each of 10 seeds, and the test asserts 3-seed means
(marker `numerics`: checked on the kernel sets of tests/fp_bounds.py).

The other tolerances compare closed forms or two fp32 forms of one formula on a few values each (elementwise
log, exp, softmax: a few ulp, 1e-6 and 1e-5 relative leave 10-100x); the loop's tests compare bitwise (one
process, the same ops on the same inputs).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from mpad.config import LaaConfig
from mpad.features import build_encoder, encode, stack_images
from mpad.log_maps import MapTargets, log_upsample, score_maps, training_losses
from mpad.mpts import MptsConfig, anomaly_loss, calibrate, divergence_loss, train_prompts
from mpad.prompts import PromptLearner, TextEncoder, learned_text_embeddings, meta_text_embeddings
from mpad.scoring import anomaly_maps, upsample

LAA = LaaConfig(attention="vv", k=2, layers=2, cls="neighbor-cls")


# ---------------------------------------------------------------- generated data


def striped_texture(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """A structured (diagonal stripes) RGB texture in [0, 1], (h, w, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(float)
    base = 0.5 + 0.35 * np.sin(2 * np.pi * (x * 0.9 + y * 0.4) / 9.0)
    img = np.stack([base * 0.8, base * 0.6 + 0.1, 0.3 + 0.2 * base], -1)
    return np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)


def noise_blobs(base: np.ndarray, n: int, seed: int, clean: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """n copies of `base` with Gaussian noise (sigma 0.1-0.3) on 1-3 random ellipses; a share `clean` left
    untouched. -> uint8 images (n, h, w, 3), bool masks (n, h, w)."""
    rng = np.random.default_rng(seed)
    h, w, _ = base.shape
    y, x = np.mgrid[0:h, 0:w].astype(float)
    images, masks = [], []
    for _ in range(n):
        mask = np.zeros((h, w), bool)
        if rng.random() >= clean:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(0, h), rng.uniform(0, w)
                ry, rx = rng.uniform(4, 14, 2)
                mask |= ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        noisy = np.clip(base + rng.normal(0, rng.uniform(0.1, 0.3), base.shape) * mask[..., None], 0, 1)
        images.append((noisy * 255).round().astype(np.uint8))
        masks.append(mask)
    return np.stack(images), np.stack(masks)


@pytest.fixture(scope="module")
def setup(tiny_clip):
    """Cached features of 256 training and 64 held-out synthesized images, the text tower, meta text."""
    encoder = build_encoder(tiny_clip, LAA)
    base = striped_texture()
    train_images, train_masks = noise_blobs(base, 256, seed=1)
    test_images, test_masks = noise_blobs(base, 64, seed=99)

    def features(images):
        return encode(encoder, tiny_clip, stack_images(images, tiny_clip.image_size)).patch_features

    return {
        "features": features(train_images),
        "masks": torch.from_numpy(train_masks),
        "test_features": features(test_images),
        "test_masks": test_masks,
        "text_encoder": TextEncoder(tiny_clip.model),
        "meta": meta_text_embeddings(tiny_clip.model, tiny_clip.tokenizer, "carpet"),
        "logit_scale": float(tiny_clip.model.logit_scale.exp()),
    }


def make_learner(clip, seed: int) -> PromptLearner:
    return PromptLearner(clip.model, clip.tokenizer, "carpet", 4, 2, 2, generator=torch.Generator().manual_seed(seed))


def run(clip, setup, config: MptsConfig, seed: int = 0, n: int | None = None, on_step=None):
    learner = make_learner(clip, seed)
    n = n or len(setup["features"])
    result = train_prompts(
        learner,
        setup["text_encoder"],
        setup["features"][:n],
        setup["masks"][:n],
        setup["meta"],
        setup["logit_scale"],
        config,
        on_step,
    )
    return learner, result


def vectors(learner: PromptLearner) -> torch.Tensor:
    return torch.cat(
        [learner.general.detach().flatten(), learner.normal.detach().flatten(), learner.anomaly.detach().flatten()]
    )


# ---------------------------------------------------------------- eq. 10


def test_calibrate_conflicting_projection_lam1_is_orthogonal():
    g_ano, g_div = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([-1.0, 0.0, 1.0])  # dot = -1 < 0
    out = calibrate(g_ano, g_div, lam=1.0)
    # g_ano - (-1 / 2) * g_div = [0.5, 2, 0.5]
    torch.testing.assert_close(out, torch.tensor([0.5, 2.0, 0.5]))
    assert abs(float(out @ g_div)) < 1e-6


def test_calibrate_conflicting_projection_half_way():
    g_ano, g_div = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([-1.0, 0.0, 1.0])
    out = calibrate(g_ano, g_div, lam=0.5)
    torch.testing.assert_close(out, torch.tensor([0.75, 2.0, 0.25]))
    # half of the conflicting component is left: out . g_div = g_ano . g_div / 2
    assert float(out @ g_div) == pytest.approx(-0.5, abs=1e-6)


@pytest.mark.parametrize(
    "g_div",
    [torch.tensor([1.0, 1.0, 5.0]), torch.tensor([-2.0, 1.0, 7.0]), torch.zeros(3)],
    ids=["agreeing", "orthogonal", "zero"],
)
@pytest.mark.parametrize("mode", ["projection", "literal", "literal-rms"])
def test_calibrate_leaves_non_conflicting_gradients(g_div, mode):
    g_ano = torch.tensor([1.0, 2.0, 0.0])
    out = calibrate(g_ano, g_div, lam=1.0, mode=mode)
    assert torch.equal(out, g_ano)
    assert not torch.isnan(out).any()


def test_calibrate_literal_subtracts_lambda_times_cosine():
    g_ano, g_div = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # cos = -1/sqrt(2)
    out = calibrate(g_ano, g_div, lam=2.0, mode="literal")
    shift = 2.0 / math.sqrt(2.0)
    torch.testing.assert_close(out, torch.tensor([1.0 + shift, shift]))


def test_calibrate_literal_rms_shifts_by_cosine_times_rms():
    g_ano, g_div = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # cos = -1/sqrt(2), rms(g_ano) = 1/sqrt(2)
    out = calibrate(g_ano, g_div, lam=2.0, mode="literal-rms")
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0]))  # shift 2 * (1/sqrt(2)) * (1/sqrt(2)) = 1


def test_calibration_and_pixel_normalisation():
    """Eq. 4-5 print sums over pixels, we average: the same loss with another pixel normalisation. Projection
    and literal-rms give the same calibrated gradient up to that factor (Adam steps alike); literal does not."""
    gen = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(8, generator=gen), dim=0)
    features = F.normalize(base + 0.3 * torch.randn(2, 3, 3, 8, generator=gen), dim=-1)
    noise = 0.3 * torch.randn(2, 2, 8, generator=gen)
    text = F.normalize(torch.stack([-base, base]) + noise[0], dim=-1).requires_grad_()  # leans anomalous
    meta = F.normalize(torch.stack([base, -base]) + noise[1], dim=-1)  # leans normal: L_div pulls S'_a down
    masks = torch.ones(2, 12, 12)  # all anomalous: L_ano pushes S'_a up
    log_maps = score_maps(features, text, 10.0, (12, 12))
    loss_mean = anomaly_loss(log_maps, masks)
    loss_div = divergence_loss(score_maps(features, meta, 10.0, (12, 12)), log_maps)
    g_mean, g_div = (torch.autograd.grad(loss, text, retain_graph=True)[0].flatten() for loss in (loss_mean, loss_div))
    n = masks.numel()  # 288 pixels: the sum-normalised loss is n * loss_mean
    g_sum = torch.autograd.grad(n * loss_mean, text)[0].flatten()
    assert float(F.cosine_similarity(g_mean, g_div, dim=0)) < -0.1  # a conflict: eq. 10 applies
    for mode in ("projection", "literal-rms"):
        torch.testing.assert_close(calibrate(g_sum, g_div, 1.0, mode) / n, calibrate(g_mean, g_div, 1.0, mode))
    lit_mean, lit_sum = calibrate(g_mean, g_div, 1.0, "literal"), calibrate(g_sum, g_div, 1.0, "literal")
    assert float(F.cosine_similarity(lit_mean, lit_sum, dim=0)) < 0.9  # the printed form depends on it


def test_calibrate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="calibration"):
        calibrate(torch.ones(2), -torch.ones(2), 1.0, mode="pcgrad")


# ---------------------------------------------------------------- losses


def test_losses_on_hand_made_maps():
    masks = torch.tensor([[[1.0, 0.0]]])  # (1, 1, 2)
    s_a = torch.tensor([[[0.9, 0.2]]])
    log_maps = torch.stack([1 - s_a, s_a], dim=1).log()  # (1, 2, 1, 2)
    bce = -(math.log(0.9) + math.log(0.8)) / 2
    assert float(anomaly_loss(log_maps, masks)) == pytest.approx(2 * bce, rel=1e-6)  # eq. 4 + eq. 5, equal terms
    assert float(divergence_loss(log_maps, log_maps)) == pytest.approx(0.0, abs=1e-7)
    meta = torch.full_like(log_maps, math.log(0.5))
    kl = sum(0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q)) for q in (0.9, 0.2)) / 2
    assert float(divergence_loss(meta, log_maps)) == pytest.approx(2 * kl, rel=1e-5)


def test_log_losses_equal_the_probability_forms():
    """Where probabilities are accurate, the log-space losses equal BCE and Bernoulli KL on probabilities."""
    gen = torch.Generator().manual_seed(1)
    logits, meta_logits = torch.randn(3, 2, 5, 5, generator=gen) * 3, torch.randn(3, 2, 5, 5, generator=gen) * 3
    masks = (torch.rand(3, 5, 5, generator=gen) < 0.4).float()
    q, p = logits.softmax(1), meta_logits.softmax(1)
    bce = F.binary_cross_entropy(q[:, 0], 1 - masks) + F.binary_cross_entropy(q[:, 1], masks)
    assert float(anomaly_loss(logits.log_softmax(1), masks)) == pytest.approx(float(bce), rel=1e-5)

    def bernoulli_kl(pc, qc):
        return (pc * (pc / qc).log() + (1 - pc) * ((1 - pc) / (1 - qc)).log()).mean()

    kl = bernoulli_kl(p[:, 1], q[:, 1]) + bernoulli_kl(p[:, 0], q[:, 0])  # eq. 6 + eq. 7
    div = divergence_loss(meta_logits.log_softmax(1), logits.log_softmax(1))
    assert float(div) == pytest.approx(float(kl), rel=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (60, 37), (5, 5), (3, 2)])
def test_log_upsample_is_the_log_of_bilinear_probability_upsampling(size):
    gen = torch.Generator().manual_seed(2)
    probs = (torch.randn(2, 2, 5, 4, generator=gen) * 4).softmax(1)
    torch.testing.assert_close(log_upsample(probs.log(), size).exp(), upsample(probs, size), rtol=0, atol=1e-6)


def _log_upsample_by_autograd(log_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The same formula written with autograd's own ops (index_select, logaddexp), as a reference."""
    out = log_maps
    for dim, n_out in ((2, size[0]), (3, size[1])):
        n_in = out.shape[dim]
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
        low, frac = src.floor().long(), (src - src.floor()).to(out.dtype)
        high = (low + 1).clamp(max=n_in - 1)
        shape = (-1, 1) if dim == 2 else (-1,)
        below = out.index_select(dim, low) + torch.log1p(-frac).view(shape)
        out = torch.logaddexp(below, out.index_select(dim, high) + frac.log().view(shape))
    return out


@pytest.mark.parametrize("size", [(64, 48), (5, 5), (3, 2)])
def test_log_upsample_gradient_is_that_of_its_formula(size):
    """The kept neighbour shares give autograd's gradient of the same formula (float64: rounding only, 1e-12), pass
    gradcheck, and a zero upstream gradient stays exactly zero (G_div at a meta-epoch's start)."""
    gen = torch.Generator().manual_seed(3)
    log_maps = (torch.randn(2, 2, 5, 4, generator=gen, dtype=torch.float64) * 4).log_softmax(1).requires_grad_()
    weights = torch.randn(2, 2, *size, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad((log_upsample(log_maps, size) * weights).sum(), log_maps)
    (expected,) = torch.autograd.grad((_log_upsample_by_autograd(log_maps, size) * weights).sum(), log_maps)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: log_upsample(x, size), (log_maps,))
    (zero,) = torch.autograd.grad(log_upsample(log_maps.float(), size), log_maps, torch.zeros(2, 2, *size))
    assert torch.equal(zero, torch.zeros_like(log_maps))


@pytest.mark.numerics
def test_training_maps_are_the_evaluation_maps(tiny_clip, setup):
    """The same logits (one expression, one kernel); log-softmax + log-space upsampling + exp against softmax +
    upsampling: elementwise fp32 ops on values <= 1, a few ulp (6e-8 each): 1e-6 leaves > 10x."""
    text = setup["meta"]
    log_maps = score_maps(setup["test_features"][:4], text, setup["logit_scale"], (64, 64))
    evaluated = anomaly_maps(setup["test_features"][:4], text, setup["logit_scale"], (64, 64))
    torch.testing.assert_close(log_maps[:, 1].exp(), evaluated, rtol=0, atol=1e-6)
    torch.testing.assert_close(log_maps.exp().sum(1), torch.ones(4, 64, 64), rtol=0, atol=1e-6)


def one_pixel(logit_gap: torch.Tensor) -> torch.Tensor:
    """(1, 2, 1, 1) log maps of one pixel with logit_a - logit_n = logit_gap."""
    return torch.stack([torch.zeros_like(logit_gap), logit_gap]).log_softmax(0).view(1, 2, 1, 1)


@pytest.mark.parametrize("gap", [-10.0, -15.0, -30.0, -100.0, 30.0])
def test_saturated_logits_keep_their_gradient(gap):
    """d L / d (logit_a - logit_n) = 2 (S'_a - target) for both losses (two equal terms, one pixel), also far
    beyond a logit gap of 13.8, where probabilities clamped at 1e-6 gave exactly 0."""
    d = torch.tensor(gap, requires_grad=True)
    meta = one_pixel(torch.tensor(-math.log(2.0)))  # S^M_a = 1/3
    (grad_div,) = torch.autograd.grad(divergence_loss(meta, one_pixel(d)), d)
    target = 1.0 if gap < 0 else 0.0  # the mask disagrees with the saturated map
    (grad_ano,) = torch.autograd.grad(anomaly_loss(one_pixel(d), torch.full((1, 1, 1), target)), d)
    s_a = 1 / (1 + math.exp(-gap))
    assert float(grad_div) == pytest.approx(2 * (s_a - 1 / 3), rel=1e-5)
    assert float(grad_ano) == pytest.approx(2 * (s_a - target), rel=1e-5)


def test_saturated_map_keeps_the_divergence_gradient_through_score_maps():
    """CLIP's logit scale 100, a cosine gap of 0.3 between the learned prompts (S'_a = e^-30) and the
    meta prompts at S^M_a = 1/3: dL_div / d text is finite and equals the closed form."""
    features = torch.zeros(1, 2, 2, 2)
    features[..., 0] = 1.0  # every patch the unit vector e_0
    angle = math.acos(0.7)
    text = torch.tensor([[1.0, 0.0], [0.7, math.sin(angle)]], requires_grad=True)  # cos 1 and 0.7
    meta_angle = math.acos(1 - math.log(2.0) / 100)
    meta = torch.tensor([[1.0, 0.0], [math.cos(meta_angle), math.sin(meta_angle)]])
    loss = divergence_loss(score_maps(features, meta, 100.0, (8, 8)), score_maps(features, text, 100.0, (8, 8)))
    (grad,) = torch.autograd.grad(loss, text)
    per_gap = 2 * (math.exp(-30) - 1 / 3) * 100  # d L / d gap * d gap / d (text_a . e_0)
    torch.testing.assert_close(grad, torch.tensor([[-per_gap, 0.0], [per_gap, 0.0]]), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the loop


def test_lambda_zero_is_exactly_plain_bce(tiny_clip, setup):
    cfg = dict(meta_epochs=2, steps=4, lr=1e-2, batch_size=8, seed=3)
    plain, plain_result = run(tiny_clip, setup, MptsConfig(lam=0.0, divergence=False, **cfg), n=48)
    zero, zero_result = run(tiny_clip, setup, MptsConfig(lam=0.0, **cfg), n=48)
    guided, _ = run(tiny_clip, setup, MptsConfig(lam=1.0, **cfg), n=48)
    assert torch.equal(vectors(plain), vectors(zero))
    assert [h["loss_ano"] for h in plain_result.history] == [h["loss_ano"] for h in zero_result.history]
    assert all(h["calibrated"] == 0 for h in zero_result.history)
    assert any(h["loss_div"] > 0 for h in zero_result.history)  # the divergence was computed, not skipped
    assert not torch.equal(vectors(plain), vectors(guided))  # and lambda > 0 does change the training


def test_meta_prompt_is_replaced_after_each_round(tiny_clip, setup):
    config = MptsConfig(lam=1.0, meta_epochs=3, steps=3, lr=1e-2, batch_size=8, seed=0)
    _, result = run(tiny_clip, setup, config, n=48)
    assert len(result.meta_texts) == 3 and len(result.round_texts) == 3
    assert torch.equal(result.meta_texts[0], setup["meta"])
    for r in range(2):
        assert torch.equal(result.meta_texts[r + 1], result.round_texts[r])
        assert not torch.equal(result.meta_texts[r + 1], result.meta_texts[r])
    first = {r: next(h for h in result.history if h["meta_epoch"] == r) for r in range(3)}
    # The learned prompt starts each later round exactly at the meta prompt: zero divergence there.
    assert first[0]["loss_div"] > 1e-3
    assert first[1]["loss_div"] < 1e-6 and first[2]["loss_div"] < 1e-6
    # ... and a zero G_div, not rounding noise whose cosine would trigger a calibration in a random direction
    assert first[1]["cos"] == 0.0 and first[2]["cos"] == 0.0 and first[1]["calibrated"] == 0
    assert [h["meta_epoch"] for h in result.history] == [0] * 3 + [1] * 3 + [2] * 3
    assert torch.equal(result.text, result.round_texts[-1])


def test_same_seed_same_prompts(tiny_clip, setup):
    config = MptsConfig(meta_epochs=2, steps=3, batch_size=8, seed=5)
    a, _ = run(tiny_clip, setup, config, seed=1, n=48)
    b, _ = run(tiny_clip, setup, config, seed=1, n=48)
    c, _ = run(tiny_clip, setup, MptsConfig(meta_epochs=2, steps=3, batch_size=8, seed=6), seed=1, n=48)
    assert torch.equal(vectors(a), vectors(b))
    assert not torch.equal(vectors(a), vectors(c))  # the minibatch seed matters


def test_on_step_sees_every_step(tiny_clip, setup):
    seen = []
    _, result = run(tiny_clip, setup, MptsConfig(meta_epochs=2, steps=2, batch_size=4), n=16, on_step=seen.append)
    assert seen == result.history and [h["step"] for h in seen] == [0, 1, 2, 3]
    assert set(seen[0]) == {"step", "meta_epoch", "loss_ano", "loss_div", "cos", "calibrated"}
    assert all(-1.0 <= h["cos"] <= 1.0 for h in seen)


def pixel_auroc(setup, text: torch.Tensor) -> float:
    with torch.no_grad():
        maps = score_maps(setup["test_features"], text, setup["logit_scale"], (64, 64))[:, 1].exp()
    return float(roc_auc_score(setup["test_masks"].ravel(), maps.numpy().ravel()))


def full_loss(setup, text: torch.Tensor) -> float:
    """L_ano (eq. 3-5) over all training images: a noise-free measure of the training loss."""
    with torch.no_grad():
        return float(
            anomaly_loss(score_maps(setup["features"], text, setup["logit_scale"], (64, 64)), setup["masks"].float())
        )


@pytest.mark.numerics
def test_mpts_learns_on_generated_noise_blobs(tiny_clip, setup):
    """Default MPTS (lambda = 1, projection, 2 meta-epochs), 3 prompt/minibatch seeds, means asserted."""
    before_loss, after_loss, before_auc, after_auc, calibrated = [], [], [], [], []
    for seed in range(3):
        learner = make_learner(tiny_clip, seed)
        with torch.no_grad():
            untrained = learned_text_embeddings(learner, setup["text_encoder"])
        config = MptsConfig(lam=1.0, meta_epochs=2, steps=50, lr=1e-2, batch_size=16, seed=seed)
        result = train_prompts(
            learner,
            setup["text_encoder"],
            setup["features"],
            setup["masks"],
            setup["meta"],
            setup["logit_scale"],
            config,
        )
        before_loss.append(full_loss(setup, untrained))
        after_loss.append(full_loss(setup, result.text))
        before_auc.append(pixel_auroc(setup, untrained))
        after_auc.append(pixel_auroc(setup, result.text))
        calibrated.append(np.mean([h["calibrated"] for h in result.history]))
    report = dict(loss=(before_loss, after_loss), auroc=(before_auc, after_auc), calibrated=calibrated)
    assert np.mean(after_loss) <= 0.5 * np.mean(before_loss), report
    assert np.mean(after_auc) >= 0.65, report
    assert np.mean(after_auc) - np.mean(before_auc) >= 0.15, report
    assert min(calibrated) > 0, report  # the meta-guiding really intervened


def test_zero_meta_epochs_is_the_hand_written_baseline(tiny_clip, setup):
    learner, result = run(tiny_clip, setup, MptsConfig(meta_epochs=0), n=16)
    assert result.history == [] and torch.equal(result.text, setup["meta"])
    assert torch.equal(vectors(learner), vectors(make_learner(tiny_clip, 0)))  # nothing was learned
    with pytest.raises(ValueError, match="meta_epochs\n  Input should be greater than or equal to 0"):
        MptsConfig(meta_epochs=-1)


def test_anomaly_loss_is_eq4_plus_eq5_to_the_bit():
    """anomaly_loss computes eq. 4 once and doubles it: bitwise the two terms of eq. 4-5 written out, values and
    gradients (the products are the same, their sums commute exactly, doubling is exact)."""
    generator = torch.Generator().manual_seed(7)
    log_maps = torch.randn(3, 2, 16, 16, generator=generator).log_softmax(dim=1).requires_grad_()
    masks = (torch.rand(3, 16, 16, generator=generator) > 0.8).float()
    m_n, log_n, log_a = 1 - masks, log_maps[:, 0], log_maps[:, 1]
    written_out = -(m_n * log_n + masks * log_a).mean() - (masks * log_a + m_n * log_n).mean()
    got = anomaly_loss(log_maps, masks)
    assert torch.equal(got, written_out)
    assert torch.equal(torch.autograd.grad(got, log_maps)[0], torch.autograd.grad(written_out, log_maps)[0])


@pytest.mark.numerics
@pytest.mark.parametrize("shared", [True, False])
def test_one_backward_pass_gives_each_loss_its_own_gradient(tiny_clip, setup, monkeypatch, shared):
    """`_step_gradients` takes both cotangents through the tower in one backward pass over the two copies; by
    linearity that is two backward passes through the same graph, one per cotangent, the other zero. Every
    operation of the tower's backward keeps a row's result independent of the other copy's rows (same shapes,
    same kernels), so the two agree to the bit. A swapped or shared cotangent, or a copy wired to the other's
    vectors, changes them by O(1)."""
    from mpad.mpts import _flatten, _step_gradients
    from mpad.prompts import text_embeddings_of

    encoder = setup["text_encoder"]
    if not shared:
        monkeypatch.setattr(encoder, "shares_prefix", False)
    learner = make_learner(tiny_clip, 3)
    features, scale, meta = setup["features"][:8], setup["logit_scale"], setup["meta"]
    targets, index = MapTargets.build(setup["masks"].float(), features.shape[1]), torch.arange(8)
    g_ano, g_div, loss_ano, loss_div = _step_gradients(learner, encoder, features, targets, index, meta, scale, True)

    params = [learner.general, learner.normal, learner.anomaly]
    twins = [p.detach().clone().requires_grad_() for p in params]
    texts = text_embeddings_of(learner, encoder, [params, twins])
    text = texts[0].detach().requires_grad_()
    *losses, c_ano, c_div = training_losses(features, text, meta, scale, targets, index)
    zero = torch.zeros_like(c_ano)
    ano = torch.autograd.grad(texts, params, torch.stack([c_ano, zero]), retain_graph=True, allow_unused=True)
    div = torch.autograd.grad(texts, twins, torch.stack([zero, c_div]), allow_unused=True)
    assert torch.equal(loss_ano, losses[0].detach()) and torch.equal(loss_div, losses[1].detach())
    assert torch.equal(g_ano, _flatten(ano, params))
    assert torch.equal(g_div, _flatten(div, twins))
    assert loss_div > 0 and not torch.allclose(g_ano, g_div)


def test_divergence_is_active_in_later_meta_epochs(tiny_clip, setup):
    """Eq. 6-10 act in every meta-epoch, not in round 0 only: on step 2 of rounds 1 and 2 (two updates after the
    learned prompt restarted at the new meta prompt) L_div > 0 and cos(G_ano, G_div) != 0. Skipping the divergence
    for whole later rounds, or replacing the meta prompt every step (learned = meta at every step), makes both
    exactly 0 there."""
    config = MptsConfig(lam=1.0, meta_epochs=3, steps=3, lr=1e-2, batch_size=8, seed=0)
    _, result = run(tiny_clip, setup, config, n=48)
    steps = {(h["meta_epoch"], h["step"] - 3 * h["meta_epoch"]): h for h in result.history}
    for round_index in (1, 2):
        step = steps[round_index, 2]
        assert step["loss_div"] > 0, step
        assert step["cos"] != 0.0, step


def _independent_text_embeddings(clip, learner: PromptLearner) -> torch.Tensor:
    """(2, D) normalised text embeddings of the learner's prompts through open_clip's text tower as `encode_text`
    runs it (the full context, its causal mask, the end token's row), not through `TextEncoder` /
    `text_embeddings_of`."""
    model = clip.model
    tower = model.text if hasattr(model, "text") else model
    embeddings, end_index = learner()  # eq. 1's token sequences, (2, L, width)
    x = embeddings + tower.positional_embedding
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask))
    x = x[torch.arange(2), end_index] @ tower.text_projection
    return F.normalize(x, dim=-1)


def test_g_ano_is_the_gradient_of_the_anomaly_loss_end_to_end(tiny_clip, setup):
    """G_ano (eq. 8) of a training step equals autograd of anomaly_loss(score_maps(text embeddings)) (eq. 3-5)
    taken through open_clip's own text tower, with respect to every learnable vector (G, N, A flattened), up to
    the summation order of the two computations: the tower's backward pass (TEXT_BACKWARD_TERMS) plus the sums
    over the minibatch's patches and the upsampling's pixels that reach each text coordinate."""
    from fp_bounds import TEXT_BACKWARD_TERMS, assert_reordered_close

    from mpad.mpts import _step_gradients

    learner = make_learner(tiny_clip, 4)
    features, masks = setup["features"][:8], setup["masks"][:8].float()
    scale, meta = setup["logit_scale"], setup["meta"]
    targets, index = MapTargets.build(setup["masks"].float(), features.shape[1]), torch.arange(8)
    g_ano, _, loss_ano, _ = _step_gradients(learner, setup["text_encoder"], features, targets, index, meta, scale, True)

    params = [learner.general, learner.normal, learner.anomaly]
    text = _independent_text_embeddings(tiny_clip, learner)
    reference_loss = anomaly_loss(score_maps(features, text, scale, tuple(masks.shape[1:])), masks)
    reference = torch.cat([g.flatten() for g in torch.autograd.grad(reference_loss, params)])
    patches, pixels = features.shape[0] * features.shape[1] * features.shape[2], masks[0].numel()
    assert_reordered_close(loss_ano, reference_loss.detach(), TEXT_BACKWARD_TERMS + patches + pixels)
    assert_reordered_close(g_ano, reference, TEXT_BACKWARD_TERMS + patches + pixels)
    assert reference.norm() > 0
