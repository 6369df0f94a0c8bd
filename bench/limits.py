"""How far the paper-setting pipeline runs from the machine's limit, for bench/fullscale.py (issue 33).

- the matrix-product peak: `torch.mm` of two (4096, 4096) matrices in the model's compute dtype, with the
  threads the measured stages had, 2 n^3 FLOPs a call;
- the FLOPs of train's step and of evaluate's image, counted by `torch.utils.flop_counter.FlopCounterMode`
  (matrix products, convolutions and attention, forward and backward; elementwise work is not counted, so an
  achieved fraction of the peak is that of the matrix-product work). Train's step is `train_prompts` on
  (batch, h, w, D) features and (batch, H, W) masks (eq. 3-10); its FLOPs are those of 2s steps less those of s
  steps, over s, so that the set-up both count cancels. Evaluate's image is the `Detector` (LAA encoder, eq.
  11-12, maps at evaluate.resolution, smoothing, image score) on a batch of evaluate.batch_size, over the batch;
- the time of train's step (after the first of 4) and of evaluate's image, alternating with the peak in rounds,
  each round's GFLOP/s as a fraction of that round's peak;
- evaluate's whole per-image cost (`mpad.evaluation.run_detector`: decoding in evaluate.workers DataLoader
  processes, resizing, masks, the detector, the copies; what the stage's loop runs) against the detector alone
  on the same images already decoded, in the same batches, alternating in rounds with the peak
  (bench/harness.py). Both count the images after the first batch, as bench/fullscale.py splits the stage:
  the DataLoader's start and the first batch are the stage's fixed cost.

Random weights and random text embeddings: the FLOPs and the time do not depend on them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from harness import Ratio, alternate, ratio
from torch.utils.flop_counter import FlopCounterMode

from mpad.clip import ClipBundle
from mpad.config import EvaluateConfig, LaaConfig, MptsConfig, PromptsConfig, ScoringConfig
from mpad.data import Sample
from mpad.detector import Detector
from mpad.evaluation import TestImages, run_detector
from mpad.mpts import train_prompts
from mpad.prompt_file import PromptsFile
from mpad.prompts import PromptLearner, TextEncoder
from mpad.training import synth_features

PEAK_N = 4096  # large enough that torch.mm runs at the BLAS's peak, small enough for a second a call on 2 cores


def counted(fn) -> float:
    """FLOPs of fn() as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as mode:
        fn()
    return float(mode.get_total_flops())


def trainer(
    bundle: ClipBundle, laa: LaaConfig, prompts: PromptsConfig, mpts: MptsConfig
) -> Callable[[int, Callable[[dict], Any] | None], Any]:
    """train(steps, on_step): MPTS (eq. 3-10) for `steps` steps of one meta-epoch on random (batch, h, w, D)
    features and (batch, H, W) masks, fresh prompts each call: what one step of the train stage runs."""
    features = synth_features(bundle, laa, [np.zeros((*bundle.image_size, 3), np.uint8)])  # for its shape
    n = mpts.batch_size
    features = F.normalize(torch.randn(n, *features.shape[1:], device=bundle.device), dim=-1)
    masks = (torch.rand(n, *bundle.image_size, device=bundle.device) > 0.9).float()
    meta = F.normalize(torch.randn(2, features.shape[-1], device=bundle.device), dim=-1)
    scale = float(bundle.model.logit_scale.exp())

    def train(steps: int, on_step: Callable[[dict], Any] | None = None) -> Any:
        learner = PromptLearner(bundle.model, bundle.tokenizer, "bench", *prompts.sizes)
        config = mpts.model_copy(update={"meta_epochs": 1, "steps": steps, "stop": "fixed"})
        return train_prompts(learner, TextEncoder(bundle.model), features, masks, meta, scale, config, on_step)

    return train


def random_detector(bundle: ClipBundle, laa: LaaConfig, scoring: ScoringConfig) -> Detector:
    """The evaluate stage's detector with random (2, D) text embeddings and no visual memory."""
    text = F.normalize(torch.randn(2, bundle.model.text_projection.shape[1]), dim=-1)
    prompts = PromptsFile(category="bench", model={}, sizes=(0, 1, 1), vectors={}, text=text, laa=laa)
    return Detector(bundle, prompts, scoring)


