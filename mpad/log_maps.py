"""The score maps MPTS trains on, in log space (paper eq. 3-7; how they are read: docs/method.md#score-maps).

log S' = log_softmax over [normal, anomaly] of the scaled cosine similarities on the patch grid, upsampled to the
image size by `log_upsample`: the log of the bilinearly upsampled *probabilities*, computed without leaving log
space, so that exp(log S') is the evaluation map (`mpad.scoring.anomaly_maps`) to float rounding. With
`anomaly_loss` and `divergence_loss` (mpad.mpts) these are the definitions; `training_losses` is what a step runs:
the same losses and their gradients in fewer passes over the full-resolution maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def patch_log_probabilities(
    patch_features: torch.Tensor, text: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """(B, H', W', D) normalised, text (2, D) -> (B, 2, H', W') log S' on the patch grid: log_softmax of the
    scaled cosine similarities (the log of `mpad.scoring.patch_probabilities`)."""
    return (logit_scale * (patch_features @ text.t())).log_softmax(dim=-1).permute(0, 3, 1, 2)  # as scoring scales


def _axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear resampling of one axis, align_corners=False (F.interpolate's): output position i reads
    (1 - frac_i) x[low_i] + frac_i x[high_i]; (low, high) long, frac float64 in [0, 1)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    low = src.floor().long()
    return low, (low + 1).clamp(max=n_in - 1), src - low


def log_upsample(log_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size): log of `mpad.scoring.upsample(log_maps.exp(), size)` (bilinear,
    align_corners=False), computed in log space: one log-sum-exp of two neighbours per axis (`_LogLerp`). Columns
    first: the full-size pass then gathers (and its backward adds back) whole contiguous rows, not single values."""
    return _log_lerp(_log_lerp(log_maps, 3, size[1]), 2, size[0])


def _log_lerp(x: torch.Tensor, dim: int, n_out: int) -> torch.Tensor:
    """One axis (2: rows, 3: columns) of `log_upsample`."""
    low, high, frac = _axis(x.shape[dim], n_out)
    frac = frac.to(device=x.device, dtype=x.dtype)
    shape = (-1, 1) if dim == 2 else (-1,)
    log_weights = (torch.log1p(-frac).view(shape), frac.log().view(shape))  # frac 0: -inf, weight 0
    return _LogLerp.apply(x, dim, low.to(x.device), high.to(x.device), *log_weights)


class _LogLerp(torch.autograd.Function):
    """One axis of `log_upsample`: out = logaddexp(x[low] + log(1 - f), x[high] + log f), along `dim`.

    The backward reuses the two neighbours' shares of each output, exp(x[low] + log(1 - f) - out) and
    exp(x[high] + log f - out) (they sum to 1), kept from the forward pass: an MPTS step runs two backward passes
    (G_ano, G_div) through the columns pass (`training_losses`), and autograd's own logaddexp backward would
    recompute them in each. A zero upstream gradient stays exactly zero."""

    @staticmethod
    def forward(ctx, x, dim, low, high, log_w_low, log_w_high):
        below = x.index_select(dim, low) + log_w_low
        above = x.index_select(dim, high) + log_w_high
        out = torch.logaddexp(below, above)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(low, high, (below - out).exp(), (above - out).exp())
            ctx.dim, ctx.n_in = dim, x.shape[dim]
        return out

    @staticmethod
    def backward(ctx, grad):
        low, high, share_low, share_high = ctx.saved_tensors
        shape = list(grad.shape)
        shape[ctx.dim] = ctx.n_in
        grad_x = grad.new_zeros(shape).index_add_(ctx.dim, low, grad * share_low)
        return grad_x.index_add_(ctx.dim, high, grad * share_high), None, None, None, None, None


