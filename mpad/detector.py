"""The anomaly detector at inference: LAA encoder + learned text embeddings -> anomaly maps and image scores.

Evaluate and predict both go through `Detector`, so a map computed at evaluation is the map a user
gets on a new image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mpad.clip import ClipBundle
from mpad.features import build_encoder, encode
from mpad.memory import memory_from_record
from mpad.scoring import anomaly_maps, gaussian_blur, image_scores


@dataclass
class Detection:
    """maps: (B, H, W) anomaly maps in [0, 1] at the requested size; scores: (B,) image anomaly scores."""

    maps: torch.Tensor
    scores: torch.Tensor


class Detector:
    """Scores images with a prompts record (see mpad.prompt_file) on `bundle`'s backbone.

    scoring: {"smoothing_sigma": pixels at the output size, "image_score": max|topk_mean|global, "topk": fraction}.
    memory: an optional visual memory (mpad.memory.VisualMemory) fused with the text map.
    """

    def __init__(self, bundle: ClipBundle, record: dict[str, Any], scoring: dict[str, Any], memory: Any = None) -> None:
        self.bundle = bundle
        self.memory = memory
        layers = memory.layers if memory is not None else ()
        self.encoder = build_encoder(bundle, record["laa"], intermediate_layers=layers)
        self.text = record["text"].to(bundle.device).float()
        self.logit_scale = float(bundle.model.logit_scale.exp())
        self.sigma = float(scoring.get("smoothing_sigma", 0.0))
        self.image_score = str(scoring.get("image_score", "max"))
        self.topk = float(scoring.get("topk", 0.01))

    @classmethod
    def from_record(cls, bundle: ClipBundle, record: dict[str, Any], scoring: dict[str, Any]) -> Detector:
        """The detector a prompts record describes, with the visual memory stored in it (if any)."""
        return cls(bundle, record, scoring, memory=memory_from_record(record))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, size: Sequence[int]) -> Detection:
        """images (B, 3, H, W) in [0, 1] -> Detection with maps of `size` (H, W), on the CPU."""
        out = encode(self.encoder, self.bundle, images)
        maps = anomaly_maps(out.patch_features, self.text, self.logit_scale, size)
        if self.memory is not None:
            maps = self.memory.fuse(maps, out.intermediates, size)
        maps = gaussian_blur(maps, self.sigma)  # after fusion, so both maps are smoothed alike
        scores = image_scores(maps, self.image_score, self.topk, out.image_embedding, self.text, self.logit_scale)
        return Detection(maps.cpu(), scores.cpu())
