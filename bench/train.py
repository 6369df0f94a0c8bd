"""Where the train stage's time goes: one-time image feature extraction vs the MPTS optimisation loop.

Run: .venv/bin/python bench/train.py [--images 32] [--tiny-steps 300] [--big-steps 4] [--total-steps 300]

For each backbone (random weights, CPU) it times, with the same library calls as `stages/train.py`:
model build, meta prompt ensemble, feature extraction of `--images` synthesized images (64 x 64
striped texture with noise blobs, resized to the model input), and `*-steps` MPTS steps. The loop time
is extrapolated linearly to `--total-steps` (params.yaml default: 3 meta-epochs x 100 steps) where
fewer steps were run; the table says which rows are extrapolated. Numbers depend on the machine and
on whatever else runs on it; they say nothing about detection quality (random weights).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from mpad.clip import load_clip
from mpad.config import LaaConfig
from mpad.features import build_encoder, encode_batched, stack_images
from mpad.mpts import MptsConfig, train_prompts
from mpad.prompts import PromptLearner, TextEncoder, meta_text_embeddings
from mpad.training import ENCODE_BATCH

LAA = LaaConfig(attention="vv", k=2, layers=6, cls="neighbor-cls")


def synth(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 (size, size, 3) striped images with Gaussian noise on a disc, and bool masks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(float)
    base = 0.5 + 0.35 * np.sin(2 * np.pi * (x * 0.9 + y * 0.4) / 9.0)
    base = np.stack([base * 0.8, base * 0.6 + 0.1, 0.3 + 0.2 * base], -1)
    images, masks = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(10, size - 10), rng.uniform(10, size - 10), rng.uniform(5, 14)
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= r**2
        img = np.clip(base + rng.normal(0, 0.2, base.shape) * mask[..., None], 0, 1)
        images.append((img * 255).astype(np.uint8))
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def bench(name: str, images: np.ndarray, masks: np.ndarray, steps: int, total_steps: int) -> dict:
    t0 = time.perf_counter()
    bundle = load_clip(name, "none", device="cpu")
    laa = LAA.model_copy(update={"layers": min(LAA.layers, len(bundle.model.visual.transformer.resblocks))})
    encoder = build_encoder(bundle, laa)
    t_model = time.perf_counter() - t0

    t0 = time.perf_counter()
    meta = meta_text_embeddings(bundle.model, bundle.tokenizer, "carpet")
    t_meta = time.perf_counter() - t0

    t0 = time.perf_counter()
    pixels = stack_images(list(images), bundle.image_size)
    features = encode_batched(encoder, bundle, pixels, ENCODE_BATCH).patch_features
    t_features = time.perf_counter() - t0

    size = tuple(bundle.image_size)
    mask_t = torch.nn.functional.interpolate(torch.from_numpy(masks).float()[:, None], size=size, mode="nearest")[:, 0]
    generator = torch.Generator().manual_seed(0)
    learner = PromptLearner(bundle.model, bundle.tokenizer, "carpet", 4, 2, 2, generator=generator)
    config = MptsConfig(meta_epochs=1, steps=steps, lr=0.002, batch_size=16, seed=0)
    t0 = time.perf_counter()
    scale = float(bundle.model.logit_scale.exp())
    train_prompts(learner, TextEncoder(bundle.model), features, mask_t, meta, scale, config)
    t_loop_run = time.perf_counter() - t0
    t_loop = t_loop_run / steps * total_steps
    return {
        "model": name,
        "input": f"{size[0]}x{size[1]}",
        "model_s": t_model,
        "meta_s": t_meta,
        "features_s": t_features,
        "per_image_ms": 1000 * t_features / len(images),
        "per_step_ms": 1000 * t_loop_run / steps,
        "loop_s": t_loop,
        "extrapolated": steps < total_steps,
        "feature_share": t_features / (t_features + t_loop),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="synthesized images (params: oagm.samples x shots)")
    parser.add_argument("--tiny-steps", type=int, default=300)
    parser.add_argument("--big-steps", type=int, default=4)
    parser.add_argument("--total-steps", type=int, default=300, help="mpts.meta_epochs x mpts.steps")
    parser.add_argument(
        "--models", nargs="+", default=["mpad-tiny", "ViT-B-16-plus-240"], choices=["mpad-tiny", "ViT-B-16-plus-240"]
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, masks = synth(args.images)
    steps = {"mpad-tiny": args.tiny_steps, "ViT-B-16-plus-240": args.big_steps}
    rows = [bench(name, images, masks, steps[name], args.total_steps) for name in args.models]
    load = os.getloadavg()[0]
    print(
        f"\ntrain stage cost, CPU ({torch.get_num_threads()} threads), random weights, {args.images} images, "
        f"{args.total_steps} MPTS steps (batch 16, lambda = 1); load average at the end {load:.1f}\n"
    )
    header = ("model", "input", "build s", "meta s", "features s", "ms/image", "ms/step", "loop s", "feature share")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        loop = f"{r['loop_s']:.1f}" + (" (extrapolated)" if r["extrapolated"] else "")
        print(
            f"| {r['model']} | {r['input']} | {r['model_s']:.1f} | {r['meta_s']:.1f} | {r['features_s']:.2f} | "
            f"{r['per_image_ms']:.1f} | {r['per_step_ms']:.1f} | {loop} | {100 * r['feature_share']:.1f} % |"
        )
    print(
        "\nfeature share = features / (features + loop); model build and the meta prompt ensemble are one-time "
        "costs shown apart. Extrapolated loops: ms/step of the steps run x total steps."
    )


if __name__ == "__main__":
    main()
