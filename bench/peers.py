"""mpad against its closest peer, anomalib's WinCLIP: set-up time, evaluation speed and peak memory, same images.

Run: make bench-peers [ARGS='...'], or .venv/bin/python bench/peers.py [--data synthetic | MVTEC_ROOT]
     [--categories disc] [--k 1] [--test 4] [--steps 4] [--meta-epochs 1] [--samples 8] [--rounds 2]
     [--threads N] [--batch 4] [--full]

What each side does, in its own child process (the same k normal images, the same test images):
- mpad (this checkout, the project's venv): its library calls as the synthesize, train and evaluate stages make
  them. Set-up = OAGM (object masks + synthesized anomalies, paper sec. 3.4) + MPTS training (eq. 4-10) + the
  detector's build; evaluation = `mpad.evaluation.run_detector` (decoding, resize, LAA encoder eq. 11-12, maps,
  smoothing, scores). params.yaml's paper setting, except where the flags shorten it (printed).
- WinCLIP (anomalib==2.7.0's `WinClip` Lightning module, run by `.peers/venv/bin/python`): set-up = its own
  `setup()` with `k_shot=k` and `few_shot_source` = a folder holding the k shots (its text prompt ensemble and
  the reference image, window and patch embeddings); evaluation = anomalib's `PredictDataset` (decoding, with
  the module's pre-processor transform: resize to 240, normalise) feeding `WinClipModel.forward` (image score
  and map), batched by a DataLoader with its `collate_fn`. In 2.7.0 that `setup()` stops with an AttributeError
  (it reads `pre_processor.test_transform`, which its `PreProcessor` no longer has): the child then runs the
  same steps through anomalib's own methods, `collect_reference_images` on a `PredictDataset` of the shots and
  `WinClipModel.setup(class_name, reference_images)`, and the output says so.
Build (model and weights) is timed apart; imports are not timed. Peak RSS is each child's ru_maxrss (os.wait4).

Same backbone and weights: ViT-B-16-plus-240 (WinCLIP's architecture), random weights (no download here).
mpad's random weights (`load_clip(name, "none")`, its fixed seed) are saved once as a state-dict file, which
mpad reads as `model.pretrained`. anomalib builds its CLIP in `WinClipModel.__init__` with
`open_clip.create_model_and_transforms(BACKBONE, pretrained=PRETRAINED)`, PRETRAINED being the module constant
"laion400m_e31" (a download). The WinCLIP child sets that constant, `anomalib.models.image.winclip.torch_model.
PRETRAINED`, to the state-dict file's path before building `WinClip`: open_clip then loads the file as it loads
any local checkpoint, inside anomalib's own constructor, whose code is unchanged; the child then checks that
every tensor of `WinClipModel.clip` has the SHA-256 of the file's (it stops, saying so, if one differs).
Same threads: torch.set_num_threads(--threads) and OMP_NUM_THREADS in both children; decoding in the main
process on both sides (mpad's evaluate.workers = 0). Same map resolution: WinCLIP's maps come at its input size,
240 x 240, so mpad's evaluate.resolution is set to 240. Same batch size (--batch) for both.
Left unequal, as each ships: mpad's loop also reads and resizes the ground-truth masks and smooths the maps
(scoring.smoothing_sigma), WinCLIP's reads no masks and applies no post-processing; both compute their own text
prompt ensembles within the set-up (no cache), and WinCLIP's build includes its Lightning module's.

With random weights the maps mean nothing: this compares speed and memory only, never detection quality.

Environment: anomalib goes into a venv of its own, .peers/venv (git-ignored), never into the project's venv. A
.pth file there puts the project venv's site-packages on its path, so pip sees torch, torchvision and open_clip
as installed and adds only anomalib and its other requirements (the first run lists them). A stamp file makes
the install happen once.

Each category: `--rounds` rounds, the two sides' order rotated each round (bench/harness.py's `alternate`); per
round the ratios mpad / WinCLIP of set-up time, evaluation images/s and peak RSS (median and min-max). Last line:
`SUMMARY peers: ...`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import Ratio, alternate, median, ratio, summary

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / ".peers"
ANOMALIB = "anomalib==2.7.0"
BACKBONE = "ViT-B-16-plus-240"
MAP_SIZE = 240  # WinCLIP's maps come at its input size (its pre-processor resizes to 240 x 240)
# The figures each side reports: key, label, which way is better (for the ratio mpad / WinCLIP), format.
FIGURES = (
    ("setup_s", "set-up s from k normal images", "lower", ".1f"),
    ("images_per_s", "evaluation images/s", "higher", ".3g"),
    ("peak_rss_mib", "peak RSS MiB", "lower", ".0f"),
)
SHORT = {"k": 1, "test": 4, "steps": 4, "meta_epochs": 1, "samples": 8, "batch": 4}
FULL = {"k": 1, "test": 0, "steps": 100, "meta_epochs": 3, "samples": 32, "batch": 16}  # test 0: every image


# ---------------------------------------------------------------------------------------------------- helpers


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """n items evenly spread over `items` (all of them when n <= 0 or n >= len), first and last included, in
    order: MVTec's test folders are grouped by defect, so the first n would all be one kind."""
    if n <= 0 or n >= len(items):
        return list(items)
    if n == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def link_names(paths: Sequence[Path]) -> list[str]:
    """Unique file names for links to `paths` in one folder, in their order (MVTec repeats 000.png in every
    defect folder): `<index>_<parent>_<name>`, the index zero-padded so that a sorted listing keeps the order."""
    width = len(str(max(len(paths) - 1, 0)))
    return [f"{i:0{width}d}_{p.parent.name}_{p.name}" for i, p in enumerate(paths)]


