"""Where evaluate's time goes: its per-image cost against the detector alone, on images of MVTec AD's sizes.

1. (default) In one process, same torch threads, alternating rounds (bench/harness.py), on the test images of a
   stand-in category at its MVTec AD size (bench/standin.py: carpet is 1024x1024 RGB PNG), ViT-B-16-plus-240 with
   random weights, maps at `--resolution`:
     detector     `Detector` (LAA encoder, maps, smoothing, image scores) on the images already decoded and resized,
                  batches of `--batch`: the detector alone
     decode       evaluate's data loading alone (mpad.evaluation.batches, no worker process): decode, resize, masks
     evaluate wN  `run_detector` with evaluate.workers N, as the evaluate stage runs it: N = 0 decodes in threads
                  between the model's batches, N > 0 in DataLoader processes alongside it
     sequential   what workers 0 did before those threads: decode on the calling thread (torch's threads for the
                  resize), then the model
   It prints each arm's wall and CPU seconds per image (medians over rounds; CPU: this process and its ended
   DataLoader workers) and each arm's wall and CPU time / the detector alone's, per round: median (min-max).
   Target (issue 33): evaluate's per-image cost (wall) at most 1.1x the detector's. On a machine that other work
   loads, the wall ratio follows the scheduler's share (more processes, more share) and varies from round to
   round; the CPU ratio still says how much work evaluate does outside the model.
2. `--memory`: peak memory of the evaluate loop + `category_metrics` on a 200-image category resized to
   240x240, in a fresh subprocess: ru_maxrss at the end minus ru_maxrss after imports, model load and detector
   build, with the kernel's peak mark reset there (/proc/self/clear_refs), since model load's transient peak
   (~400 MiB above steady state for the big model) would otherwise hide the loop's.
   ViT-B-16-plus-240 unless `--quick` or it runs past `--mem-timeout`, then mpad-tiny; the output says which.
3. `--e2e`: the offline preset end to end, `dvc repro` in a temporary git copy of the project (tests/e2e.py),
   with wall time and per-stage times from the "Running stage" lines.

    .venv/bin/python bench/evaluate.py [--images 16] [--rounds 3] [--workers 0,2] [--category carpet]
    .venv/bin/python bench/evaluate.py --images 48 --rounds 5 --category screw   # the fuller setting
    .venv/bin/python bench/evaluate.py --memory --e2e

The default (16 images, 3 rounds) takes about 3 minutes on 2 cores. The text prompts are the meta prompt
ensemble (no training needed; speed does not depend on them). Numbers depend on the machine and on what else
runs on it (the load average is printed); the ratios are taken per round, so both arms see the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import standin
import torch
from harness import alternate, median, ratio, summary
from PIL import Image
from torch.utils.data import DataLoader

from mpad import evaluation
from mpad.clip import load_clip
from mpad.config import LaaConfig, ScoringConfig
from mpad.data import list_split, load_image
from mpad.data.synthetic import generate
from mpad.detector import Detector
from mpad.features import stack_images
from mpad.prompt_file import PromptsFile
from mpad.prompts import meta_text_embeddings

ROOT = Path(__file__).resolve().parents[1]
TINY, BIG = "mpad-tiny", "ViT-B-16-plus-240"
# laa.layers: the offline preset's 2 for mpad-tiny (4 blocks), params.yaml's 6 for the big model.
LAYERS = {TINY: 2, BIG: 6}
LAA = LaaConfig(attention="vv", k=2, cls="neighbor-cls")


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def make_detector(name: str, category: str, sigma: float) -> Detector:
    bundle = load_clip(name, "none", "cpu")
    depth = len(bundle.model.visual.transformer.resblocks)
    text = meta_text_embeddings(bundle.model, bundle.tokenizer, category)
    laa = LAA.model_copy(update={"layers": min(LAYERS.get(name, 6), depth)})
    prompts = PromptsFile(category=category, model={}, sizes=(0, 1, 1), vectors={}, text=text, laa=laa)
    return Detector(bundle, prompts, ScoringConfig(smoothing_sigma=sigma, image_score="max"))


def spread(samples: list, n: int) -> list:
    """n samples evenly spread over the split (good and defect ones alike)."""
    if n >= len(samples):
        return samples
    return [samples[i] for i in np.linspace(0, len(samples) - 1, n).round().astype(int)]


# ---------------------------------------------------------------- 1. time split
def standin_samples(root: Path, category: str, n: int) -> list:
    """n test samples of a stand-in `category` at its MVTec AD size, good and defective ones in MVTec's mix."""
    standin.generate(root, [category], min(1.0, n / sum(standin.TEST[category])))
    return spread(list_split(root, category, "test"), n)


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its children that ended (DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def with_cpu(fn: Callable[[], object], into: list[float]) -> Callable[[], None]:
    """fn, appending its CPU seconds to `into` and returning None, so that the harness takes its wall time."""

    def run() -> None:
        start = cpu_seconds()
        fn()
        into.append(cpu_seconds() - start)

    return run


@torch.no_grad()
def time_split(samples: list, category: str, args: argparse.Namespace, workers: list[int]) -> None:
    detector = make_detector(BIG, category, args.sigma)
    size = (args.resolution, args.resolution)
    pixels = stack_images([load_image(s.image) for s in samples], detector.bundle.image_size)  # decoded, resized
    batches = list(torch.split(pixels, args.batch))

    def detector_only() -> None:
        for batch in batches:
            detector(batch, size)

    dataset = evaluation.TestImages(samples, detector.bundle.image_size, args.resolution)

    def decode_only() -> None:  # as evaluate decodes without worker processes
        for _ in evaluation.batches(dataset, args.batch, 0):
            pass

    def sequential() -> None:  # workers 0 before the decoding threads: decode on this thread, then the model
        for images, *_ in DataLoader(dataset, args.batch):
            detector(images, size)

    runs = {"detector": detector_only, "decode": decode_only, "sequential": sequential}
    for w in workers:
        runs[f"evaluate w{w}"] = partial(evaluation.run_detector, detector, samples, args.resolution, args.batch, w)
    cpu: dict[str, list[float]] = {arm: [] for arm in runs}
    wall = alternate(args.rounds, {arm: with_cpu(fn, cpu[arm]) for arm, fn in runs.items()})
    cpu = {arm: series[-args.rounds :] for arm, series in cpu.items()}  # the warm-up run left out
    n = len(samples)
    print(f"  {'arm':<12} {'wall s/image':>12} {'CPU s/image':>12}  wall / detector's, CPU / detector's")
    for arm in runs:
        vs = "" if arm == "detector" else f"  {ratio(wall[arm], wall['detector'])}, {ratio(cpu[arm], cpu['detector'])}"
        print(f"  {arm:<12} {median(wall[arm]) / n:12.3f} {median(cpu[arm]) / n:12.3f}{vs}", flush=True)
    height, width = load_image(samples[0].image).shape[:2]
    summary(
        "evaluate",
        *(f"evaluate w{w}/detector per-image cost {ratio(wall[f'evaluate w{w}'], wall['detector'])}" for w in workers),
        *(f"CPU time w{w} {ratio(cpu[f'evaluate w{w}'], cpu['detector'])}" for w in workers),
        f"sequential/detector {ratio(wall['sequential'], wall['detector'])}",
        f"CPU time sequential {ratio(cpu['sequential'], cpu['detector'])}",
        f"decode/detector {ratio(wall['decode'], wall['detector'])}",
        f"{BIG}, {n} {category} images {height}x{width}, batch {args.batch}, maps {args.resolution}, "
        f"{torch.get_num_threads()} threads, {load()}",
    )


# ---------------------------------------------------------------- 2. memory
def resized_category(src: Path, dest: Path, size: int) -> None:
    """Copy a generated category to dest, every test image and mask resized to size x size."""
    shutil.copytree(src, dest)
    for path in list((dest / "test").rglob("*.png")) + list((dest / "ground_truth").rglob("*.png")):
        im = Image.open(path)
        mask = "ground_truth" in path.parts
        im.resize((size, size), Image.NEAREST if mask else Image.BICUBIC).save(path)


def proc_status(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc, in MiB (nan where /proc is not there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def memory_child(name: str, root: str, category: str, args: argparse.Namespace) -> None:
    """Runs in a fresh process: prints one JSON line with the peak RSS increases (MiB) and times."""
    maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731  (KiB on Linux)
    samples = list_split(Path(root), category, "test")
    detector = make_detector(name, category, args.sigma)
    loaded_peak = maxrss()
    try:  # reset the kernel's peak-RSS mark (Linux >= 4.0): model load's transient peak would hide the loop's
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    base, base_rss = maxrss(), proc_status("VmRSS")
    t0 = time.perf_counter()
    result = evaluation.run_detector(detector, samples, args.resolution, args.batch, args.mem_workers)
    t1 = time.perf_counter()
    after_loop = maxrss()
    metrics = evaluation.category_metrics(result)
    t2 = time.perf_counter()
    out = {
        "model": name,
        "n": len(samples),
        "baseline_mib": base,
        "loaded_peak_mib": loaded_peak,
        "reset": reset,
        "baseline_rss_mib": base_rss,
        "loop_mib": after_loop - base,
        "total_mib": maxrss() - base,
        "loop_s": t1 - t0,
        "metrics_s": t2 - t1,
        "hwm_mib": proc_status("VmHWM") - base_rss if reset else None,
        "metrics": sorted(metrics),
        "children_maxrss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    print("MEMORY " + json.dumps(out), flush=True)


def memory(root: Path, category: str, args: argparse.Namespace) -> list[str]:
    """Run the memory child (big model first, mpad-tiny as the fallback); returns the lines to print.

    Run before this process loads any model: a child's ru_maxrss starts at its parent's RSS at fork time."""
    models = [TINY] if args.quick else [BIG, TINY]
    lines: list[str] = []
    for name in models:
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            name,
            str(root),
            category,
            "--resolution",
            str(args.resolution),
            "--batch",
            str(args.batch),
            "--sigma",
            str(args.sigma),
            "--mem-workers",
            str(args.mem_workers),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.mem_timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            lines.append(f"{name}: did not finish within --mem-timeout {args.mem_timeout:.0f} s; falling back")
            continue
        line = next((x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")), None)
        if line is None:
            lines.append(f"{name}: child failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[len("MEMORY ") :])
        held = r["n"] * args.resolution**2 * 5 / 2**20  # float32 maps + bool masks kept by run_detector
        hwm = "n/a" if r["hwm_mib"] is None else f"{r['hwm_mib']:.1f} MiB"
        lines += [
            f"model {r['model']}, {r['n']} test images at 240x240, maps at {args.resolution}, "
            f"workers {args.mem_workers}, batch {args.batch}",
            f"  baseline ru_maxrss after imports + model load  {r['baseline_mib']:8.1f} MiB "
            f"(current RSS {r['baseline_rss_mib']:.1f} MiB; peak during load {r['loaded_peak_mib']:.1f} MiB, "
            + (
                "peak mark reset via /proc/self/clear_refs)"
                if r["reset"]
                else "NOT reset: the load peak may hide part of the loop's)"
            ),
            f"  ru_maxrss increase after run_detector          {r['loop_mib']:8.1f} MiB  ({r['loop_s']:.1f} s)",
            f"  ru_maxrss increase after + category_metrics    {r['total_mib']:8.1f} MiB  ({r['metrics_s']:.1f} s)",
            f"  cross-check, VmHWM (reset at baseline) - RSS at baseline: {hwm}",
            f"  (maps + masks held by run_detector: {held:.1f} MiB; metrics: {', '.join(r['metrics'])}"
            + (f"; DataLoader workers max RSS {r['children_maxrss_mib']:.1f} MiB)" if args.mem_workers else ")"),
        ]
        return lines
    return lines


# ---------------------------------------------------------------- 3. end to end
def e2e() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from e2e import copy_project, preset_overrides

    with tempfile.TemporaryDirectory(prefix="mpad-e2e-") as tmp:
        dest = copy_project(Path(tmp) / "project", preset_overrides("offline"))
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("DVC_EXP_NAME", None)
        print(f"dvc repro in {dest} ({load()})", flush=True)
        starts: list[tuple[str, float]] = []
        tail: list[str] = []
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dvc"), "repro"],
            cwd=dest,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            found = re.search(r"Running stage '([^']+)'", line)
            if found:
                starts.append((found.group(1), time.perf_counter() - start))
        rc = proc.wait()
        wall = time.perf_counter() - start
        if rc != 0:
            print(f"dvc repro failed (rc {rc}) after {wall:.1f} s:\n{''.join(tail)}")
            return
        print(f"dvc repro, offline preset: {wall:.1f} s wall ({load()})")
        ends = [t for _, t in starts[1:]] + [wall]
        groups: dict[str, float] = {}
        for (stage, t0), t1 in zip(starts, ends, strict=True):
            print(f"  {stage:<32} {t1 - t0:7.1f} s")
            groups[stage.split("@")[0]] = groups.get(stage.split("@")[0], 0.0) + t1 - t0
        print("  per stage kind: " + ", ".join(f"{k} {v:.1f} s" for k, v in groups.items()))
        print("  (a stage's time runs to the next 'Running stage' line; the last one's includes dvc's wrap-up)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="carpet", help="stand-in category (bench/standin.py) of the time split")
    parser.add_argument("--images", type=int, default=16, help="test images of the time split")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the time split")
    parser.add_argument("--workers", default="0,2", help="DataLoader workers of the evaluate arms, comma-separated")
    parser.add_argument("--batch", type=int, default=16, help="evaluate.batch_size")
    parser.add_argument("--resolution", type=int, default=256, help="evaluate.resolution")
    parser.add_argument("--sigma", type=float, default=4.0, help="scoring.smoothing_sigma")
    parser.add_argument("--memory", action="store_true", help="also measure evaluate's peak memory")
    parser.add_argument("--quick", action="store_true", help="the memory run on mpad-tiny")
    parser.add_argument("--mem-workers", type=int, default=0, help="DataLoader workers in the memory run")
    parser.add_argument("--mem-timeout", type=float, default=480.0, help="seconds before the memory run falls back")
    parser.add_argument("--e2e", action="store_true", help="also time `dvc repro` of the offline preset")
    parser.add_argument("--memory-child", nargs=3, metavar=("MODEL", "ROOT", "CATEGORY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, args)
        return
    workers = [int(w) for w in args.workers.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, {load()}")
    print(
        f"batch {args.batch}, resolution {args.resolution}, sigma {args.sigma}, laa {LAA} layers {LAYERS}", flush=True
    )
    with tempfile.TemporaryDirectory(prefix="mpad-bench-") as tmp:
        if args.memory:  # first, before this process loads a model: a child's ru_maxrss starts at its parent's RSS
            root = Path(tmp) / "synthetic"
            generate(root, seed=0, n_train=1, n_test=200)
            resized_category(root / "disc", Path(tmp) / "resized" / "disc", 240)
            mem_lines = memory(Path(tmp) / "resized", "disc", args)

        print(f"\n== 1. evaluate's per-image cost vs the detector alone ({args.rounds} rounds, alternating)")
        time_split(standin_samples(Path(tmp) / "standin", args.category, args.images), args.category, args, workers)
        print(load())

        if args.memory:
            print("\n== 2. peak memory, evaluate loop + category_metrics, fresh subprocess (ru_maxrss - baseline)")
            print("\n".join(mem_lines))
            print(load(), flush=True)

    if args.e2e:
        print("\n== 3. end to end: offline preset, dvc repro")
        e2e()


if __name__ == "__main__":
    main()
