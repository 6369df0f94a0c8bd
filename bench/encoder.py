"""Time of the dual-path LAA encoder (eq. 11-12) against a plain open_clip `encode_image`, same model and batch.

For each model (random weights: speed does not depend on them), both arms run in alternating rounds in one
process (bench/harness.py); each arm calls its encoder on a (batch, 3, H, W) input for about `--seconds` a
round. Prints images/second of both and the per-round ratio dual / plain time (target <= 1.3x), then the
SUMMARY line.

    .venv/bin/python bench/encoder.py [--models mpad-tiny,ViT-B-16-plus-240] [--batch 8] [--rounds 5] [--seconds 1]
"""

from __future__ import annotations

import argparse

import torch
from harness import alternate, median, ratio, repeat, summary  # bench/harness.py: python puts bench/ first on the path

from mpad.clip import load_clip
from mpad.config import LaaConfig
from mpad.features import build_encoder

MODELS = "mpad-tiny,ViT-B-16-plus-240"
SETTINGS = LaaConfig(attention="vv", k=2, layers=6, cls="neighbor-cls")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS, help="comma-separated open_clip names or mpad-tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="time of an arm in a round (calls repeated)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, laa {SETTINGS}")
    print(f"{'model':<20} {'plain img/s':>12} {'dual img/s':>12} {'dual/plain time':>28}")
    figures = []
    for name in args.models.split(","):
        bundle = load_clip(name, "none", "cpu")
        depth = len(bundle.model.visual.transformer.resblocks)
        encoder = build_encoder(bundle, SETTINGS.model_copy(update={"layers": min(SETTINGS.layers, depth)}))
        images = torch.randn(args.batch, 3, *bundle.image_size)

        times = alternate(
            args.rounds,
            {
                "plain": repeat(args.seconds, bundle.model.encode_image, images),
                "dual": repeat(args.seconds, encoder, images),
            },
        )
        per_image = {arm: median(t) / args.batch for arm, t in times.items()}
        dual_plain = ratio(times["dual"], times["plain"])
        print(f"{name:<20} {1 / per_image['plain']:>12.1f} {1 / per_image['dual']:>12.1f} {dual_plain!s:>28}")
        figures.append(f"{name} dual/plain time {dual_plain}")
    summary("encoder", *figures, f"batch {args.batch}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
