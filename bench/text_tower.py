"""The MPTS step's text tower, alternating in one process, on 16 synthetic 240 px feature maps: a whole step's losses
and gradients (eq. 3-9, no Adam) computed three ways, the first two as earlier versions did:
- plain: the whole prompts through the tower, one backward pass per gradient (G_ano, G_div);
- shared: the shared prefix computed once (`TextEncoder.forward_shared`), still two backward passes;
- step: what training runs (`mpad.mpts._step_gradients`): the shared prefix, and the tower run once over two copies
  of the vectors with one backward pass for both gradients; the losses at full resolution and their gradients in
  few passes (`mpad.log_maps.training_losses`; the first two use `score_maps` and autograd).
Prints seconds per step and the ratios to plain.

Run: .venv/bin/python bench/text_tower.py [--backbone ViT-B-16-plus-240] [--threads 1] [--repeats 3]
Random weights: the timings do not depend on them.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mpad.clip import load_clip
from mpad.log_maps import MapTargets, score_maps
from mpad.mpts import _flatten, _step_gradients, anomaly_loss, divergence_loss
from mpad.prompts import PromptLearner, TextEncoder, learned_text_embeddings


def seconds(work, n: int = 8) -> float:
    work()
    start = time.perf_counter()
    for _ in range(n):
        work()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="ViT-B-16-plus-240")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_clip(args.backbone, "none", device="cpu")
    learner = PromptLearner(bundle.model, bundle.tokenizer, "metal_nut", 4, 2, 2, torch.Generator().manual_seed(0))
    encoder = TextEncoder(bundle.model)
    params = [learner.general, learner.normal, learner.anomaly]
    width = learned_text_embeddings(learner, encoder).shape[-1]
    grid, side = bundle.image_size[0] // 16, bundle.image_size[0]
    features = F.normalize(torch.randn(16, grid, grid, width, generator=torch.Generator().manual_seed(1)), dim=-1)
    masks = (torch.rand(16, side, side, generator=torch.Generator().manual_seed(2)) > 0.9).float()
    meta = F.normalize(learned_text_embeddings(learner, encoder).detach() + 0.01, dim=-1)
    targets = MapTargets.build(masks, grid)

    def two_passes() -> None:
        text = learned_text_embeddings(learner, encoder)
        log_maps = score_maps(features, text, 100.0, (side, side))
        _flatten(torch.autograd.grad(anomaly_loss(log_maps, masks), params, retain_graph=True), params)
        with torch.no_grad():
            meta_maps = score_maps(features, meta, 100.0, (side, side))
        _flatten(torch.autograd.grad(divergence_loss(meta_maps, log_maps), params), params)

    def step() -> None:
        _step_gradients(learner, encoder, features, targets, torch.arange(16), meta, 100.0, True)

    print(
        f"{args.backbone}, {args.threads} thread(s); seconds a step: plain, shared, step; shared / plain, step / plain"
    )
    for _ in range(args.repeats):
        encoder.shares_prefix = False
        plain = seconds(two_passes)
        encoder.shares_prefix = True
        shared, now = seconds(two_passes), seconds(step)
        print(f"{plain:.3f}  {shared:.3f}  {now:.3f};  {shared / plain:.2f}  {now / plain:.2f}")


if __name__ == "__main__":
    main()