def per_round(records: dict[str, list[dict[str, float]]]) -> dict[str, Ratio]:
    """{figure: Ratio of mpad / WinCLIP over the rounds} from each side's per-round records."""
    return {key: ratio([r[key] for r in records["mpad"]], [r[key] for r in records["winclip"]]) for key, *_ in FIGURES}


def table(category: str, records: dict[str, list[dict[str, float]]]) -> str:
    """A Markdown table: per figure, each side's median over the rounds and the per-round ratio mpad / WinCLIP."""
    ratios = per_round(records)
    rows = [
        f"| {category} | mpad | WinCLIP | mpad / WinCLIP | better |",
        "|---|---|---|---|---|",
        f"| model build s | {median([r['build_s'] for r in records['mpad']]):.1f} | "
        f"{median([r['build_s'] for r in records['winclip']]):.1f} | | |",
        f"| peak RSS MiB when built | {median([r['build_peak_rss_mib'] for r in records['mpad']]):.0f} | "
        f"{median([r['build_peak_rss_mib'] for r in records['winclip']]):.0f} | | |",
    ]
    for key, label, better, spec in FIGURES:
        mine, theirs = (median([r[key] for r in records[side]]) for side in ("mpad", "winclip"))
        rows.append(f"| {label} | {mine:{spec}} | {theirs:{spec}} | {ratios[key]} | {better} |")
    return "\n".join(rows)


def pth_line(python: str) -> str:
    """The site-packages folder of the interpreter `python` (the .pth line that shares its packages)."""
    out = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


# ------------------------------------------------------------------------------------------------ environment


def peer_python() -> Path:
    """.peers/venv's python with anomalib installed, installing it on first use (stamp: .peers/venv/.installed)."""
    venv = PEERS / "venv"
    python, stamp = venv / "bin" / "python", venv / ".installed"
    if stamp.is_file() and stamp.read_text().strip() == ANOMALIB:
        return python
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = Path(pth_line(str(python)))
    (purelib / "project.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    report = venv / "install-report.json"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--dry-run", "--report", str(report), ANOMALIB], check=True)
    adds = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.loads(report.read_text())["install"]]
    print(
        f"first run: installing {ANOMALIB} into {venv.relative_to(REPO)} (the project's torch, torchvision and "
        f"open_clip are shared through {purelib.name}/project.pth); pip adds {len(adds)} packages: {', '.join(adds)}",
        flush=True,
    )
    heavy = {"torch", "torchvision", "open_clip_torch", "open-clip-torch"} & {a.split("==")[0].lower() for a in adds}
    if heavy:
        sys.exit(f"error: pip would reinstall {sorted(heavy)} into {venv}: the project venv's versions do not fit")
    subprocess.run([*pip, ANOMALIB], check=True)
    stamp.write_text(ANOMALIB + "\n")
    return python


