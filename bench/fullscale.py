"""The paper-setting pipeline at MVTec AD's scale on a stand-in dataset: where the time of a full run goes.

Run: .venv/bin/python bench/fullscale.py [--fraction 0.1] [--categories carpet,screw] [--device cpu|cuda]
     [--precision fp32|fp16|bf16] [--jobs N] [--weights checkpoint|none] [--set key=value ...]
     [--out results.json] [--keep]

Generates an MVTec-shaped stand-in (bench/standin.py: the 15 categories' names, image sizes and
test-split proportions times --fraction) in a temporary project folder, whose params.yaml is this
checkout's (the paper's setting: ViT-B-16-plus-240, 1 shot, 3x100 MPTS steps) with random weights (no
download): by default saved once as a checkpoint file that `model.pretrained` names, so that every stage
reads its weights from disk as a real run does (`--weights none`: built from the seed, no read),
`dataset.name: folder` on the stand-in, the device and precision; --set adds overrides. Each stage command
runs as its own process (bench/stagerun.py, no DVC); `--jobs N` runs the categories' chains N at a time
with cores // N threads each, as `make run JOBS=N` does. Per stage it prints the wall time split into a
fixed cost (process start to the first item, less that item), a per-item cost (train: optimiser step,
evaluate: test image, synthesize: shot) and a tail (after the loop: writing outputs, evaluate's overlays
and metrics), items/s, peak RSS of the process, on CUDA torch's peak allocated GPU memory, and the
machine's load average as the stages ended (other work on the machine slows them); then the fixed cost of
each model stage split into imports, model build, weight read, prompt ensembles, feature pass and the rest
(bench/phases.py). Then the projected time of the full MVTec AD 1-shot run (15 categories, 1725 test
images): measured categories with their own costs, the others with the measured means; with --jobs N each
category's two units of work (sample to train, then evaluate) go to N workers by mpad/runs/units.py's rule
(`makespan`: the category with the most units left, then params order), as `make run JOBS=N` runs them.
Synthesize does the same work per category at any fraction; evaluate's loop scales with the category's test
images, its tail is counted as fixed (its metrics grow with the images but take
seconds: docs/decisions.md, pixel metrics); train's loop scales with params.yaml's meta_epochs x steps, so that
`--set mpts.steps=20` measures the cost per step in a shorter run. Dataset generation is timed apart,
outside the stage timings.

Then the machine's limit (bench/limits.py, issue 33), in this process with the threads each stage had: the
matrix-product peak; the FLOPs of train's step and of evaluate's image, and the GFLOP/s each achieved as a
fraction of the peak; and evaluate's whole per-image cost against the detector alone on the same images
(`--limit-images` of the first category's test images, repeated where it has fewer), all alternating in
`--rounds` rounds. The last line is `SUMMARY fullscale: ...` (bench/harness.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import stagerun
import standin
from harness import median, summary

from mpad.config import SECTIONS, TABLE_ORDER
from mpad.data import MVTEC_CATEGORIES, MVTEC_TEXTURES, list_split
from mpad.runs.units import makespan, work_units

STAGES = ("fetch", "sample", "synthesize", "train", "evaluate", "summarize")
MODEL_STAGES = ("synthesize", "train", "evaluate")
PHASES = ("imports", "build", "weights", "ensemble", "features", "other")
PHASE_LABELS = ("imports", "model build", "weight read", "prompt ensemble", "feature pass", "other")


def split(run: dict[str, Any], timing: dict[str, Any] | None, phases: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add fixed / per-item / tail seconds to a run from its StageProgress line (if the stage has a bar), and
    the fixed cost's phases from its bench/phases.py line (calls that ended before the first item)."""
    if timing is None:  # no progress bar: all of it is fixed cost
        return {**run, "items": 0, "fixed": run["wall"], "per_item": None, "tail": 0.0, "loop_items": 0, "loop": 0.0}
    n, first_n = timing["n"], timing.get("first_n", 1)
    loop_items, loop = n - first_n, timing["end"] - timing["first"]
    per_item = loop / loop_items if loop_items > 0 else None
    fixed = timing["first"] - run["spawn"] - (first_n * per_item if per_item else 0.0)
    split_phases = None
    if phases is not None:
        spent = {
            p: sum(end - start for name, start, end in phases["calls"] if name == p and end <= timing["first"])
            for p in ("build", "weights", "ensemble", "features")
        }
        spent["build"] -= spent["weights"]  # the weight read happens inside create_model
        split_phases = {"imports": phases["imported"] - run["spawn"], **spent}
        split_phases["other"] = fixed - sum(split_phases.values())
    return {
        **run,
        "unit": timing["unit"],
        "items": n,
        "fixed": fixed,
        "phases": split_phases,
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


def per_category(runs: list[dict[str, Any]], full_steps: int) -> dict[str, dict[str, float]]:
    """Projected seconds of each category's stages in the full 1-shot run on MVTec AD: {category: {stage: s}}.
    Evaluate's loop scales with the category's test images, train's with `full_steps` optimiser steps (so a
    run with fewer steps projects params.yaml's), the other stages take what they took (or the mean)."""
    full = {c: sum(standin.TEST[c]) for c in TABLE_ORDER}
    items = {"evaluate": full, "train": dict.fromkeys(full, full_steps)}
    out: dict[str, dict[str, float]] = {c: {} for c in full}
    for stage in stagerun.CATEGORY_STAGES:
        rs = {r["args"][2]: r for r in runs if r["stage"] == stage}
        if stage not in items:
            mean = statistics.mean(r["wall"] for r in rs.values())
            for c in full:
                out[c][stage] = rs[c]["wall"] if c in rs else mean
            continue
        # s / item; unknown where every item came in the first batch (evaluate: too few test images)
        rates = [r["per_item"] for r in rs.values() if r["per_item"] is not None]
        rate = statistics.mean(rates) if rates else float("nan")
        fixed = statistics.mean(r["fixed"] + r["tail"] for r in rs.values())
        for c, n in items[stage].items():
            own = rs.get(c)
            out[c][stage] = own["fixed"] + own["tail"] + (own["per_item"] or rate) * n if own else fixed + rate * n
    return out


def project(runs: list[dict[str, Any]], full_steps: int, jobs: int = 1) -> dict[str, float]:
    """Projected seconds per stage of the full 1-shot run on MVTec AD (all 15 categories; with jobs > 1 the
    per-category stages' sums are worker-seconds) and "total": its wall time with `jobs` workers."""
    categories = per_category(runs, full_steps)
    once = {s: next(r["wall"] for r in runs if r["stage"] == s) for s in ("fetch", "summarize")}
    out = {s: once[s] if s in once else sum(c[s] for c in categories.values()) for s in STAGES}
    units = {c: [sum(costs[s] for s in unit) for unit in work_units(list(costs))] for c, costs in categories.items()}
    out["total"] = once["fetch"] + makespan(units, jobs) + once["summarize"]
    return out


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(stages: dict[str, dict[str, Any]], projection: dict[str, float], wall: float, jobs: int) -> str:
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
    rows.append(
        f"| **total** | | | {wall:.1f} | | | | | | | | **{projection['total']:.0f}** "
        f"({projection['total'] / 60:.1f} min) |"
    )
    if jobs > 1:
        rows.append(
            f"\n{jobs} jobs: the stage rows are process-seconds (their sum exceeds the wall time); the total row "
            "is the pipeline's wall time, and the projection's with the categories dealt to the workers"
        )
    return "\n".join(rows)


def phase_table(runs: list[dict[str, Any]]) -> str:
    """Mean fixed cost of each model stage, split into its phases (bench/phases.py)."""
    rows = ["| stage | " + " | ".join(f"{label} s" for label in PHASE_LABELS) + " | fixed s |", "|---" * 8 + "|"]
    for stage in MODEL_STAGES:
        rs = [r for r in runs if r["stage"] == stage and r.get("phases")]
        if rs:
            means = [statistics.mean(r["phases"][p] for r in rs) for p in PHASES]
            fixed = statistics.mean(r["fixed"] for r in rs)
            rows.append(f"| {stage} | " + " | ".join(f"{m:.1f}" for m in means) + f" | {fixed:.1f} |")
    return "\n".join(rows)


def save_random_checkpoint(name: str, path: Path) -> None:
    """The model's random weights (mpad.clip's seed) as a state-dict file, in a child process."""
    code = (
        "import sys, torch; from mpad.clip import load_clip; "
        "torch.save(load_clip(sys.argv[1], 'none').model.state_dict(), sys.argv[2])"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stagerun.REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code, name, str(path)], env=env, check=True, capture_output=True)


