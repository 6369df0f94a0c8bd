"""Meta-guiding Prompt-tuning Scheme, MPTS (paper sec. 3.3, eq. 3-10).

The image encoder is frozen, so the caller encodes the synthesized images once and hands the patch
features here; only the prompt vectors of a `PromptLearner` (shared prefix G, normal suffix N, anomaly
suffix A) are optimised.

Losses, per minibatch of patch features (B, H', W', D) and masks M'_a (B, H, W):

- Score maps: S' = softmax over [normal, anomaly] of the scaled cosine similarities
  (`mpad.scoring.patch_probabilities`), (B, 2, H', W'), upsampled bilinearly to (B, 2, H, W).
- Anomaly loss (eq. 3-5): L_ano = BCE(S'_n, M'_n) + BCE(S'_a, M'_a) with M'_n = 1 - M'_a (eq. 3), each
  term the *mean* over all pixels of the batch. Eq. 4-5 write a sum over "j | m_j = 1"; taken
  literally for both prompts (LNP over the pixels of M'_n, LAP over those of M'_a) and because the pair
  softmax gives S'_n = 1 - S'_a, the two restricted sums add up to exactly one full-image BCE, and the
  two unrestricted terms are equal. Averaging instead of summing only rescales the gradient.
- Divergence loss (eq. 6-7): L_div = KL(S^M_a || S'_a) + KL(S^M_n || S'_n), each the per-pixel KL of the
  Bernoulli distributions (equal to the KL of the two-class distributions, so both terms are equal),
  averaged over the pixels. S^M are the maps of the current meta prompt; they are constant within a
  meta-epoch and computed once per meta-epoch on the cached features (at patch resolution, upsampled
  per batch exactly like S').

Gradient calibration (eq. 8-10): eq. 8-9 are written per prompt (LAP / LNP), but both prompts share
the prefix G, so the per-prompt gradients are not separable. We read them as one gradient over *all*
learnable vectors (G, N and A flattened and concatenated in that order): G_ano = dL_ano/dtheta and
G_div = dL_div/dtheta. When cos(G_ano, G_div) < 0, G_ano is calibrated (`calibrate`), and the optimiser
steps with the calibrated G_ano only (eq. 10): the divergence loss never enters the step directly.

Meta-epochs: round 0's meta prompt is the hand-written template ensemble (`meta_text_embeddings`);
after each round of `steps` optimiser steps the meta prompt becomes a detached copy of the learned
prompts' text embeddings (LAP^{t+1} / LNP^{t+1}). One Adam optimiser serves all rounds: its moment
estimates are kept across rounds, since the parameters and the task are the same and only the
regulariser's anchor moves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mpad.config import CALIBRATIONS, MptsConfig
from mpad.prompts import PromptLearner, TextEncoder, learned_text_embeddings
from mpad.scoring import patch_probabilities, upsample

_EPS = 1e-6


def calibrate(g_ano: torch.Tensor, g_div: torch.Tensor, lam: float, mode: str = "projection") -> torch.Tensor:
    """Eq. 10: calibrate the anomaly-loss gradient when it conflicts with the divergence gradient.

    g_ano, g_div: gradients of the same shape (flattened over all learnable vectors, see module doc).
    Conflict means cos(g_ano, g_div) < 0; without conflict (or when either gradient is zero, or
    lam = 0) g_ano is returned unchanged (the same tensor).

    mode "projection" (default): g_ano - lam * (g_ano . g_div / |g_div|^2) * g_div, i.e. remove a share
    lam of g_ano's component along g_div (lam = 1: the result is orthogonal to g_div, PCGrad-style).
    mode "literal": eq. 10 as printed, g_ano - lam * cos(g_ano, g_div), the scalar cosine subtracted
    from every component.
    """
    if mode not in CALIBRATIONS:
        raise ValueError(f"mpts.calibration must be one of {CALIBRATIONS}, got {mode!r}")
    if lam == 0:
        return g_ano
    cos = cosine(g_ano, g_div)
    if not cos < 0:
        return g_ano
    if mode == "literal":
        return g_ano - lam * cos
    a, d = g_ano.double(), g_div.double()
    coef = (a * d).sum() / (d * d).sum()
    return (a - lam * coef * d).to(g_ano.dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors read as flat vectors (in float64); 0.0 when either is zero."""
    a, b = a.double().flatten(), b.double().flatten()
    norms = a.norm() * b.norm()
    if norms == 0:
        return 0.0
    return float((a @ b) / norms)


@dataclass
class TrainResult:
    """What `train_prompts` returns.

    history: one dict per step: step, meta_epoch, loss_ano, loss_div, cos (of G_ano and G_div; 0.0 when
        the divergence is off), calibrated (1 when cos < 0 and lam > 0, i.e. eq. 10's first case applied).
    meta_texts: the (2, D) meta text embeddings used in each round (round 0: the given `meta_text`).
    round_texts: the (2, D) learned text embeddings at the end of each round.
    text: (2, D) final learned text embeddings [normal, anomaly], detached.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    meta_texts: list[torch.Tensor] = field(default_factory=list)
    round_texts: list[torch.Tensor] = field(default_factory=list)
    text: torch.Tensor | None = None

    @property
    def final_loss(self) -> float:
        """loss_ano of the last step."""
        return self.history[-1]["loss_ano"] if self.history else float("nan")


def anomaly_loss(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Eq. 3-5: probs (B, 2, H, W) [S'_n, S'_a], masks (B, H, W) M'_a in {0, 1} -> scalar
    BCE(S'_n, 1 - M'_a) + BCE(S'_a, M'_a), each the mean over pixels."""
    s_n, s_a = probs[:, 0], probs[:, 1]
    return F.binary_cross_entropy(s_n, 1 - masks) + F.binary_cross_entropy(s_a, masks)


