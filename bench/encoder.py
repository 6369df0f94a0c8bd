"""Throughput of the dual-path LAA encoder against a plain open_clip `encode_image`, same model and batch.

Prints images/second of both and their ratio (dual-path time / plain time; target <= 1.3x) for mpad-tiny
and ViT-B-16-plus-240, with random weights (speed does not depend on the weights). Both are timed in the
same process, interleaved, best of several repeats, so the ratio is robust to machine load.

    .venv/bin/python bench/encoder.py [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from mpad.clip import load_clip
from mpad.config import LaaConfig
from mpad.features import build_encoder

MODELS = ("mpad-tiny", "ViT-B-16-plus-240")
SETTINGS = LaaConfig(attention="vv", k=2, layers=6, cls="neighbor-cls")


def best_time(fn, images: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, laa {SETTINGS}")
    print(f"{'model':<20} {'plain img/s':>12} {'dual img/s':>12} {'dual/plain time':>16}")
    for name in MODELS:
        bundle = load_clip(name, "none", "cpu")
        depth = len(bundle.model.visual.transformer.resblocks)
        encoder = build_encoder(bundle, SETTINGS.model_copy(update={"layers": min(SETTINGS.layers, depth)}))
        images = torch.randn(args.batch, 3, *bundle.image_size)
        bundle.model.encode_image(images)  # warm-up
        encoder(images)
        plain = dual = float("inf")
        for _ in range(2):  # interleave so both see the same machine state
            plain = min(plain, best_time(bundle.model.encode_image, images, args.repeats))
            dual = min(dual, best_time(encoder, images, args.repeats))
        print(f"{name:<20} {args.batch / plain:>12.1f} {args.batch / dual:>12.1f} {dual / plain:>15.2f}x")


if __name__ == "__main__":
    main()
