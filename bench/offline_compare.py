"""The offline preset on other devices / precisions against a reference run: same metrics, same maps?

Run: python bench/offline_compare.py --configs cpu:fp32,cuda:fp32,cuda:fp16 [--set key=value ...] [--out f.json]

Each config DEVICE:PRECISION gets a temporary project with presets/offline.txt and model.device /
model.precision applied, and runs every stage there (bench/stagerun.py; the configs run concurrently).
Then each project's learned prompts score its categories' test images in-process with the evaluate
stage's own functions (Detector, run_detector), on its device and precision, for the anomaly maps
(probabilities in [0, 1]). Every config is compared with the first: |metric difference| in points (%)
and the mean / max |map difference|. Exit status 1 when a tolerance (TOLERANCE) is exceeded; of the metrics,
only the pixel-level ones are gated (GATED: why the image-level ones are not).

Tolerances. Identical random weights on every device (open_clip initialises on the CPU, tested in
tests/test_cuda.py), so only rounding differs. Measured on the CPU (`make gpu-dry`, 3 x 10 steps): a
second fp32 run gives identical maps and metrics; bf16 (8 significant bits) moves the maps by 0.9e-3 to
2.2e-3 on average (2.6e-2 at most) and the metrics by up to 2.8 points (image-level metrics over a few
dozen test images: one swapped pair moves them by points), in a later run the pixel metrics by at most 0.5.
Hence bf16: maps 1e-2, pixel metrics 5 points;
fp16 (11 bits, 8x finer than bf16): maps 5e-3, metrics 5 points; fp32 on a GPU differs from the CPU
in summation order and in TF32 convolutions (torch's default, 10 bits, the patch embedding only):
maps 2e-3, metrics 1 point.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import stagerun
import torch

TOLERANCE = {"fp32": (1.0, 2e-3), "fp16": (5.0, 5e-3), "bf16": (5.0, 1e-2)}  # (metric points, mean |map diff|)
# The pixel-level metrics are gated; the image-level ones (image AUROC, AP, F1-max) are printed only: over the
# offline preset's 12 test images a category has 36 (good, defective) pairs, so one pair of near-equal image
# scores that swaps order moves image AUROC by 2.8 points, and which pairs are near-equal depends on the data,
# not on the precision (a bf16 run swapped two: 5.6 points, with every pixel metric within 0.5).
GATED = ("pixel_auroc", "aupro", "pixel_ap", "pixel_f1_max")


def run_config(config: str, folder: Path, extra: list[str]) -> dict[str, Any] | None:
    """Run the pipeline for one DEVICE:PRECISION in `folder`; None (and the error printed) when a stage fails."""
    try:
        return _run_config(config, folder, extra)
    except RuntimeError as err:
        print(f"{config}: FAILED\n{err}", flush=True)
        return None


def _run_config(config: str, folder: Path, extra: list[str]) -> dict[str, Any]:
    device, precision = config.split(":")
    project = folder
    params = stagerun.make_project(
        project, [*stagerun.preset("offline"), f"model.device={device}", f"model.precision={precision}", *extra]
    )
    categories = params["dataset"]["categories"]
    stagerun.run_pipeline(project, categories, echo=False)
    print(f"{config}: pipeline done", flush=True)
    return {
        "project": project,
        "params": params,
        "categories": categories,
        "metrics": {c: json.loads((project / "metrics" / f"{c}.json").read_text()) for c in categories},
    }


def maps(run: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The anomaly maps of every test image, by category, from the run's learned prompts."""
    from mpad.clip import backbone_identity, load_clip
    from mpad.config import ScoringConfig
    from mpad.data import list_split
    from mpad.detector import Detector
    from mpad.evaluation import run_detector
    from mpad.prompt_file import PromptsFile

    params, project = run["params"], run["project"]
    model = params["model"]
    bundle = load_clip(model["name"], model["pretrained"], model["device"], model["precision"])
    out = {}
    for category in run["categories"]:
        record = PromptsFile.load(project / "data/prompts" / f"{category}.pt", expect_model=backbone_identity(bundle))
        detector = Detector.from_prompts(bundle, record, ScoringConfig.from_params(params["scoring"]))
        samples = list_split(project / params["dataset"]["root"], category, "test")
        out[category] = run_detector(detector, samples, params["evaluate"]["resolution"], 8).maps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="cpu:fp32,cuda:fp32,cuda:fp16", help="DEVICE:PRECISION, first = reference")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra params override")
    parser.add_argument("--out", type=Path, help="write the comparison as JSON here")
    args = parser.parse_args()
    configs = args.configs.split(",")
    with tempfile.TemporaryDirectory(prefix="mpad-offline-") as tmp:
        folders = [Path(tmp) / f"{i}-{c.replace(':', '-')}" for i, c in enumerate(configs)]
        with ThreadPoolExecutor(len(configs)) as pool:
            runs = list(pool.map(lambda c, f: run_config(c, f, args.set), configs, folders))
        all_maps = [maps(r) if r is not None else None for r in runs]
    reference, report = configs[0], []
    failed = any(r is None for r in runs)
    if runs[0] is None:
        sys.exit(1)
    for i, config in enumerate(configs[1:], 1):
        if runs[i] is None:
            continue
        points, map_tol = TOLERANCE[config.split(":")[1]]
        for category in runs[i]["categories"]:
            ref_m, m = runs[0]["metrics"][category], runs[i]["metrics"][category]
            metric_diff = max(abs(m[k] - ref_m[k]) for k in GATED if isinstance(ref_m.get(k), float))
            image_diff = max((abs(m[k] - ref_m[k]) for k in ref_m if k.startswith("image_")), default=0.0)
            diff = (all_maps[i][category] - all_maps[0][category]).abs()
            ok = metric_diff <= points and float(diff.mean()) <= map_tol
            failed |= not ok
            report.append(
                {
                    "config": config,
                    "category": category,
                    "max_metric_diff_points": metric_diff,
                    "max_image_metric_diff_points": image_diff,
                    "map_mean_abs_diff": float(diff.mean()),
                    "map_max_abs_diff": float(diff.max()),
                    "tolerance": [points, map_tol],
                    "ok": ok,
                    "metrics": m,
                    "reference_metrics": ref_m,
                }
            )
            print(
                f"{config:>10} vs {reference} {category:>8}: pixel metrics within {metric_diff:6.3f} points "
                f"(<= {points}; image metrics {image_diff:.3f}, not gated), "
                f"maps mean |diff| {float(diff.mean()):.2e} (<= {map_tol:.0e}), max {float(diff.max()):.2e}"
                f"  {'ok' if ok else 'FAIL'}"
            )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
