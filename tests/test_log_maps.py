"""MPTS's losses at full resolution in few passes (`mpad.log_maps.training_losses`) against their definition:
`score_maps`, `anomaly_loss`, `divergence_loss` and autograd (eq. 3-7)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mpad.log_maps import MapTargets, RowPairs, score_maps, training_losses
from mpad.mpts import anomaly_loss, divergence_loss


def by_definition(features, text, meta, scale, masks):
    """(L_ano, L_div, dL_ano/d text, dL_div/d text) with the maps, losses and autograd as defined."""
    text = text.detach().requires_grad_()
    log_maps = score_maps(features, text, scale, tuple(masks.shape[-2:]))
    loss_ano = anomaly_loss(log_maps, masks)
    loss_div = divergence_loss(score_maps(features, meta, scale, tuple(masks.shape[-2:])), log_maps)
    c_ano, c_div = (torch.autograd.grad(loss, text, retain_graph=True)[0] for loss in (loss_ano, loss_div))
    return loss_ano.detach(), loss_div.detach(), c_ano, c_div


def problem(grid: tuple[int, int], size: tuple[int, int], spread: float, dtype=torch.float64, images: int = 3):
    gen = torch.Generator().manual_seed(sum(grid) * 100 + sum(size))
    features = F.normalize(torch.randn(images, *grid, 16, generator=gen, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(2, 16, generator=gen, dtype=dtype), dim=-1)
    meta = F.normalize(text + spread * torch.randn(2, 16, generator=gen, dtype=dtype), dim=-1)
    masks = (torch.rand(images + 2, *size, generator=gen) > 0.7).to(dtype)  # more images than the batch
    return features, text, meta, masks


# Sizes: an integer factor (16 = 4 x 4), factors that are not (37 x 23, 9 / 4), one with rows read alone
# (f = 0 inside the map: 4 -> 12, src = (r + 0.5) / 3 - 0.5 is whole at r = 1, 4, 7), a single row, no upsampling.
SIZES = [((4, 4), (64, 64)), ((5, 4), (37, 23)), ((4, 3), (12, 9)), ((1, 3), (5, 7)), ((3, 3), (3, 3))]


@pytest.mark.parametrize("grid,size", SIZES)
@pytest.mark.parametrize("scale", [10.0, 100.0])
def test_training_losses_are_the_definition(grid, size, scale):
    """Both in float64, where the two orders of summation agree to about 1e-15 of the sums' terms: 1e-9 of the
    largest value leaves room for any cancellation short of a millionfold, while a wrong weight, pair, sign or
    normalisation is off by O(1). A batch that is not the first images checks the mask rows it takes."""
    features, text, meta, masks = problem(grid, size, 0.3)
    index = torch.tensor([3, 0, 4])
    expected = by_definition(features, text, meta, scale, masks[index])
    got = training_losses(features, text.clone().requires_grad_(), meta, scale, MapTargets.build(masks, grid[0]), index)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-9 * float(e.abs().max()))
    assert float(expected[1]) > 1e-3 and float(expected[3].abs().max()) > 1e-3  # the divergence is exercised


def test_without_a_meta_prompt_the_divergence_is_exactly_zero():
    features, text, _, masks = problem((4, 4), (16, 16), 0.3, torch.float32)
    targets, index = MapTargets.build(masks, 4), torch.arange(3)
    loss_ano, loss_div, c_ano, c_div = training_losses(features, text.requires_grad_(), None, 100.0, targets, index)
    assert float(loss_div) == 0.0 and torch.equal(c_div, torch.zeros_like(c_div))
    expected = by_definition(features, text, text, 100.0, masks[:3])
    torch.testing.assert_close(loss_ano, expected[0], rtol=1e-5, atol=0)  # fp32: loss terms all of one sign


def test_saturated_maps_keep_finite_values_and_the_closed_form_gradient():
    """fp32, CLIP's logit scale 100 and a cosine gap of 0.3 (S'_a = e^-30, far below what a probability map keeps
    after mixing in probability space without the pair scaling), the meta prompt at S^M_a = 1/3, every pixel
    anomalous: L_ano = 2 x 30 (to float rounding of log(1 + e^-30)), and dL_div / d text is the closed form of
    `test_mpts.test_saturated_map_keeps_the_divergence_gradient_through_score_maps`."""
    features = torch.zeros(1, 2, 2, 2)
    features[..., 0] = 1.0
    angle = math.acos(0.7)
    text = torch.tensor([[1.0, 0.0], [0.7, math.sin(angle)]], requires_grad=True)
    meta_angle = math.acos(1 - math.log(2.0) / 100)
    meta = torch.tensor([[1.0, 0.0], [math.cos(meta_angle), math.sin(meta_angle)]])
    targets = MapTargets.build(torch.ones(1, 8, 8), 2)
    loss_ano, loss_div, c_ano, c_div = training_losses(features, text, meta, 100.0, targets, torch.tensor([0]))
    assert float(loss_ano) == pytest.approx(60.0, rel=1e-6)
    per_gap = 2 * (math.exp(-30) - 1 / 3) * 100
    torch.testing.assert_close(c_div, torch.tensor([[-per_gap, 0.0], [per_gap, 0.0]]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c_ano, torch.tensor([[200.0, 0.0], [-200.0, 0.0]]), rtol=1e-4, atol=1e-6)
    assert math.isfinite(float(loss_div))


@pytest.mark.parametrize("n_in,n_out", [(4, 64), (5, 37), (4, 12), (1, 5), (3, 3), (6, 4)])
def test_row_pairs_mix_is_bilinear_upsampling_of_the_rows(n_in, n_out):
    """mix(scaled(log x)) x exp(top) is F.interpolate's bilinear rows pass of x (align_corners=False); unmix is
    mix's transpose (float64: <a, mix b> = <unmix a, b> to rounding)."""
    gen = torch.Generator().manual_seed(n_in * 100 + n_out)
    probs = torch.rand(2, 2, n_in, 3, generator=gen, dtype=torch.float64)
    rows = RowPairs.build(n_in, n_out, dtype=torch.float64)
    top, scaled = rows.scaled(probs.log())
    mixed = rows.mix(scaled * torch.cat([top.exp()] * 2, dim=2)).permute(1, 2, 0, 3)
    expected = F.interpolate(probs, size=(n_out, 3), mode="bilinear", align_corners=False)
    torch.testing.assert_close(mixed, expected, rtol=1e-12, atol=0)
    other = torch.rand(n_out, 2, 2, 3, generator=gen, dtype=torch.float64)
    assert float((rows.mix(scaled) * other).sum()) == pytest.approx(
        float((scaled * rows.unmix(other)).sum()), rel=1e-12
    )