def digests(state: dict[str, Any]) -> dict[str, str]:
    """{name: SHA-256 of the tensor's bytes} of a state dict, without copying a contiguous tensor."""
    import torch

    return {
        k: hashlib.sha256(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
        for k, v in state.items()
    }


def digests_file(weights: Path) -> Path:
    return weights.with_suffix(".sha256.json")


def save_weights(path: Path) -> None:
    """mpad's random ViT-B-16-plus-240 weights (mpad.clip's seed) as a state-dict file and their digests, once."""
    if path.is_file() and digests_file(path).is_file():
        return
    import torch

    from mpad.clip import load_clip
    from mpad.io import atomic_path, write_json

    state = load_clip(BACKBONE, "none").model.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    write_json(digests_file(path), digests(state))


# ---------------------------------------------------------------------------------------------------- workers


def run_child(python: str, side: str, job: dict[str, Any], threads: int) -> dict[str, float]:
    """Run this file's `side` worker in `python` on `job`; its JSON figures plus peak_rss_mib (os.wait4)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = Path(job["work"]) / f"{side}.json"
    log = Path(job["work"]) / f"{side}.log"
    with open(log, "w") as sink:
        child = subprocess.Popen(
            [python, __file__, "--worker", side, json.dumps({**job, "out": str(out)})],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        kept = PEERS / f"{side}-failed.log"  # the work folder goes when the benchmark stops
        shutil.copyfile(log, kept)
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"the {side} side failed: {tail[0]} (whole log: {kept})")
    figures = json.loads(out.read_text())
    figures["peak_rss_mib"] = usage.ru_maxrss / 1024
    return figures


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mpad_worker(job: dict[str, Any]) -> dict[str, float]:
    """Set up from the shots and evaluate the tests, as the synthesize, train and evaluate stages do."""
    import numpy as np
    import torch
    import yaml

    from mpad.clip import load_clip
    from mpad.config import SECTIONS
    from mpad.data import list_split, load_image
    from mpad.data.catalog import MVTEC_TEXTURES, SYNTHETIC_TEXTURES
    from mpad.detector import Detector
    from mpad.evaluation import run_detector
    from mpad.features import stack_images
    from mpad.oagm import synthesize_set
    from mpad.object_masks import shot_object_masks
    from mpad.training import learn_prompts, learned_file, seed_everything

    torch.set_num_threads(job["threads"])
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in job["overrides"].items():
        section, leaf = key.split(".")
        params[section][leaf] = value
    cfg = {name: SECTIONS[name].from_params(params[name]) for name in ("oagm", "laa", "prompts", "mpts", "scoring")}
    category, evaluate = job["category"], params["evaluate"]
    seed_everything(cfg["mpts"].seed)
    start = time.perf_counter()
    bundle = load_clip(BACKBONE, job["weights"], "cpu")
    built, built_rss = time.perf_counter(), peak_rss_mib()
    shots = stack_images([load_image(Path(p)) for p in job["shots"]], bundle.image_size)
    texture = category in MVTEC_TEXTURES + SYNTHETIC_TEXTURES
    masks = shot_object_masks(shots, category, cfg["oagm"], texture, bundle)
    drawn = [s for per_shot in synthesize_set(shots, masks, category, cfg["oagm"]) for s in per_shot]
    synthesized = time.perf_counter()
    images, maps = [s.image for s in drawn], [s.mask.astype(np.float32) for s in drawn]
    learned = learn_prompts(bundle, category, images, maps, cfg["laa"], cfg["prompts"], cfg["mpts"])
    prompts = learned_file(bundle, category, learned, cfg["laa"], cfg["prompts"], cfg["mpts"])
    detector = Detector.from_prompts(bundle, prompts, cfg["scoring"])
    set_up = time.perf_counter()
    wanted = {Path(p) for p in job["tests"]}
    samples = [s for s in list_split(Path(job["root"]), category, "test") if s.image in wanted]
    result = run_detector(detector, samples, evaluate["resolution"], evaluate["batch_size"], evaluate["workers"])
    done = time.perf_counter()
    return {
        "build_s": built - start,
        "build_peak_rss_mib": built_rss,
        "setup_s": set_up - built,
        "synthesize_s": synthesized - built,
        "eval_s": done - set_up,
        "images": len(samples),
        "images_per_s": len(samples) / (done - set_up),
        "map": list(result.maps.shape[-2:]),
        "threads": torch.get_num_threads(),
    }


def winclip_worker(job: dict[str, Any]) -> dict[str, float]:
    """anomalib's WinClip: few-shot set-up from a folder of the k shots, then inference on the tests."""
    import torch
    from anomalib.data import PredictDataset
    from anomalib.models import WinClip
    from anomalib.models.image.winclip import torch_model
    from torch.utils.data import DataLoader

    torch.set_num_threads(job["threads"])
    work = Path(job["work"])
    folders = {"shots": work / "winclip-shots", "tests": work / "winclip-tests"}
    for name, folder in folders.items():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        paths = [Path(p) for p in job[name]]
        for path, link in zip(paths, link_names(paths), strict=True):
            (folder / link).symlink_to(path)
    torch_model.PRETRAINED = job["weights"]  # see the module docstring: the state-dict file instead of a download
    start = time.perf_counter()
    module = WinClip(class_name=job["category"], k_shot=len(job["shots"]), few_shot_source=folders["shots"])
    module.eval()
    built, built_rss = time.perf_counter(), peak_rss_mib()
    transform, note = module.pre_processor.transform, None

    def loader(folder: Path, batch: int) -> DataLoader:
        dataset = PredictDataset(folder, transform=transform)
        return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=0, collate_fn=dataset.collate_fn)

    setup_start = time.perf_counter()
    try:
        module.setup("test")
    except AttributeError as err:  # 2.7.0 reads pre_processor.test_transform, which its PreProcessor lacks
        note = f"WinClip.setup with few_shot_source fails in {ANOMALIB} ({err}): its own steps run instead"
        references = module.collect_reference_images(loader(folders["shots"], 1))
        module.model.setup(module.class_name, references)
    set_up = time.perf_counter()
    n, size = 0, None
    with torch.no_grad():
        for batch in loader(folders["tests"], job["batch"]):
            found = module.model(batch.image)
            n, size = n + len(found.anomaly_map), list(found.anomaly_map.shape[-2:])
    done = time.perf_counter()
    # Checked after the timed work, by digest (a second copy of the weights would add to the peak RSS measured).
    expected = json.loads(digests_file(Path(job["weights"])).read_text())
    differ = sorted(set(expected.items()) ^ set(digests(module.model.clip.state_dict()).items()))
    if differ:
        raise SystemExit(f"WinCLIP's CLIP does not hold the file's weights: {len(differ)} differ, e.g. {differ[0][0]}")
    if module.model.k_shot != len(job["shots"]):
        raise SystemExit(f"WinCLIP set up with {module.model.k_shot} reference images, expected {len(job['shots'])}")
    return {
        "build_s": built - start,
        "build_peak_rss_mib": built_rss,
        "setup_s": set_up - setup_start,
        "eval_s": done - set_up,
        "images": n,
        "images_per_s": n / (done - set_up),
        "map": size,
        "threads": torch.get_num_threads(),
        "note": note,
    }


