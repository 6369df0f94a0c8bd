"""A prompts record for the tiny model (learned prompts at their initialisation), shared by the predict and
export tests."""

from __future__ import annotations

from typing import Any

import torch

from mpad.clip import ClipBundle, model_fingerprint
from mpad.memory import build_memory
from mpad.prompt_file import prompt_record
from mpad.prompts import PromptLearner, TextEncoder, learned_text_embeddings

LAA = {"attention": "vv", "k": 2, "layers": 2, "cls": "neighbor-cls"}


def tiny_record(bundle: ClipBundle, category: str = "disc", memory: bool = True) -> dict[str, Any]:
    """Prompts of sizes (2, 1, 1) drawn with seed 0; with `memory`, a visual memory of one random shot."""
    learner = PromptLearner(bundle.model, bundle.tokenizer, "disc", 2, 1, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = learned_text_embeddings(learner, TextEncoder(bundle.model))
    extra = {}
    if memory:
        shot = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        extra["memory"] = build_memory(bundle, LAA, shot, [2, 4], "harmonic").to_record()
    vectors = {"general": learner.general, "normal": learner.normal, "anomaly": learner.anomaly}
    return prompt_record(category=category, model=model_fingerprint(bundle), sizes=(2, 1, 1), vectors=vectors,
                         text=text, laa=LAA, extra=extra)  # fmt: skip
