"""Throughput of the exported detector on onnxruntime against the torch `Detector`, on the CPU, same images.

For mpad-tiny and ViT-B-16-plus-240 with random weights (speed does not depend on them): exports a
detector (random (2, D) text embeddings, LAA as bench/encoder.py, default scoring, maps at 256 px, with
`--memory` a 1-shot visual memory) with `mpad.deploy.graph.export_onnx`, then prints images/second of both
backends on the same batch (the full path: encoder, maps, fusion, smoothing, scores), their ratio
(onnxruntime / torch throughput; goal >= 1.0x) and the model file's size. Both use the same number of
threads, timed in one process, interleaved, best of several repeats, so the ratio is robust to load.

    .venv/bin/python bench/export.py [--batch 8] [--repeats 5] [--memory] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from encoder import best_time  # bench/encoder.py: python puts bench/ first on the path

from mpad.clip import load_clip
from mpad.config import LaaConfig, ScoringConfig
from mpad.deploy.graph import export_onnx
from mpad.deploy.runtime import OnnxScorer
from mpad.detector import Detector
from mpad.memory import build_memory
from mpad.prediction import torch_scorer
from mpad.prompt_file import PromptsFile

MODELS = ("mpad-tiny", "ViT-B-16-plus-240")
SETTINGS = LaaConfig(attention="vv", k=2, layers=6, cls="neighbor-cls")
RESOLUTION = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="with a 1-shot visual memory (layers 2 and 4)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads of both")
    args = parser.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)
    print(
        f"torch {torch.__version__}, {threads} threads for both, batch {args.batch}, maps {RESOLUTION} px, "
        f"memory {args.memory}"
    )
    print(f"{'model':<20} {'torch img/s':>12} {'onnx img/s':>12} {'onnx/torch':>11} {'file MiB':>9}")
    for name in MODELS:
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
            run_torch(images), scorer(images)  # warm-up
            slow = fast = float("inf")
            for _ in range(2):  # interleave so both see the same machine state
                slow = min(slow, best_time(run_torch, images, args.repeats))
                fast = min(fast, best_time(scorer, images, args.repeats))
        print(f"{name:<20} {args.batch / slow:>12.1f} {args.batch / fast:>12.1f} {slow / fast:>10.2f}x {size_mb:>9.1f}")


if __name__ == "__main__":
    main()
