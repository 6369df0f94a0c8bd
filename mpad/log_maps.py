"""The score maps MPTS trains on, in log space (paper eq. 3-7; the reading is `mpad.mpts`'s docstring).

log S' = log_softmax over [normal, anomaly] of the scaled cosine similarities on the patch grid, upsampled to the
image size by `log_upsample`: the log of the bilinearly upsampled *probabilities*, computed without leaving log
space, so that exp(log S') is the evaluation map (`mpad.scoring.anomaly_maps`) to float rounding.
"""

from __future__ import annotations

import torch


def patch_log_probabilities(
    patch_features: torch.Tensor, text: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """(B, H', W', D) normalised, text (2, D) -> (B, 2, H', W') log S' on the patch grid: log_softmax of the
    scaled cosine similarities (the log of `mpad.scoring.patch_probabilities`)."""
    return (logit_scale * patch_features @ text.t()).log_softmax(dim=-1).permute(0, 3, 1, 2)


def log_upsample(log_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size): log of `mpad.scoring.upsample(log_maps.exp(), size)` (bilinear,
    align_corners=False), computed in log space: one log-sum-exp of two neighbours per axis (`_LogLerp`). Columns
    first: the full-size pass then gathers (and its backward adds back) whole contiguous rows, not single values."""
    out = log_maps
    for dim, n_out in ((3, size[1]), (2, size[0])):
        n_in = out.shape[dim]
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
        low = src.floor().long()
        high = (low + 1).clamp(max=n_in - 1)
        frac = (src - low).to(device=out.device, dtype=out.dtype)
        shape = (-1, 1) if dim == 2 else (-1,)
        log_weights = (torch.log1p(-frac).view(shape), frac.log().view(shape))  # frac 0: -inf, weight 0
        out = _LogLerp.apply(out, dim, low.to(out.device), high.to(out.device), *log_weights)
    return out


class _LogLerp(torch.autograd.Function):
    """One axis of `log_upsample`: out = logaddexp(x[low] + log(1 - f), x[high] + log f), along `dim`.

    The backward reuses the two neighbours' shares of each output, exp(x[low] + log(1 - f) - out) and
    exp(x[high] + log f - out) (they sum to 1), kept from the forward pass: MPTS runs two backward passes per step
    (G_ano, G_div) through the full-resolution maps, and autograd's own logaddexp backward would recompute them
    in each. A zero upstream gradient (G_div at a meta-epoch's start) stays exactly zero."""

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