WORKERS = {"mpad": mpad_worker, "winclip": winclip_worker}


# ------------------------------------------------------------------------------------------------------- main


def compare(job: dict[str, Any], pythons: dict[str, str], rounds: int) -> dict[str, list[dict[str, float]]]:
    """`rounds` rounds of both sides on one category's job, their order rotated each round; {side: [figures]}."""
    records: dict[str, list[dict[str, float]]] = {side: [] for side in pythons}

    def arm(side: str) -> None:
        records[side].append(run_child(pythons[side], side, job, job["threads"]))
        r = records[side][-1]
        print(
            f"  {job['category']} {side:<8} build {r['build_s']:6.1f} s  set-up {r['setup_s']:6.1f} s  "
            f"{r['images']} images in {r['eval_s']:6.1f} s  peak RSS {r['peak_rss_mib']:6.0f} MiB "
            f"({r['build_peak_rss_mib']:.0f} when built)  "
            f"(maps {r['map']}, {r['threads']} threads, load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        if "synthesize_s" in r:
            train = r["setup_s"] - r["synthesize_s"]
            print(f"    (set-up: OAGM {r['synthesize_s']:.1f} s, MPTS and the detector {train:.1f} s)", flush=True)
        if r.get("note") and len(records[side]) == 1:
            print(f"  note: {r['note']}", flush=True)

    alternate(rounds, {side: lambda side=side: arm(side) for side in pythons}, warmup=False)
    return records


def dataset_root(data: str, work: Path) -> tuple[Path, list[str]]:
    """The MVTec-layout root to read and its default categories: mpad's generated dataset (written under `work`)
    or the folder given (read only)."""
    from mpad.data.catalog import SYNTHETIC_CATEGORIES
    from mpad.data.mvtec import list_categories
    from mpad.data.synthetic import generate

    if data == "synthetic":
        root = work / "synthetic"
        generate(root, seed=0)
        return root, list(SYNTHETIC_CATEGORIES[-1:])  # disc: an object, so OAGM's object mask has work to do
    root = Path(data)
    if not root.is_dir():
        sys.exit(f"error: --data {data}: no such folder (give an MVTec-layout root, or 'synthetic')")
    return root, list_categories(root)[:1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="'synthetic' (generated) or an MVTec-layout root")
    parser.add_argument("--categories", help="comma-separated (default: the first; synthetic: disc)")
    parser.add_argument("--full", action="store_true", help="the paper's setting: " + json.dumps(FULL))
    for key, value in SHORT.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"default {value} (--full: {FULL[key]})")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per category, sides alternating")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads, each side")
    args = parser.parse_args()
    setting = {
        k: (getattr(args, k) if getattr(args, k) is not None else (FULL if args.full else SHORT)[k]) for k in SHORT
    }

    from mpad.data import list_split
    from mpad.data.mvtec import DatasetError
    from mpad.data.shots import pick_shots

    try:
        python = str(peer_python())
    except subprocess.CalledProcessError as err:
        sys.exit(f"error: installing {ANOMALIB} into {PEERS / 'venv'} failed: {err} (pip's own message is above)")
    PEERS.mkdir(exist_ok=True)
    weights = PEERS / f"{BACKBONE}-random.pt"
    save_weights(weights)
    work = Path(tempfile.mkdtemp(prefix="mpad-peers-"))
    try:
        root, default = dataset_root(args.data, work)
        categories = args.categories.split(",") if args.categories else default
        overrides = {
            "mpts.steps": setting["steps"],
            "mpts.meta_epochs": setting["meta_epochs"],
            "oagm.samples": setting["samples"],
            "evaluate.resolution": MAP_SIZE,
            "evaluate.batch_size": setting["batch"],
            "evaluate.workers": 0,
        }
        print(
            f"{BACKBONE}, random weights ({weights.relative_to(REPO)}), CPU, {args.threads} torch threads each side, "
            f"data {root}, categories {', '.join(categories)}, k={setting['k']} shots (shots.seed 0), "
            f"{setting['test'] or 'all'} test images, batch {setting['batch']}, maps {MAP_SIZE} px, {args.rounds} "
            f"rounds; mpad: params.yaml with {', '.join(f'{k}={v}' for k, v in overrides.items())}; WinCLIP: "
            f"{ANOMALIB} defaults (scales 2, 3)\nrandom weights: the maps mean nothing, so only speed and memory "
            "are compared, never detection quality\n",
            flush=True,
        )
        closing = []
        for category in categories:
            try:
                shots = pick_shots(list_split(root, category, "train"), setting["k"], 0, category)
                tests = spread(list_split(root, category, "test"), setting["test"])
            except DatasetError as err:
                sys.exit(f"error: {err}")
            job = {
                "category": category,
                "root": str(root),
                "shots": [str(s.image) for s in shots],
                "tests": [str(s.image) for s in tests],
                "weights": str(weights),
                "threads": args.threads,
                "batch": setting["batch"],
                "overrides": overrides,
                "work": str(work),
            }
            try:
                records = compare(job, {"mpad": sys.executable, "winclip": python}, args.rounds)
            except RuntimeError as err:
                sys.exit(f"error: {err}")
            print("\n" + table(category, records) + "\n", flush=True)
            ratios = per_round(records)
            closing.append(
                f"{category} mpad/WinCLIP set-up time {ratios['setup_s']}, images/s {ratios['images_per_s']}, "
                f"peak RSS {ratios['peak_rss_mib']}"
            )
        summary(
            "peers",
            *closing,
            f"{BACKBONE} random weights, k={setting['k']}, mpts {setting['meta_epochs']}x{setting['steps']} steps, "
            f"{args.threads} threads",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        job = json.loads(sys.argv[3])
        figures = WORKERS[sys.argv[2]](job)
        Path(job["out"]).write_text(json.dumps(figures))
    else:
        main()
