"""Do the learned prompts generalise? Hand-written vs learned prompts vs the memory branch on generated data.

Run: .venv/bin/python bench/learning.py [--seeds 0 1 2] [--steps 50] [--threads 1]
     [--stop fixed|converged] [--tolerance 0.01] [--window 10]

Offline-preset settings (mpad-tiny, random weights, 64 px input, LAA vv k=2 on the last 2 blocks, OAGM
blobs sigma 0.25, 32 samples, MPTS lambda 1, 3 meta-epochs x `--steps` (with `--stop converged`: at most,
each ending once its smoothed loss stops improving, `--tolerance` / `--window` as mpts.tolerance / window),
memory layers [2, 4], maps at 96 px smoothed with sigma 1.5). Per case (a generated category and its defect
kinds) and seed: one normal shot, 10 good and 12 defective test images drawn at the category's full size, then:

- `hand`: the hand-written prompt ensembles (the initial meta prompts; Table 1's baseline);
- `learned`: MPTS on OAGM's set, noise added at the model's input size (the pipeline);
- `learned-full`: MPTS on an OAGM set whose noise is added at the shot's full size, then resized
  (suspect 1: test defects are drawn at full size and downsampled);
- `probe`: a linear probe (logistic regression, weight + bias, free in R^D) on the same synthesized set's
  LAA patch features. A prompt pair scores a patch by sigmoid(scale * f . (t_a - t_n)): a linear function of
  f without bias, with t_a, t_n confined to what the text tower can output. The probe is therefore at
  least as expressive as any prompt pair trained on these data;
- `learned-small`: MPTS on an OAGM set with blobs 4x smaller (semi-axes 0.02-0.075 of the image side
  instead of 0.08-0.3: about one 8x8-pixel patch, like the test defects; suspect 2);
- `learned-mixed`: blob semi-axes from 0.02 to 0.3 (both sizes);
- `oracle`: the same probe (label 1: a patch holding any defect pixel) fitted on 48 further defective
  and 16 good images of the test's own generator (other draws): how well the best *linear* reading of
  these features separates these defects, an estimate of the ceiling for any prompt pair, whatever it
  is learned from;
- `memory`: the memory branch alone (nearest normal patch of the shot, original-path tokens);
- `fused`: learned + memory, harmonic mean (the pipeline with memory.enabled).

Cases: `own` defect kinds are those of the generated dataset (scratch, hole, stain / missing piece);
`held-out` are kinds it never contains (thin dark scratches, small colour spots, noise added at full
resolution), on the held-out `grain` texture (192 px) and on `stripes`. Pixel AUROC over all test
pixels; image AUROC with the map's maximum. Random weights: the numbers say whether the machinery
learns and generalises, nothing about CLIP's semantics.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from mpad import oagm as oagm_module
from mpad.clip import load_clip
from mpad.config import LaaConfig, MptsConfig, OagmConfig, PromptsConfig
from mpad.data import synthetic
from mpad.data.catalog import SYNTHETIC_TEXTURES
from mpad.data.shots import stable_hash
from mpad.evaluation import resize_mask
from mpad.features import build_encoder, encode_batched, stack_images
from mpad.memory import build_memory, fuse_maps
from mpad.metrics import auroc
from mpad.oagm import synthesize_set
from mpad.object_masks import object_masks
from mpad.prompts import meta_text_embeddings
from mpad.scoring import anomaly_maps, gaussian_blur
from mpad.training import learn_prompts

MODEL = "mpad-tiny"
LAA = LaaConfig(attention="vv", k=2, layers=2, cls="neighbor-cls")
MEMORY_LAYERS = [2, 4]
RESOLUTION, SMOOTHING = 96, 1.5
N_GOOD, N_BAD = 10, 12
N_ORACLE_GOOD, N_ORACLE_BAD = 16, 48
SMALL_BLOBS = (0.02, 0.075)
MIXED_BLOBS = (0.02, 0.3)
CASES = (
    ("stripes", "own", synthetic.DEFECTS["stripes"]),
    ("weave", "own", synthetic.DEFECTS["weave"]),
    ("disc", "own", synthetic.DEFECTS["disc"]),
    ("grain", "held-out", synthetic.HELD_OUT_DEFECTS),
    ("stripes", "held-out", synthetic.HELD_OUT_DEFECTS),
)
METHODS = ("hand", "learned", "learned-full", "learned-small", "learned-mixed", "probe", "oracle", "memory", "fused")


def rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def draw_images(category: str, kinds: tuple[str, ...], rng: np.random.Generator, n_good: int, n_bad: int):
    """(images (H, W, 3) uint8, masks (H, W) bool, labels) at the category's full size."""
    images, masks, labels = [], [], []
    for j in range(n_good + n_bad):
        r = synthetic.render(category, rng, None if j < n_good else kinds[(j - n_good) % len(kinds)])
        images.append(rgb(r.image))
        masks.append(r.mask)
        labels.append(int(j >= n_good))
    return images, masks, np.array(labels)