def score_maps(
    features: torch.Tensor, text: torch.Tensor, logit_scale: float | torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """features (B, H', W', D) normalised, text (2, D) -> (B, 2, *size) log S' = [log S'_n, log S'_a]: the
    log of the bilinearly upsampled probability maps (exp of channel 1 = `mpad.scoring.anomaly_maps`)."""
    return log_upsample(patch_log_probabilities(features, text, logit_scale), size)


# ---------------------------------------------------------------- MPTS's losses at full resolution, in few passes
#
# A step needs L_ano and L_div (eq. 3-7) of the full-resolution maps and their two gradients. Written with
# `score_maps` and autograd, that is some 80 passes over (B, 2, H, W) tensors a step, most of a step's time outside
# the text tower. The rows pass of `log_upsample` is linear in probability space, so below it is one matrix product
# per map and its transpose one per gradient, with the losses' own gradients written out: about 15 passes.


@dataclass(frozen=True)
class RowPairs:
    """The rows pass of `log_upsample`, from n_in to n_out rows, in probability space: output row r is
    (1 - f_r) row low_r + f_r row high_r, of P distinct pairs (low, high) (a row with f_r = 0 reads its low row
    alone and is paired with itself). Each pair k is scaled by top_k = max(log row low_k, log row high_k) and mixed
    by one matrix product (`mix`), so that every mixed value lies in [min(f, 1 - f), 1]: its log is accurate
    however far a probability lies below float precision, as in `_LogLerp`.

    low, high: (P,) the pairs' rows. weights: (n_out, 2P), (1 - f_r) at column k(r) and f_r at P + k(r).
    members: (P, n_out), 1 where k(r) = k."""

    low: torch.Tensor
    high: torch.Tensor
    weights: torch.Tensor
    members: torch.Tensor

    @classmethod
    def build(
        cls, n_in: int, n_out: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> RowPairs:
        low, high, frac = _axis(n_in, n_out)
        high = torch.where(frac == 0, low, high)
        pairs, pair_of_row = torch.unique(torch.stack([low, high], dim=1), dim=0, return_inverse=True)
        n_pairs, rows = len(pairs), torch.arange(n_out)
        weights = torch.zeros(n_out, 2 * n_pairs, dtype=torch.float64)
        weights[rows, pair_of_row] = 1 - frac
        weights[rows, n_pairs + pair_of_row] = frac
        members = torch.zeros(n_pairs, n_out, dtype=torch.float64)
        members[pair_of_row, rows] = 1.0
        low, high = (t.to(device) for t in (pairs[:, 0], pairs[:, 1]))
        return cls(low, high, *(t.to(device=device, dtype=dtype) for t in (weights, members)))

    def scaled(self, log_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log_rows (B, 2, n_in, W) -> top (B, 2, P, W) detached, and (B, 2, 2P, W) [exp(low - top), exp(high - top)]
        (differentiable). The mixed values' log plus top is the log-space rows pass: top cancels from its
        derivative, so it is held fixed."""
        low, high = log_rows.index_select(2, self.low), log_rows.index_select(2, self.high)
        top = torch.maximum(low, high).detach()
        return top, torch.cat([(low - top).exp(), (high - top).exp()], dim=2)

    def mix(self, scaled: torch.Tensor) -> torch.Tensor:
        """(B, 2, 2P, W) -> (n_out, B, 2, W): each output row's mix of its pair, one matrix product."""
        b, c, _, w = scaled.shape
        return (self.weights @ scaled.permute(2, 0, 1, 3).reshape(-1, b * c * w)).view(-1, b, c, w)

    def unmix(self, full: torch.Tensor) -> torch.Tensor:
        """The transpose of `mix`: (n_out, B, 2, W) -> (B, 2, 2P, W)."""
        n_out, b, c, w = full.shape
        return (self.weights.t() @ full.view(n_out, -1)).view(-1, b, c, w).permute(1, 2, 0, 3)

    def pair_sums(self, full: torch.Tensor) -> torch.Tensor:
        """(n_out, B, 2, W) -> (B, 2, P, W): the sums over each pair's output rows."""
        n_out, b, c, w = full.shape
        return (self.members @ full.view(n_out, -1)).view(-1, b, c, w).permute(1, 2, 0, 3)


@dataclass(frozen=True)
class MapTargets:
    """The masks M'_a (N, H, W) of the synthesized set, prepared once for `training_losses`: targets (H, N, 2, W)
    [M'_n, M'_a] (eq. 3) rows first (`RowPairs`'s layout), their `pair_sums` (N, 2, P, W), and the row pairs from
    the patch grid's n_in rows to H."""

    targets: torch.Tensor
    pair_sums: torch.Tensor
    rows: RowPairs

    @classmethod
    def build(cls, masks: torch.Tensor, n_in: int) -> MapTargets:
        """masks (N, H, W) in {0, 1}, of the dtype the losses are computed in; n_in the patch grid's rows."""
        rows = RowPairs.build(n_in, masks.shape[1], masks.device, masks.dtype)
        targets = torch.stack([1 - masks, masks], dim=1).permute(2, 0, 1, 3).contiguous()
        return cls(targets, rows.pair_sums(targets), rows)


def training_losses(
    features: torch.Tensor,
    text: torch.Tensor,
    meta: torch.Tensor | None,
    logit_scale: float | torch.Tensor,
    targets: MapTargets,
    index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_ano, L_div, dL_ano/d text, dL_div/d text) of the minibatch `index`: features (B, H', W', D) normalised,
    text (2, D) a leaf requiring grad, meta (2, D) the meta prompt (None: no divergence, L_div and its gradient 0).

    The same numbers as `mpad.mpts.anomaly_loss(score_maps(...))` and `divergence_loss` with autograd, to float
    rounding (tested): log S' = top + log(mix) on every output row, so
    - L_ano = -2/n (sum [M'_n, M'_a] log mix + sum top x the masks' pair sums), n = B H W; its gradient in the mix
      is -2/n M / mix;
    - L_div = 2/n sum_c S^M (log S^M - log S'): `divergence_loss`'s terms S' - S^M sum to 0 over the pair at every
      pixel, and so does their gradient (the pair's S' sum to 1 whatever the prompts), so both are left out; the
      gradient in the mix is -2/n S^M / mix.
    The column pass and everything before it stay with autograd (1/16 of the size at ViT-B/16's patch grid)."""
    rows, size = targets.rows, targets.targets.shape
    n = index.numel() * size[0] * size[3]
    top, scaled = rows.scaled(_log_lerp(patch_log_probabilities(features, text, logit_scale), 3, size[3]))
    with torch.no_grad():
        mixed = rows.mix(scaled)
        log_mixed = mixed.log()
        target = targets.targets.index_select(1, index)
        loss_ano = torch.dot(target.flatten(), log_mixed.flatten()) + (top * targets.pair_sums[index]).sum()
        loss_ano = -2 / n * loss_ano
        grad_ano = -2 / n * rows.unmix(target.div_(mixed))
    (c_ano,) = torch.autograd.grad(scaled, text, grad_ano, retain_graph=meta is not None)
    if meta is None:
        return loss_ano, torch.zeros_like(loss_ano), c_ano, torch.zeros_like(c_ano)
    with torch.no_grad():
        top_m, scaled_m = rows.scaled(_log_lerp(patch_log_probabilities(features, meta, logit_scale), 3, size[3]))
        meta_maps = rows.mix(scaled_m * torch.cat([top_m.exp()] * 2, dim=2))  # S^M itself
        log_ratio = rows.mix(scaled_m).log_().sub_(log_mixed)  # log S^M - log S' - (top_m - top)
        loss_div = (
            torch.dot(meta_maps.flatten(), log_ratio.flatten()) + ((top_m - top) * rows.pair_sums(meta_maps)).sum()
        )
        loss_div = 2 / n * loss_div
        grad_div = -2 / n * rows.unmix(meta_maps.div_(mixed))
    (c_div,) = torch.autograd.grad(scaled, text, grad_div)
    return loss_ano, loss_div, c_ano, c_div
