"""Throughput of the exported detector on onnxruntime against the torch `Detector`, on the CPU, same images.

For mpad-tiny and ViT-B-16-plus-240 with random weights (speed does not depend on them): exports a
detector (random (2, D) text embeddings, LAA as bench/encoder.py, default scoring, maps at 256 px, with
`--memory` a 1-shot visual memory) with `mpad.deploy.graph.export_onnx`, then prints images/second of both
backends on the same batch (the full path: encoder, maps, fusion, smoothing, scores), their ratio
(torch / onnxruntime time, i.e. onnxruntime / torch throughput; goal >= 1.0x) and the model file's size.
Both use the same number of threads and run in alternating rounds in one process (bench/harness.py), each arm
calling its backend on one batch for about `--seconds` a round; the ratio is taken per round (median, min-max),
then the SUMMARY line.

    .venv/bin/python bench/export.py [--models mpad-tiny,ViT-B-16-plus-240] [--batch 8] [--rounds 5] [--seconds 1]
        [--memory] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import alternate, median, ratio, repeat, summary  # bench/harness.py: python puts bench/ first on the path

from mpad.clip import load_clip
from mpad.config import LaaConfig, ScoringConfig
from mpad.deploy.graph import export_onnx
from mpad.deploy.runtime import OnnxScorer
from mpad.detector import Detector
from mpad.memory import build_memory
from mpad.prediction import torch_scorer
from mpad.prompt_file import PromptsFile

MODELS = "mpad-tiny,ViT-B-16-plus-240"
SETTINGS = LaaConfig(attention="vv", k=2, layers=6, cls="neighbor-cls")
RESOLUTION = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS, help="comma-separated open_clip names or mpad-tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="time of an arm in a round (calls repeated)")
    parser.add_argument("--memory", action="store_true", help="with a 1-shot visual memory (layers 2 and 4)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of both")
    args = parser.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)
    print(
        f"torch {torch.__version__}, {threads} threads for both, batch {args.batch}, maps {RESOLUTION} px, "
        f"memory {args.memory}"
    )
    print(f"{'model':<20} {'torch img/s':>12} {'onnx img/s':>12} {'torch/onnx time':>28} {'file MiB':>9}")
    figures = []
    for name in args.models.split(","):
        bundle = load_clip(name, "none", "cpu")
        depth = len(bundle.model.visual.transformer.resblocks)
        laa = SETTINGS.model_copy(update={"layers": min(SETTINGS.layers, depth)})
        text = F.normalize(torch.randn(2, bundle.model.text_projection.shape[1]), dim=-1)
        images = torch.rand(args.batch, 3, *bundle.image_size)
        memory = build_memory(bundle, laa, images[:1], [2, 4]) if args.memory else None
        prompts = PromptsFile(category="bench", model={}, sizes=(0, 1, 1), vectors={}, text=text, laa=laa)
        detector = Detector(bundle, prompts, ScoringConfig(), memory=memory)
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "model.onnx"
            export_onnx(detector, RESOLUTION, model)
            size_mb = model.stat().st_size / 2**20
            scorer = OnnxScorer(model, threads=threads)
            run_torch = torch_scorer(detector, RESOLUTION)  # what predict's torch backend runs

            times = alternate(
                args.rounds,
                {
                    "torch": repeat(args.seconds, run_torch, images),
                    "onnx": repeat(args.seconds, scorer, images),
                },
            )
        per_image = {arm: median(t) / args.batch for arm, t in times.items()}
        torch_onnx = ratio(times["torch"], times["onnx"])
        print(
            f"{name:<20} {1 / per_image['torch']:>12.1f} {1 / per_image['onnx']:>12.1f} {torch_onnx!s:>28} "
            f"{size_mb:>9.1f}"
        )
        figures.append(f"{name} torch/onnxruntime time {torch_onnx}")
    summary("export", *figures, f"batch {args.batch}, {threads} threads, memory {args.memory}")


if __name__ == "__main__":
    main()
