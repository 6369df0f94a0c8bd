"""The anomaly detector at inference: LAA encoder + learned text embeddings -> anomaly maps and image scores.

Evaluate and predict both go through `Detector`, so a map computed at evaluation is the map a user
gets on a new image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mpad.clip import ClipBundle
from mpad.config import ScoringConfig
from mpad.features import build_encoder, encode
from mpad.laa import EncoderOutput
from mpad.memory import VisualMemory
from mpad.prompt_file import PromptsFile
from mpad.scoring import anomaly_maps, gaussian_blur, image_scores


@dataclass
class Detection:
    """maps: (B, H, W) anomaly maps in [0, 1] at the requested size; scores: (B,) image anomaly scores."""

    maps: torch.Tensor
    scores: torch.Tensor


class Detector:
    """Scores images with learned prompts (mpad.prompt_file.PromptsFile) on `bundle`'s backbone.

    scoring: map smoothing (sigma in pixels at the output size) and the image score (see ScoringConfig).
    memory: an optional visual memory (mpad.memory.VisualMemory) fused with the text map.
    """

    def __init__(
        self, bundle: ClipBundle, prompts: PromptsFile, scoring: ScoringConfig, memory: VisualMemory | None = None
    ) -> None:
        self.bundle = bundle
        self.memory = memory
        layers = memory.layers if memory is not None else ()
        global_score = scoring.image_score == "global"  # the only reader of the global embedding
        self.encoder = build_encoder(bundle, prompts.laa, intermediate_layers=layers, image_embedding=global_score)
        self.text = prompts.text.to(bundle.device).float()
        self.logit_scale = float(bundle.model.logit_scale.exp())
        self.scoring = scoring

    @classmethod
    def from_prompts(cls, bundle: ClipBundle, prompts: PromptsFile, scoring: ScoringConfig) -> Detector:
        """The detector learned prompts describe, with the visual memory stored with them (if any)."""
        memory = VisualMemory.from_record(prompts.memory) if prompts.memory is not None else None
        return cls(bundle, prompts, scoring, memory=memory)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, size: Sequence[int]) -> Detection:
        """images (B, 3, H, W) in [0, 1] -> Detection with maps of `size` (H, W), on the CPU."""
        maps, scores = self.score(encode(self.encoder, self.bundle, images), size)
        return Detection(maps.cpu(), scores.cpu())

    def score(self, out: EncoderOutput, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's outputs for B images -> (maps (B, *size), scores (B,)), on the encoder's device.

        The maths after the encoder, shared with the exported ONNX graph (mpad.deploy.graph.DetectorGraph).
        """
        maps = anomaly_maps(out.patch_features, self.text, self.logit_scale, size)
        if self.memory is not None:
            maps = self.memory.fuse(maps, out.intermediates, size)
        maps = gaussian_blur(maps, float(self.scoring.smoothing_sigma))  # after fusion: both maps smoothed alike
        scores = image_scores(
            maps, self.scoring.image_score, float(self.scoring.topk), out.image_embedding, self.text, self.logit_scale
        )
        return maps, scores