def draw_case(category: str, kinds: tuple[str, ...], seed: int, tag: str):
    """(shot, (test images, masks, labels), (oracle's training images, masks, labels))."""
    rng = np.random.default_rng([seed, stable_hash(f"{category}/{tag}")])
    shot = rgb(synthetic.render(category, rng).image)
    test = draw_images(category, kinds, rng, N_GOOD, N_BAD)
    return shot, test, draw_images(category, kinds, rng, N_ORACLE_GOOD, N_ORACLE_BAD)


@contextmanager
def blob_sizes(size_range: tuple[float, float] | None):
    """Within: OAGM draws blobs with `size_range` (bench only; the pipeline has no such parameter)."""
    original = oagm_module.random_blobs
    if size_range is not None:
        oagm_module.random_blobs = partial(original, size_range=size_range)
    try:
        yield
    finally:
        oagm_module.random_blobs = original


def oagm_set(
    bundle,
    shot: np.ndarray,
    category: str,
    oagm: OagmConfig,
    full_size: bool,
    size_range: tuple[float, float] | None = None,
):
    """OAGM's (images, masks) from one shot, noise at the model's input size or at the shot's own size."""
    size = shot.shape[:2] if full_size else bundle.image_size
    image = stack_images([shot], size)
    texture = category in SYNTHETIC_TEXTURES + synthetic.HELD_OUT_CATEGORIES
    masks = object_masks(image, category, "border", 0.5, texture=texture)
    with blob_sizes(size_range):
        samples = [s for shot_samples in synthesize_set(image, masks, category, oagm) for s in shot_samples]
    return [s.image for s in samples], [s.mask.astype(np.float32) for s in samples]