@dataclass(frozen=True)
class Limits:
    """peak_gflops: per round; step_gflop, image_gflop: counted; step: s a step per round; evaluate / detector:
    s an image per round."""

    peak_gflops: list[float]
    step_gflop: float
    step: list[float]
    image_gflop: float
    evaluate: list[float]
    detector: list[float]
    images: int
    peak_n: int = PEAK_N

    def evaluate_over_detector(self) -> Ratio:
        return ratio(self.evaluate, self.detector)

    def fraction(self, gflop: float, seconds: Sequence[float]) -> Ratio:
        """Achieved GFLOP/s of `gflop` done in `seconds` (one per round), as fractions of each round's peak."""
        return ratio([gflop / s for s in seconds], self.peak_gflops)


def measure(
    bundle: ClipBundle,
    laa: LaaConfig,
    prompts: PromptsConfig,
    mpts: MptsConfig,
    scoring: ScoringConfig,
    evaluate: EvaluateConfig,
    samples: Sequence[Sample],
    rounds: int = 3,
) -> Limits:
    """The counted FLOPs, and `rounds` alternating rounds of the peak, train's step, evaluate's loop and the
    detector alone on `samples` (the torch threads as they are set: the measured stages')."""
    train = trainer(bundle, laa, prompts, mpts)
    few = 2  # FLOPs of 2 * few steps less those of few steps: the set-up both count cancels
    step_gflop = (counted(lambda: train(2 * few)) - counted(lambda: train(few))) / few / 1e9
    detector = random_detector(bundle, laa, scoring)
    size = (evaluate.resolution, evaluate.resolution)
    batch = torch.rand(evaluate.batch_size, 3, *bundle.image_size)
    image = counted(lambda: detector(batch, size)) / evaluate.batch_size / 1e9

    a, b = (torch.randn(PEAK_N, PEAK_N, device=bundle.device, dtype=bundle.compute_dtype) for _ in range(2))
    out = torch.empty_like(a)
    sync = torch.cuda.synchronize if bundle.device.type == "cuda" else lambda: None

    def peak() -> float:  # GFLOP/s of a few products
        calls = 3
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        sync()
        return calls * 2 * PEAK_N**3 / 1e9 / (time.perf_counter() - t0)

    decoded = TestImages(samples, bundle.image_size, evaluate.resolution)
    images = torch.stack([decoded[i][0] for i in range(len(decoded))])
    first, *rest = images.split(evaluate.batch_size)
    counted_images = len(samples) - len(first)
    if not rest:
        raise ValueError(f"{len(samples)} test images fill one batch of {evaluate.batch_size}: none left to time")

    def whole() -> float:
        """s an image of evaluate's loop after its first batch, as bench/fullscale.py splits the stage's time
        (the DataLoader's start and the first batch are the stage's fixed cost)."""
        marks: list[float] = []
        run_detector(
            detector,
            samples,
            evaluate.resolution,
            evaluate.batch_size,
            evaluate.workers,
            lambda n: marks.append(time.perf_counter()),
        )
        return (marks[-1] - marks[0]) / counted_images

    def alone() -> float:
        """s an image of the detector on the same images, decoded beforehand, in the same batches."""
        detector(first, size)
        start = time.perf_counter()
        for chunk in rest:
            detector(chunk, size)
        return (time.perf_counter() - start) / counted_images

    def step() -> float:
        """s a step of MPTS after its first step, as bench/fullscale.py splits the train stage."""
        marks: list[float] = []
        train(4, lambda row: marks.append(time.perf_counter()))
        return (marks[-1] - marks[0]) / (len(marks) - 1)

    figures = alternate(rounds, {"peak": peak, "step": step, "evaluate": whole, "detector": alone})
    return Limits(
        figures["peak"], step_gflop, figures["step"], image, figures["evaluate"], figures["detector"], counted_images
    )