def machine_limit(
    params: dict[str, Any], root: Path, category: str, stages: dict[str, dict[str, Any]], args: argparse.Namespace
) -> str:
    """Print the machine's limit (bench/limits.py) after the pipeline; return the SUMMARY figures."""
    import torch  # here, not at the top: the stages run without this process holding torch
    from limits import measure

    from mpad.clip import load_clip

    threads = max(1, len(os.sched_getaffinity(0)) // args.jobs)  # what stagerun gives each stage (worker_env)
    torch.set_num_threads(threads)
    model, laa, prompts, mpts, scoring, evaluate = (
        SECTIONS[name].from_params(params[name]) for name in ("model", "laa", "prompts", "mpts", "scoring", "evaluate")
    )
    bundle = load_clip(model.name, "none", model.device, model.precision)
    samples = list(itertools.islice(itertools.cycle(list_split(root, category, "test")), args.limit_images))
    found = measure(bundle, laa, prompts, mpts, scoring, evaluate, samples, args.rounds)
    peak = median(found.peak_gflops)
    step_s, evaluate_s, detector_s = median(found.step), median(found.evaluate), median(found.detector)
    train_fraction = found.fraction(found.step_gflop, found.step)
    evaluate_fraction = found.fraction(found.image_gflop, found.evaluate)
    ratio = found.evaluate_over_detector()
    lines = [
        f"{model.precision} matrix-product peak (torch.mm {found.peak_n}^2): {peak:.1f} GFLOP/s "
        f"({min(found.peak_gflops):.1f}-{max(found.peak_gflops):.1f} over {args.rounds} rounds), {threads} threads",
        f"train step: {found.step_gflop:.1f} GFLOP (FlopCounterMode), {step_s:.3f} s (the train stage above: "
        f"{fmt(stages['train']['per_item'], '.3f')} s): {found.step_gflop / step_s:.1f} GFLOP/s, "
        f"{train_fraction} of the peak",
        f"evaluate image: {found.image_gflop:.1f} GFLOP; evaluate's loop on {category}'s test images "
        f"({found.images} after the first batch) {evaluate_s:.3f} s an image (the evaluate stage above: "
        f"{fmt(stages['evaluate']['per_item'], '.3f')} s): {evaluate_fraction} of the peak; the detector alone "
        f"{detector_s:.3f} s: {found.fraction(found.image_gflop, found.detector)}",
        f"evaluate / detector alone, s an image: {ratio} (target <= 1.1x)",
    ]
    print("\nthe machine's limit (bench/limits.py):\n" + "\n".join(f"- {line}" for line in lines))
    return (
        f"of the {model.precision} matrix-product peak ({peak:.0f} GFLOP/s, {threads} threads) train step "
        f"{train_fraction}, evaluate image {evaluate_fraction}, evaluate/detector alone per image {ratio}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.1, help="share of MVTec AD's image counts")
    parser.add_argument("--categories", default=",".join(MVTEC_CATEGORIES), help="comma-separated subset")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--jobs", type=int, default=1, help="categories at a time (make run JOBS=N)")
    parser.add_argument(
        "--weights", default="checkpoint", choices=("checkpoint", "none"), help="random weights read from a file"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra params override")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project folder")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the machine-limit measurements")
    parser.add_argument(
        "--limit-images", type=int, default=48, help="test images of evaluate / detector alone (3 batches of 16)"
    )
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
            f"model.device={args.device}",
            f"model.precision={args.precision}",
            *args.set,
        ]
        params = stagerun.make_project(folder, overrides)
        batch = params["evaluate"]["batch_size"]
        if args.limit_images <= batch:
            sys.exit(
                f"--limit-images {args.limit_images}: one evaluate batch ({batch}) or fewer, and the machine limit "
                "times the images after the first batch: give more"
            )
        if args.weights == "checkpoint":
            checkpoint = folder / "random-weights.pt"
            save_random_checkpoint(params["model"]["name"], checkpoint)
            params = stagerun.make_project(folder, [*overrides, f"model.pretrained={checkpoint}"])
            weights = f"random weights read from a {checkpoint.stat().st_size / 2**20:.0f} MiB checkpoint file"
        else:
            params = stagerun.make_project(folder, [*overrides, "model.pretrained=none"])
            weights = "random weights built from the seed (no weight read)"
        timings = folder / "timings.jsonl"
        start = time.perf_counter()
        runs = stagerun.run_pipeline(folder, categories, timings, jobs=args.jobs)
        wall = time.perf_counter() - start
        by_pid, phases = stagerun.read_timings(timings), stagerun.read_timings(stagerun.phases_file(timings))
        runs = [split(r, by_pid.get(r["pid"]), phases.get(r["pid"])) for r in runs]
        stages = summarize_stages(runs)
        full_steps = stagerun.PAPER["mpts"]["meta_epochs"] * stagerun.PAPER["mpts"]["steps"]
        projection = project(runs, full_steps, args.jobs)
        print(
            f"\n{params['model']['name']} on {args.device} {args.precision}, {weights}, categories "
            f"{', '.join(categories)}, fraction {args.fraction}, {args.jobs} job(s), "
            f"{len(os.sched_getaffinity(0))} cores:\n"
        )
        print(table(stages, projection, wall, args.jobs))
        print("\nfixed cost per model stage process (mean s), split:\n")
        print(phase_table(runs))
        if any(s != s for s in projection.values()):
            print(
                "\nwarning: no per-image time measured (each category's test images all came in the first batch):"
                " raise --fraction or lower evaluate.batch_size"
            )
        dominant = max(STAGES, key=lambda s: projection[s])
        work = sum(projection[s] for s in STAGES)
        shares = ", ".join(f"{s} {100 * projection[s] / work:.0f} %" for s in STAGES if projection[s] >= 0.005 * work)
        print(
            f"\nprojected full MVTec AD 1-shot run (15 categories, 1725 test images, {args.jobs} job(s)): "
            f"{projection['total']:.0f} s = {projection['total'] / 60:.1f} min; of the process time: {shares}"
        )
        limit = machine_limit(params, folder / "data" / "standin", categories[0], stages, args)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            result = {
                "config": {**vars(args), "out": str(args.out), "categories": categories, "overrides": overrides},
                "model": params["model"],
                "counts": counts,
                "generation_s": generation,
                "wall_s": wall,
                "runs": runs,
                "stages": stages,
                "projection_s": projection,
                "dominant": dominant,
            }
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        summary(
            "fullscale",
            f"projected full MVTec AD 1-shot run {projection['total'] / 60:.1f} min ({args.jobs} job(s), "
            f"{params['model']['name']}, {args.device} {args.precision})",
            limit,
        )
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