def maps_at(patch_features: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    return anomaly_maps(patch_features, text, scale, (RESOLUTION, RESOLUTION))


def fit_probe(
    features: torch.Tensor, masks: torch.Tensor, steps: int = 300, hard: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression of patch features (N, h, w, D) on the masks' area fractions per patch (soft labels;
    hard: 1 for a patch with any defect pixel), positives and negatives weighted equally. Returns (w (D,), b)."""
    h, w = features.shape[1:3]
    target = F.interpolate(masks[:, None].float(), size=(h, w), mode="area")[:, 0].reshape(-1)
    if hard:
        target = (target > 0).float()
    x = features.reshape(-1, features.shape[-1])
    pos = float(target.sum().clamp_min(1e-6))
    weight = torch.where(target > 0, 0.5 * len(target) / pos, 0.5 * len(target) / (len(target) - pos + 1e-6))
    wv = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([wv, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ wv + b, target, weight=weight) + 1e-4 * wv.square().sum()
        loss.backward()
        opt.step()
    return wv.detach(), b.detach()


def probe_maps(features: torch.Tensor, wv: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    logits = (features @ wv + b)[:, None]
    return F.interpolate(logits.sigmoid(), size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)[:, 0]


def scores(maps: torch.Tensor, gt: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    maps = gaussian_blur(maps, SMOOTHING)
    return auroc(maps.flatten(), gt.flatten()), auroc(maps.flatten(1).amax(1), labels)


def run_case(bundle, encoder, category: str, tag: str, kinds, seed: int, steps: int, stop: dict) -> dict:
    shot, (images, masks, labels), (o_images, o_masks, _) = draw_case(category, kinds, seed, tag)
    gt = torch.stack([resize_mask(m, RESOLUTION) for m in masks])
    test = encode_batched(encoder, bundle, stack_images(images, bundle.image_size), 32)
    scale = float(bundle.model.logit_scale.exp())
    oagm = OagmConfig(samples=32, sigma=0.25, clean_fraction=0.2, seed=seed)
    mpts = MptsConfig(meta_epochs=3, steps=steps, lr=0.002, batch_size=16, seed=seed, **stop)
    prompts = PromptsConfig()
    maps: dict[str, torch.Tensor] = {}
    maps["hand"] = maps_at(test.patch_features, meta_text_embeddings(bundle.model, bundle.tokenizer, category), scale)
    info: dict[str, float] = {}
    for name, full, size_range in (
        ("learned", False, None),
        ("learned-full", True, None),
        ("learned-small", False, SMALL_BLOBS),
        ("learned-mixed", False, MIXED_BLOBS),
    ):
        syn_images, syn_masks = oagm_set(bundle, shot, category, oagm, full, size_range)
        learned = learn_prompts(bundle, category, syn_images, syn_masks, LAA, prompts, mpts)
        maps[name] = maps_at(test.patch_features, learned.result.text.float(), scale)
        info[f"{name}_loss"] = learned.result.final_loss
        info[f"{name}_steps"] = sum(learned.result.round_steps)
        if name == "learned":
            syn_features = encode_batched(encoder, bundle, stack_images(syn_images, bundle.image_size), 32)
            wv, b = fit_probe(syn_features.patch_features, torch.from_numpy(np.stack(syn_masks)))
            maps["probe"] = probe_maps(test.patch_features, wv, b)
            info["train_fraction"] = float(np.mean([m.mean() for m in syn_masks if m.any()]))
    # oracle: the probe fitted on other draws of the test's own generator
    o_features = encode_batched(encoder, bundle, stack_images(o_images, bundle.image_size), 32).patch_features
    o_masks_t = torch.from_numpy(np.stack([m.astype(np.float32) for m in o_masks]))
    o_masks_t = F.interpolate(o_masks_t[:, None], size=tuple(bundle.image_size), mode="area")[:, 0]
    wv, b = fit_probe(o_features, o_masks_t, hard=True)
    oracle = probe_maps(test.patch_features, wv, b)
    maps["oracle"] = oracle
    memory = build_memory(bundle, LAA, stack_images([shot], bundle.image_size), MEMORY_LAYERS)
    mem = memory.memory_map(test.intermediates)[:, None]
    maps["memory"] = F.interpolate(mem, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)[:, 0]
    maps["fused"] = fuse_maps(maps["learned"], maps["memory"], "harmonic")
    result = {m: scores(maps[m], gt, labels) for m in METHODS}
    info["test_fraction"] = float(np.mean([g.float().mean() for g, y in zip(gt, labels, strict=True) if y]))
    return {"pixel": {m: r[0] for m, r in result.items()}, "image": {m: r[1] for m, r in result.items()}, **info}


def span(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=50, help="MPTS steps per meta-epoch (offline preset: 50)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stop", choices=("fixed", "converged"), default="fixed", help="as mpts.stop")
    parser.add_argument("--tolerance", type=float, default=0.01, help="as mpts.tolerance")
    parser.add_argument("--window", type=int, default=10, help="as mpts.window")
    args = parser.parse_args()
    stop = {"stop": args.stop, "tolerance": args.tolerance, "window": args.window}
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bundle = load_clip(MODEL, "none", device="cpu")
    encoder = build_encoder(bundle, LAA, intermediate_layers=MEMORY_LAYERS)
    rows = []
    for category, tag, kinds in CASES:
        runs = [run_case(bundle, encoder, category, tag, kinds, seed, args.steps, stop) for seed in args.seeds]
        rows.append((category, tag, runs))
        print(
            f"[{time.perf_counter() - start:.0f} s] {category}/{tag}: "
            + ", ".join(f"{m} {span([r['pixel'][m] for r in runs])}" for m in METHODS),
            flush=True,
        )
    elapsed = time.perf_counter() - start
    steps = f"3 x {args.steps} MPTS steps"
    if args.stop == "converged":
        steps += f" at most (stop converged, tolerance {args.tolerance}, window {args.window})"
    print(
        f"\npixel AUROC, mean (min-max) over seeds {args.seeds}; {MODEL}, random weights, "
        f"{steps}; {elapsed:.0f} s, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| category | defects | "
        + " | ".join(METHODS)
        + " | learned - hand (min) | memory - learned (max) | learned steps |"
    )
    print("|" + "---|" * (len(METHODS) + 5))
    for category, tag, runs in rows:
        gain = min(r["pixel"]["learned"] - r["pixel"]["hand"] for r in runs)
        gap = max(r["pixel"]["memory"] - r["pixel"]["learned"] for r in runs)
        cells = " | ".join(span([r["pixel"][m] for r in runs]) for m in METHODS)
        used = [r["learned_steps"] for r in runs]
        steps_cell = f"{np.mean(used):.0f} ({min(used)}-{max(used)})"
        print(f"| {category} | {tag} | {cells} | {gain:+.2f} | {gap:+.2f} | {steps_cell} |")
    print("\nper seed, pixel AUROC: hand / learned / oracle / memory\n")
    print("| category | defects | " + " | ".join(f"seed {seed}" for seed in args.seeds) + " |")
    print("|" + "---|" * (len(args.seeds) + 2))
    for category, tag, runs in rows:
        cells = [" / ".join(f"{r['pixel'][m]:.2f}" for m in ("hand", "learned", "oracle", "memory")) for r in runs]
        print(f"| {category} | {tag} | " + " | ".join(cells) + " |")
    print("\nimage AUROC (score = the map's maximum), mean (min-max)\n")
    print("| category | defects | " + " | ".join(METHODS) + " |")
    print("|" + "---|" * (len(METHODS) + 2))
    for category, tag, runs in rows:
        print(f"| {category} | {tag} | " + " | ".join(span([r["image"][m] for r in runs]) for m in METHODS) + " |")
    print(
        "\nanomalous fraction of an image: OAGM training blobs vs test defects (8x8 patch grid: one patch = "
        "1/64 = 0.016)\n"
    )
    for category, tag, runs in rows:
        print(
            f"- {category}/{tag}: train {np.mean([r['train_fraction'] for r in runs]):.3f}, "
            f"test {np.mean([r['test_fraction'] for r in runs]):.4f}"
        )


if __name__ == "__main__":
    main()
