"""Meta-guiding Prompt-tuning Scheme, MPTS (paper sec. 3.3, eq. 3-10); how the paper is read: docs/method.md.

The image encoder is frozen: the caller encodes the synthesized images once and hands their patch features
(N, H', W', D) and anomaly masks M'_a (N, H, W) here; only the vectors of a `PromptLearner` (shared prefix G,
normal suffix N, anomaly suffix A) are optimised.

- `anomaly_loss` (eq. 3-5) and `divergence_loss` (eq. 6-7) define the losses on log score maps (B, 2, H, W)
  (`mpad.log_maps.score_maps`); a step computes the same numbers and their gradients in fewer passes
  (`mpad.log_maps.training_losses`, tested against them). See docs/method.md#anomaly-loss and
  docs/method.md#divergence-loss.
- `calibrate` (eq. 10) on G_ano, G_div (eq. 8-9), each one flat gradient over all learnable vectors (G, N, A
  in that order; docs/method.md#calibration). The optimiser steps with the calibrated G_ano only.
- `train_prompts`: `meta_epochs` rounds; after each, the meta prompt becomes the learned prompts' text
  embeddings (docs/method.md#meta-epochs). One Adam optimiser serves all rounds.
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

    g_ano, g_div: gradients of the same shape (flat over all learnable vectors). Conflict means
    cos(g_ano, g_div) < 0; without conflict (or when either gradient is zero, or lam = 0) g_ano is returned
    unchanged (the same tensor). Modes (docs/method.md#calibration):
    "projection": g_ano - lam * (g_ano . g_div / |g_div|^2) * g_div (lam = 1: orthogonal to g_div);
    "literal": g_ano - lam * cos(g_ano, g_div), eq. 10 as printed (its effect depends on the loss's scale);
    "literal-rms": g_ano - lam * cos(g_ano, g_div) * rms(g_ano), rms = |g_ano| / sqrt(n).
    "projection" and "literal-rms" are scale-equivariant in g_ano and invariant to the scale of g_div.
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
    # Eq. 4 and eq. 5 are the same number (docs/method.md#anomaly-loss): computed once, bitwise what the two terms
    # summed were (their sums commute exactly, and doubling is exact), in half the full-resolution passes.
    bce = -(m_n * log_n + masks * log_a).mean()
    return bce + bce  # eq. 4 + eq. 5


def divergence_loss(meta_log_maps: torch.Tensor, log_maps: torch.Tensor) -> torch.Tensor:
    """Eq. 6-7: log S^M, log S' (B, 2, H, W) -> scalar KL(S^M_a || S'_a) + KL(S^M_n || S'_n), each the
    per-pixel Bernoulli KL averaged over pixels; both equal the KL of the pair [n, a].

    Written as sum_c p_c (log p_c - log q_c) + q_c - p_c (p = S^M, q = S'): its gradient in log q_c is
    q_c - p_c, exactly 0 where the two maps are equal (docs/method.md#divergence-loss)."""
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
