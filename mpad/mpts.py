"""Meta-guiding Prompt-tuning Scheme, MPTS (paper sec. 3.3, eq. 3-10).

The image encoder is frozen, so the caller encodes the synthesized images once and hands the patch
features here; only the prompt vectors of a `PromptLearner` (shared prefix G, normal suffix N, anomaly
suffix A) are optimised.

Losses, per minibatch of patch features (B, H', W', D) and masks M'_a (B, H, W):

The definitions are `score_maps`, `anomaly_loss` and `divergence_loss`; a step computes the same numbers and
their gradients in fewer passes over the full-resolution maps (`mpad.log_maps.training_losses`, tested
against them).

- Score maps, in log space (`score_maps`): log S' = log_softmax over [normal, anomaly] of the scaled
  cosine similarities on the patch grid (B, 2, H', W'), then upsampled to (B, 2, H, W) by
  `log_upsample`: the log of the *probabilities* upsampled bilinearly, computed without leaving log
  space (bilinear weights are a convex combination, so each pixel is a log-sum-exp of log weight + log
  probability). exp(log S') is therefore the evaluation map (`mpad.scoring.anomaly_maps`, its anomaly
  channel) to float rounding: training fits the map that is evaluated. The alternative, upsampling the
  logit difference and taking its log-sigmoid, would make the trained map differ from the evaluated one
  between patch centres, or change the evaluation maps. Nothing is clamped: a probability below float
  precision still has a finite log and a gradient.
- Anomaly loss (eq. 3-5): L_ano = BCE(S'_n, M'_n) + BCE(S'_a, M'_a) with M'_n = 1 - M'_a (eq. 3), each
  term the *mean* over all pixels of the batch, written with log S'_n and log S'_a only (log(1 - S'_a) =
  log S'_n: the pair sums to one). Eq. 4-5 write a sum over "j | m_j = 1"; taken literally for both
  prompts (LNP over the pixels of M'_n, LAP over those of M'_a) and because S'_n = 1 - S'_a, the two
  restricted sums add up to exactly one full-image BCE, and the two unrestricted terms are equal.
  Averaging instead of summing only rescales the gradient.
- Divergence loss (eq. 6-7): L_div = KL(S^M_a || S'_a) + KL(S^M_n || S'_n), each the per-pixel KL of the
  Bernoulli distributions (equal to the KL of the two-class distributions, so both terms are equal),
  averaged over the pixels, from log S^M and log S'. S^M are the maps of the current meta prompt, fixed
  within a meta-epoch and computed per minibatch like S'. At the start of a later meta-epoch the learned
  prompt's text embeddings equal the meta prompt's bit for bit (both come from the same tower pass), so
  the maps are equal and L_div and G_div are exactly 0: the step then skips the divergence. For one
  patch (no interpolation), the derivative of its KL with respect to the logit difference logit_a -
  logit_n is S'_a - S^M_a however far the learned map saturates; clamping the probabilities to
  [1e-6, 1 - 1e-6] would zero it beyond a logit gap of 13.8 (a cosine gap of 0.138 at CLIP's logit
  scale 100), switching the calibration off exactly where the learned prompt has drifted furthest from
  the meta prompt.

Gradient calibration (eq. 8-10): eq. 8-9 are written per prompt (LAP / LNP), but both prompts share
the prefix G, so the per-prompt gradients are not separable. We read them as one gradient over *all*
learnable vectors (G, N and A flattened and concatenated in that order): G_ano = dL_ano/dtheta and
G_div = dL_div/dtheta. When cos(G_ano, G_div) < 0, G_ano is calibrated (`calibrate`), and the optimiser
steps with the calibrated G_ano only (eq. 10): the divergence loss never enters the step directly.
Eq. 10 as printed ("literal") subtracts a scalar from every coordinate, so its effect depends on the
loss normalisation; "literal-rms" is a pixel-count-free version of it (see `calibrate`).
Adam rescales each coordinate by its own running RMS, so what eq. 10 guarantees (e.g. orthogonality to
G_div for "projection" with lambda = 1) holds for the gradient handed to Adam, not for the update.

Meta-epochs: round 0's meta prompt is the hand-written template ensemble (`meta_text_embeddings`);
after each round of `steps` optimiser steps the meta prompt becomes a detached copy of the learned
prompts' text embeddings (LAP^{t+1} / LNP^{t+1}). The paper runs "until the loss converges"; with
`stop = "converged"` a round ends early once its smoothed anomaly loss has stopped improving
(`converged`; `steps` is then the cap). The anomaly loss is the one watched: it is what the step
descends, while the divergence loss only calibrates it and restarts from 0 in every round. One Adam
optimiser serves all rounds: its moment estimates are kept across rounds, since the parameters and the
task are the same and only the regulariser's anchor moves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mpad.config import CALIBRATIONS, MptsConfig
from mpad.log_maps import MapTargets, training_losses
from mpad.prompts import PromptLearner, TextEncoder, text_embeddings_of


def calibrate(g_ano: torch.Tensor, g_div: torch.Tensor, lam: float, mode: str = "projection") -> torch.Tensor:
    """Eq. 10: calibrate the anomaly-loss gradient when it conflicts with the divergence gradient.

    g_ano, g_div: gradients of the same shape (flattened over all learnable vectors, see module doc).
    Conflict means cos(g_ano, g_div) < 0; without conflict (or when either gradient is zero, or
    lam = 0) g_ano is returned unchanged (the same tensor).

    mode "projection" (default): g_ano - lam * (g_ano . g_div / |g_div|^2) * g_div, i.e. remove a share
    lam of g_ano's component along g_div (lam = 1: the result is orthogonal to g_div, PCGrad-style).
    mode "literal": eq. 10 as printed, g_ano - lam * cos(g_ano, g_div), the scalar cosine subtracted
    from every component. cos is scale-free but g_ano is not: its size follows the loss normalisation
    (the mean over pixels here; eq. 4-5's sums would make it pixel-count times larger), so the same lam
    shifts the gradient a lot or next to nothing depending on that choice. Not a neutral ablation.
    mode "literal-rms": g_ano - lam * cos(g_ano, g_div) * rms(g_ano), rms = |g_ano| / sqrt(n): the literal
    shift measured in units of g_ano's RMS coordinate (its norm is lam * |cos| * |g_ano|, the norm the
    projection removes at the same lam). Scaling the loss by c scales the result by c, so with Adam
    (scale-free up to its eps) the training does not depend on the pixel normalisation.

    "projection" and "literal-rms" are scale-equivariant in g_ano and invariant to the scale of g_div.
    Adam divides each coordinate by its own running RMS: the properties above (e.g. orthogonality at
    lam = 1) hold for the gradient handed to Adam, not for the parameter update.
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
    if mode == "literal-rms":
        return (a - lam * cos * a.norm() / a.numel() ** 0.5).to(g_ano.dtype)
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
    round_steps: the optimiser steps each round took (`steps`, or fewer with stop "converged").
    text: (2, D) final learned text embeddings [normal, anomaly], detached.
    """

    history: list[dict[str, float]] = field(default_factory=list)
    meta_texts: list[torch.Tensor] = field(default_factory=list)
    round_texts: list[torch.Tensor] = field(default_factory=list)
    round_steps: list[int] = field(default_factory=list)
    text: torch.Tensor | None = None

    @property
    def final_loss(self) -> float:
        """loss_ano of the last step."""
        return self.history[-1]["loss_ano"] if self.history else float("nan")


def anomaly_loss(log_maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Eq. 3-5: log_maps (B, 2, H, W) [log S'_n, log S'_a] (`score_maps`), masks (B, H, W) M'_a in {0, 1}
    -> scalar BCE(S'_n, M'_n) + BCE(S'_a, M'_a), each the mean over pixels (log(1 - S'_a) = log S'_n)."""
    log_n, log_a = log_maps[:, 0], log_maps[:, 1]
    m_n = 1 - masks  # eq. 3
    # Eq. 4 and eq. 5 are the same number (module docstring): computed once, bitwise what the two terms summed
    # were (their sums commute exactly, and doubling is exact), in half the full-resolution passes.
    bce = -(m_n * log_n + masks * log_a).mean()
    return bce + bce  # eq. 4 + eq. 5


