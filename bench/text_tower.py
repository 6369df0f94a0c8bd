"""The MPTS step's text tower with and without the shared prefix (`TextEncoder.forward_shared`), alternating in one
process: the tower's forward and two backward passes (G_ano and G_div, eq. 8-9), and a whole step's losses and
gradients (eq. 3-9) on 16 synthetic 240 px feature maps; prints seconds and the ratio shared / plain.

Run: .venv/bin/python bench/text_tower.py [--backbone ViT-B-16-plus-240] [--threads 1] [--repeats 3]
Random weights: the timings do not depend on them.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mpad.clip import load_clip
from mpad.mpts import _flat_grad, anomaly_loss, divergence_loss, score_maps
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

    def tower() -> None:
        text = learned_text_embeddings(learner, encoder)
        for retain in (True, False):
            torch.autograd.grad(text, params, torch.ones_like(text), retain_graph=retain)

    def step() -> None:
        log_maps = score_maps(features, learned_text_embeddings(learner, encoder), 100.0, (side, side))
        _flat_grad(anomaly_loss(log_maps, masks), params, True)
        with torch.no_grad():
            meta_maps = score_maps(features, meta, 100.0, (side, side))
        _flat_grad(divergence_loss(meta_maps, log_maps), params, False)

    print(f"{args.backbone}, {args.threads} thread(s); seconds: plain, shared, shared / plain")
    for name, work in (("tower forward + 2 backward", tower), ("MPTS step (no Adam)", step)):
        for _ in range(args.repeats):
            encoder.shares_prefix = False
            plain = seconds(work)
            encoder.shares_prefix = True
            shared = seconds(work)
            print(f"{name:28s} {plain:.3f}  {shared:.3f}  {shared / plain:.2f}")


if __name__ == "__main__":
    main()
