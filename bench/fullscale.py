"""The paper-setting pipeline at MVTec AD's scale on a stand-in dataset: where the time of a full run goes.

Run: .venv/bin/python bench/fullscale.py [--fraction 0.1] [--categories carpet,screw] [--device cpu|cuda]
     [--precision fp32|fp16|bf16] [--set key=value ...] [--out results.json] [--keep]

Generates an MVTec-shaped stand-in (bench/standin.py: the 15 categories' names, image sizes and
test-split proportions times --fraction) in a temporary project folder, whose params.yaml is this
checkout's (the paper's setting: ViT-B-16-plus-240, 1 shot, 3x100 MPTS steps) with `model.pretrained:
none` (random weights: no download), `dataset.name: folder` on the stand-in, the device and precision;
--set adds overrides. Each stage command runs as its own process (bench/stagerun.py, no DVC). Per stage
it prints the wall time split into a fixed cost (process start to the first item, less that item), a
per-item cost (train: optimiser step, evaluate: test image, synthesize: shot) and a tail (after the
loop: writing outputs, evaluate's overlays and metrics), items/s, peak RSS of the process, on CUDA
torch's peak allocated GPU memory, and the machine's load average as the stages ended (other work on
the machine slows them). Then the projected time of the full MVTec AD 1-shot run (15 categories, 1725
test images): measured categories with their own costs, the others with the measured means. Train and
synthesize do the same work per category at any fraction; evaluate's loop scales with the category's
test images, its tail is counted as fixed (its metrics grow with the images but take seconds: see
bench/metrics.py). Dataset generation is timed apart, outside the stage timings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import stagerun
import standin

from mpad.data import MVTEC_CATEGORIES, MVTEC_TEXTURES

STAGES = ("fetch", "sample", "synthesize", "train", "evaluate", "summarize")
SCALES_WITH_TEST = ("evaluate",)


def split(run: dict[str, Any], timing: dict[str, Any] | None) -> dict[str, Any]:
    """Add fixed / per-item / tail seconds to a run from its StageProgress line (if the stage has a bar)."""
    if timing is None:  # no progress bar: all of it is fixed cost
        return {**run, "items": 0, "fixed": run["wall"], "per_item": None, "tail": 0.0, "loop_items": 0, "loop": 0.0}
    n, first_n = timing["n"], timing.get("first_n", 1)
    loop_items, loop = n - first_n, timing["end"] - timing["first"]
    per_item = loop / loop_items if loop_items > 0 else None
    fixed = timing["first"] - run["spawn"] - (first_n * per_item if per_item else 0.0)
    return {
        **run,
        "unit": timing["unit"],
        "items": n,
        "fixed": fixed,
        "per_item": per_item,
        "tail": run["exit"] - timing["end"],
        "loop_items": loop_items,
        "loop": loop,
        "cuda_max_mib": timing.get("cuda_max_mib"),
    }


def summarize_stages(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for stage in STAGES:
        rs = [r for r in runs if r["stage"] == stage]
        loop_items = sum(r["loop_items"] for r in rs)
        per_item = sum(r["loop"] for r in rs) / loop_items if loop_items else None
        gpu = [r["cuda_max_mib"] for r in rs if r.get("cuda_max_mib") is not None]
        out[stage] = {
            "runs": len(rs),
            "unit": rs[0].get("unit"),
            "items": sum(r["items"] for r in rs),
            "wall": sum(r["wall"] for r in rs),
            "fixed_mean": statistics.mean(r["fixed"] for r in rs),
            "per_item": per_item,
            "items_per_s": 1 / per_item if per_item else None,
            "tail_mean": statistics.mean(r["tail"] for r in rs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "cuda_max_mib": max(gpu) if gpu else None,
            "load1_mean": statistics.mean(r.get("load1", float("nan")) for r in rs),
        }
    return out


def project(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Projected seconds per stage of the full 1-shot run on MVTec AD (all 15 categories)."""
    full = {c: sum(standin.TEST[c]) for c in MVTEC_CATEGORIES}
    out: dict[str, float] = {}
    for stage in STAGES:
        rs = {r["args"][2] if len(r["args"]) > 2 else None: r for r in runs if r["stage"] == stage}
        if None in rs:  # fetch, summarize: once
            out[stage] = rs[None]["wall"]
            continue
        if stage not in SCALES_WITH_TEST:
            mean = statistics.mean(r["wall"] for r in rs.values())
            out[stage] = sum(rs[c]["wall"] if c in rs else mean for c in full)
            continue

        # s / test image; unknown where every image came in the first batch (too few test images)
        rates = [r["per_item"] for r in rs.values() if r["per_item"] is not None]
        rate = statistics.mean(rates) if rates else float("nan")
        fixed = statistics.mean(r["fixed"] + r["tail"] for r in rs.values())
        out[stage] = sum(
            rs[c]["fixed"] + rs[c]["tail"] + (rs[c]["per_item"] or rate) * n if c in rs else fixed + rate * n
            for c, n in full.items()
        )
    out["total"] = sum(out.values())
    return out


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(stages: dict[str, dict[str, Any]], projection: dict[str, float]) -> str:
    rows = [
        "| stage | runs | items | wall s | fixed s (mean) | s / item | items/s | tail s (mean) | peak RSS MiB "
        "| peak GPU MiB | load | projected full run s |",
        "|---" * 12 + "|",
    ]
    for stage, s in stages.items():
        items = f"{s['items']:g} {s['unit']}" if s["unit"] else "-"
        rows.append(
            f"| {stage} | {s['runs']} | {items} | {s['wall']:.1f} | {s['fixed_mean']:.1f} | "
            f"{fmt(s['per_item'], '.3f')} | {fmt(s['items_per_s'])} | {s['tail_mean']:.1f} | "
            f"{s['peak_rss_mib']:.0f} | {fmt(s['cuda_max_mib'], '.0f')} | {s['load1_mean']:.1f} | "
            f"{projection[stage]:.0f} |"
        )
    total = sum(s["wall"] for s in stages.values())
    rows.append(
        f"| **total** | | | {total:.1f} | | | | | | | | **{projection['total']:.0f}** "
        f"({projection['total'] / 60:.1f} min) |"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.1, help="share of MVTec AD's image counts")
    parser.add_argument("--categories", default=",".join(MVTEC_CATEGORIES), help="comma-separated subset")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra params override")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project folder")
    args = parser.parse_args()
    categories = [c for c in args.categories.split(",") if c]
    unknown = set(categories) - set(MVTEC_CATEGORIES)
    if unknown:
        sys.exit(f"unknown categories {sorted(unknown)}; choose among {', '.join(MVTEC_CATEGORIES)}")

    folder = Path(tempfile.mkdtemp(prefix="mpad-fullscale-"))  # outside any git repo: dvclive looks for one
    try:
        t0 = time.perf_counter()
        counts = standin.generate(folder / "data" / "standin", categories, args.fraction)
        generation = time.perf_counter() - t0
        print(f"stand-in: {counts} (train, good, defective) in {generation:.1f} s -> {folder}", flush=True)
        textures = [c for c in categories if c in MVTEC_TEXTURES]
        overrides = [
            "dataset.name=folder",
            "dataset.root=data/standin",
            f"dataset.categories=[{','.join(categories)}]",
            f"dataset.textures=[{','.join(textures)}]",
            "model.pretrained=none",
            f"model.device={args.device}",
            f"model.precision={args.precision}",
            *args.set,
        ]
        params = stagerun.make_project(folder, overrides)
        timings = folder / "timings.jsonl"
        runs = stagerun.run_pipeline(folder, categories, timings)
        by_pid = stagerun.read_timings(timings)
        runs = [split(r, by_pid.get(r["pid"])) for r in runs]
        stages = summarize_stages(runs)
        projection = project(runs)
        print(
            f"\n{params['model']['name']} on {args.device} {args.precision}, categories {', '.join(categories)}, "
            f"fraction {args.fraction}:\n"
        )
        print(table(stages, projection))
        if any(s != s for s in projection.values()):
            print(
                "\nwarning: no per-image time measured (each category's test images all came in the first batch):"
                " raise --fraction or lower evaluate.batch_size"
            )
        dominant = max(STAGES, key=lambda s: projection[s])
        print(
            f"\nprojected full MVTec AD 1-shot run (15 categories, 1725 test images): {projection['total']:.0f} s "
            f"= {projection['total'] / 60:.1f} min; {dominant} dominates "
            f"({100 * projection[dominant] / projection['total']:.0f} %)"
        )
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            result = {
                "config": {**vars(args), "out": str(args.out), "categories": categories, "overrides": overrides},
                "model": params["model"],
                "counts": counts,
                "generation_s": generation,
                "runs": runs,
                "stages": stages,
                "projection_s": projection,
                "dominant": dominant,
            }
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