def divergence_loss(meta_log_maps: torch.Tensor, log_maps: torch.Tensor) -> torch.Tensor:
    """Eq. 6-7: log S^M, log S' (B, 2, H, W) -> scalar KL(S^M_a || S'_a) + KL(S^M_n || S'_n), each the
    per-pixel Bernoulli KL averaged over pixels; both equal the KL of the pair [n, a].

    Written as sum_c p_c (log p_c - log q_c) + q_c - p_c (p = S^M, q = S'), the KL since both pairs sum
    to one: its gradient in log q_c is q_c - p_c, bounded, non-zero however small q_c is, and exactly 0
    where the two maps are equal (the first step of every later meta-epoch), where rounding noise would
    otherwise hand `calibrate` a random G_div."""
    p, q = meta_log_maps.exp(), log_maps.exp()
    kl = (p * (meta_log_maps - log_maps) + q - p).sum(dim=1).mean()
    return kl + kl  # eq. 6 + eq. 7


def converged(losses: Sequence[float], window: int, tolerance: float) -> bool:
    """Whether a round's per-step losses have stopped improving: the mean of the last `window` is at most
    `tolerance` (relative) below the mean of the `window` before them. False before 2 * window losses.
    Minibatch losses are noisy; the window means smooth them."""
    if len(losses) < 2 * window:
        return False
    before = sum(losses[-2 * window : -window]) / window
    last = sum(losses[-window:]) / window
    return before - last <= tolerance * abs(before)


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
    vectors; G_ano calibrated (eq. 10) and applied by Adam. A round takes `config.steps` steps, or with
    `config.stop` "converged" ends after the step where `converged` holds for its L_ano values.
    """
    device = features.device
    features = features.detach()
    n = features.shape[0]
    if masks.shape[0] != n:
        raise ValueError(f"{n} feature maps but {masks.shape[0]} masks")
    targets = MapTargets.build(masks.to(device=device, dtype=torch.float32), features.shape[1])
    params = [learner.general, learner.normal, learner.anomaly]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(n, config.batch_size, generator)
    result = TrainResult()
    meta = meta_text.detach().to(device).clone()
    step = 0
    for round_index in range(config.meta_epochs):
        result.meta_texts.append(meta.cpu().clone())
        round_losses: list[float] = []
        for _ in range(config.steps):
            index = next(batches).to(device)
            g_ano, g_div, loss_ano, loss_div = _step_gradients(
                learner, text_encoder, features[index], targets, index, meta, logit_scale, config.divergence
            )
            cos, calibrated, loss_div_value = 0.0, 0, 0.0
            if config.divergence:
                cos = cosine(g_ano, g_div)
                calibrated = int(cos < 0 and config.lam > 0)
                g_ano = calibrate(g_ano, g_div, config.lam, config.calibration)
                loss_div_value = float(loss_div)
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
            round_losses.append(record["loss_ano"])
            if config.stop == "converged" and converged(round_losses, config.window, config.tolerance):
                break
        result.round_steps.append(len(round_losses))
        with torch.no_grad():  # as the step computes its text: the next round starts bitwise at its meta prompt
            end_text = text_embeddings_of(learner, text_encoder, [params, params])[0].clone()
        result.round_texts.append(end_text.cpu().clone())
        meta = end_text  # LAP^{t+1} / LNP^{t+1} become the next round's meta prompts
    result.text = result.round_texts[-1].clone() if result.round_texts else meta.cpu().clone()
    return result


def _step_gradients(
    learner: PromptLearner,
    text_encoder: TextEncoder,
    features: torch.Tensor,
    targets: MapTargets,
    index: torch.Tensor,
    meta: torch.Tensor,
    logit_scale: float | torch.Tensor,
    divergence: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One minibatch's (G_ano, G_div, L_ano, L_div) (eq. 3-9): features (B, H', W', D) of the images `index` of
    `targets`; G_div and L_div are zeros without `divergence`, and exactly zero where the learned text embeddings
    equal the meta prompt's (a later meta-epoch's first step: equal maps, so KL and its gradient are 0).

    G_ano and G_div are the gradients of two losses through the same text tower. Run as two backward passes, each
    would read all of the tower's weights again for a handful of token rows (the tower's cost here is reading its
    weights, not the arithmetic). Instead the tower runs once on two copies of the vectors, the learner's own and
    detached twins of them (`text_embeddings_of`: one set of matrix products), each loss is differentiated
    down to the text embeddings only (`training_losses`: a few values), and one backward pass through the tower
    takes L_ano's cotangent into the first copy and L_div's into the second: the learner's vectors get G_ano, the
    twins G_div. Without `divergence` the second cotangent is zero, so that lambda = 0 trains bitwise as divergence
    off."""
    params = [learner.general, learner.normal, learner.anomaly]
    twins = [p.detach().clone().requires_grad_() for p in params]
    texts = text_embeddings_of(learner, text_encoder, [params, twins])  # (2 copies, 2, D)
    text = texts[0].detach()
    against = meta if divergence and not torch.equal(text, meta) else None
    loss_ano, loss_div, c_ano, c_div = training_losses(
        features, text.requires_grad_(), against, logit_scale, targets, index
    )
    grads = torch.autograd.grad(texts, [*params, *twins], torch.stack([c_ano, c_div]), allow_unused=True)
    g_ano, g_div = _flatten(grads[:3], params), _flatten(grads[3:], twins)
    return g_ano, g_div, loss_ano, loss_div


def _flatten(grads: Sequence[torch.Tensor | None], params: list[torch.Tensor]) -> torch.Tensor:
    """Gradients of `params`, flattened and concatenated in their order (zeros where unused)."""
    pairs = zip(params, grads, strict=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in pairs])


def _set_grads(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write the flat gradient back into each parameter's `.grad`."""
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
