"""Learning a category's prompts on its synthesized set: MPTS (paper sec. 3.3) from images to the
record that `mpad.prompt_file` saves. The train stage wires this to params, dvclive and a progress bar.

The image encoder is frozen, so the patch features of every synthesized image are computed once
(`synth_features`) and `mpad.mpts.train_prompts` only runs the text tower.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mpad.clip import ClipBundle, backbone_identity
from mpad.config import LaaConfig, MemoryConfig, MptsConfig, PromptsConfig
from mpad.features import build_encoder, encode_batched, stack_images
from mpad.log_maps import score_maps
from mpad.memory import build_memory
from mpad.mpts import TrainResult, anomaly_loss, train_prompts
from mpad.prompt_file import PromptsFile
from mpad.prompts import PromptLearner, TextEncoder, meta_text_embeddings
from mpad.text_cache import TextCache

# Images per encoder forward pass when caching the features (bounds device memory).
ENCODE_BATCH = 32


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (MPTS itself draws from its own seeded ones)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def synth_features(
    bundle: ClipBundle, laa: LaaConfig, images: Sequence[np.ndarray], batch_size: int = ENCODE_BATCH
) -> torch.Tensor:
    """uint8 (H, W, 3) images -> (N, H', W', D) L2-normalised patch features of the LAA encoder's second
    path (eq. 11-12), fp32 on the bundle's device."""
    encoder = build_encoder(bundle, laa)
    return encode_batched(encoder, bundle, stack_images(images, bundle.image_size), batch_size).patch_features


@dataclass
class LearnedPrompts:
    """What `learn_prompts` returns: the learner (its vectors updated), MPTS's result (`result.text`: the
    (2, D) final text embeddings; `result.history`: one row per step) and the number of training images."""

    learner: PromptLearner
    result: TrainResult
    images: int

    @property
    def calibrated_fraction(self) -> float:
        """Share of the steps whose anomaly gradient was calibrated (eq. 10's first case)."""
        history = self.result.history
        return sum(row["calibrated"] for row in history) / max(1, len(history))


def learn_prompts(
    bundle: ClipBundle,
    category: str,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    laa: LaaConfig,
    prompts: PromptsConfig,
    mpts: MptsConfig,
    on_step: Callable[[dict[str, float]], Any] | None = None,
    cache: TextCache | None = None,
) -> LearnedPrompts:
    """MPTS on the synthesized set: images (H, W, 3) uint8 x', masks (H, W) float M'_a in {0, 1}.

    The learnable prompts of eq. 1 (sizes from `prompts`, drawn from a generator seeded by mpts.seed)
    start from N(0, 0.02^2); the first meta prompts are the hand-written ensembles (read from `cache`).
    on_step gets each step's history row. With mpts.meta_epochs = 0 nothing is learned (the
    "human-semantic prompt" baseline): one row with the anomaly loss (eq. 3-5) of the meta prompts on the
    whole set is recorded (and passed to on_step), so the curves and final_loss still say something.
    """
    features = synth_features(bundle, laa, images)
    masks_t = torch.from_numpy(np.stack(masks)).to(bundle.device)
    learner = PromptLearner(
        bundle.model, bundle.tokenizer, category, *prompts.sizes, generator=torch.Generator().manual_seed(mpts.seed)
    )
    text_encoder = TextEncoder(bundle.model)
    meta_text = meta_text_embeddings(bundle.model, bundle.tokenizer, category, cache)
    logit_scale = float(bundle.model.logit_scale.exp())
    result = train_prompts(learner, text_encoder, features, masks_t, meta_text, logit_scale, mpts, on_step)
    if not result.history:
        with torch.no_grad():
            maps = score_maps(features, result.text.to(features.device), logit_scale, tuple(masks_t.shape[-2:]))
            loss = float(anomaly_loss(maps, masks_t))
        result.history.append(
            {"step": 0, "meta_epoch": 0, "loss_ano": loss, "loss_div": 0.0, "cos": 0.0, "calibrated": 0}
        )
        if on_step is not None:
            on_step(result.history[0])
    return LearnedPrompts(learner, result, len(images))


def shot_memory(bundle: ClipBundle, laa: LaaConfig, memory: MemoryConfig, shots: Sequence[np.ndarray]) -> dict:
    """The visual memory record (`VisualMemory.to_record`) of the shot images (H, W, 3) uint8 at
    memory.layers, fused by memory.fusion. ValueError when a layer is outside the model's blocks."""
    images = stack_images(shots, bundle.image_size)
    return build_memory(bundle, laa, images, memory.layers, memory.fusion).to_record()


def learned_file(
    bundle: ClipBundle,
    category: str,
    learned: LearnedPrompts,
    laa: LaaConfig,
    prompts: PromptsConfig,
    mpts: MptsConfig,
    memory: dict | None = None,
) -> PromptsFile:
    """What train saves: the learned vectors and text embeddings, what rebuilds them (backbone, sizes,
    encoder settings), the memory record when given, and a summary of the training."""
    learner, result = learned.learner, learned.result
    train = {
        "final_loss": result.final_loss,
        "steps": sum(result.round_steps),
        "meta_epochs": mpts.meta_epochs,
        "lambda": float(mpts.lam),  # float as before, even when params.yaml says `lambda: 1`
        "calibration": mpts.calibration,
        "calibrated_fraction": learned.calibrated_fraction,
        "images": learned.images,
        "random_weights": bundle.random_weights,
    }
    return PromptsFile(
        category=category,
        model=backbone_identity(bundle),
        sizes=prompts.sizes,
        vectors={
            "general": learner.general.detach(),
            "normal": learner.normal.detach(),
            "anomaly": learner.anomaly.detach(),
        },  # fmt: skip
        text=result.text.detach(),
        laa=laa,
        memory=memory,
        train=train,
    )