def divergence_loss(meta_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Eq. 6-7: meta_probs S^M, probs S' (B, 2, H, W) -> scalar KL(S^M_a || S'_a) + KL(S^M_n || S'_n),
    each the per-pixel Bernoulli KL averaged over pixels."""
    total = probs.new_zeros(())
    for c in (1, 0):
        p = meta_probs[:, c].clamp(_EPS, 1 - _EPS)
        q = probs[:, c].clamp(_EPS, 1 - _EPS)
        kl = p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())
        total = total + kl.mean()
    return total


def score_maps(
    features: torch.Tensor, text: torch.Tensor, logit_scale: float | torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """features (B, H', W', D) normalised, text (2, D) -> (B, 2, *size) S' upsampled bilinearly."""
    return upsample(patch_probabilities(features, text, logit_scale), size)


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless minibatch indices: random permutations of range(n), cut into batches of `batch_size`."""
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]


def train_prompts(
    learner: PromptLearner,
    text_encoder: TextEncoder,
    features: torch.Tensor,
    masks: torch.Tensor,
    meta_text: torch.Tensor,
    logit_scale: float | torch.Tensor,
    config: MptsConfig,
    on_step: Callable[[dict[str, float]], Any] | None = None,
) -> TrainResult:
    """Run MPTS on cached features; the learner's vectors are updated in place.

    learner: the prompts to learn (its `general`, `normal`, `anomaly` parameters are optimised).
    text_encoder: the frozen text tower (`TextEncoder`).
    features: (N, H', W', D) L2-normalised patch features of the synthesized images (frozen encoder).
    masks: (N, H, W) anomaly masks M'_a, values in {0, 1} (any dtype; converted to float).
    meta_text: (2, D) normalised text embeddings of the initial meta prompts [MNP, MAP].
    logit_scale: the temperature of the pair softmax (CLIP's exp(logit_scale)).
    config: `MptsConfig`.
    on_step: called with each step's history dict (for logging).

    Every step: S' of the minibatch, L_ano (eq. 3-5) and, unless `config.divergence` is False, L_div
    (eq. 6-7) against the round's meta maps; G_ano, G_div by autograd (eq. 8-9), flattened over all
    vectors; G_ano calibrated (eq. 10) and applied by Adam.
    """
    device = features.device
    features = features.detach()
    masks = masks.to(device=device, dtype=torch.float32)
    size = tuple(masks.shape[-2:])
    n = features.shape[0]
    if masks.shape[0] != n:
        raise ValueError(f"{n} feature maps but {masks.shape[0]} masks")
    params = [learner.general, learner.normal, learner.anomaly]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(n, config.batch_size, generator)
    result = TrainResult()
    meta = meta_text.detach().to(device).clone()
    step = 0
    for round_index in range(config.meta_epochs):
        result.meta_texts.append(meta.cpu().clone())
        meta_grid = None
        if config.divergence:
            with torch.no_grad():  # S^M on the patch grid, fixed for the whole round
                meta_grid = patch_probabilities(features, meta, logit_scale)
        for _ in range(config.steps):
            index = next(batches).to(device)
            text = learned_text_embeddings(learner, text_encoder)
            probs = score_maps(features[index], text, logit_scale, size)
            loss_ano = anomaly_loss(probs, masks[index])
            g_ano = _flat_grad(loss_ano, params, retain=config.divergence)
            cos, calibrated, loss_div_value = 0.0, 0, 0.0
            if config.divergence:
                meta_probs = upsample(meta_grid[index], size)
                loss_div = divergence_loss(meta_probs, probs)
                g_div = _flat_grad(loss_div, params, retain=False)
                cos = cosine(g_ano, g_div)
                calibrated = int(cos < 0 and config.lam > 0)
                g_ano = calibrate(g_ano, g_div, config.lam, config.calibration)
                loss_div_value = float(loss_div.detach())
            _set_grads(params, g_ano)
            optimizer.step()
            record = {
                "step": step,
                "meta_epoch": round_index,
                "loss_ano": float(loss_ano.detach()),
                "loss_div": loss_div_value,
                "cos": cos,
                "calibrated": calibrated,
            }
            result.history.append(record)
            if on_step is not None:
                on_step(record)
            step += 1
        with torch.no_grad():
            end_text = learned_text_embeddings(learner, text_encoder).detach().clone()
        result.round_texts.append(end_text.cpu().clone())
        meta = end_text  # LAP^{t+1} / LNP^{t+1} become the next round's meta prompts
    result.text = result.round_texts[-1].clone() if result.round_texts else meta.cpu().clone()
    return result


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor], retain: bool) -> torch.Tensor:
    """d loss / d params, flattened and concatenated in the order of `params` (zeros where unused)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    pairs = zip(params, grads, strict=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in pairs])


def _set_grads(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write the flat gradient back into each parameter's `.grad`."""
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
