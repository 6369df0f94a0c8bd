"""Prompts files for the tiny model, shared by the tests: learned prompts at their initialisation
(`tiny_record`), and the hand-written meta prompt in a prompts file (`meta_prompts`)."""

from __future__ import annotations

from typing import Any

import torch

from mpad.clip import ClipBundle, backbone_identity
from mpad.config import LaaConfig
from mpad.memory import build_memory
from mpad.prompt_file import PromptsFile
from mpad.prompts import PromptLearner, TextEncoder, learned_text_embeddings, meta_text_embeddings

LAA = LaaConfig(attention="vv", k=2, layers=2, cls="neighbor-cls")


def tiny_record(bundle: ClipBundle, category: str = "disc", memory: bool = True) -> PromptsFile:
    """Prompts of sizes (2, 1, 1) drawn with seed 0; with `memory`, a visual memory of one random shot."""
    learner = PromptLearner(bundle.model, bundle.tokenizer, "disc", 2, 1, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = learned_text_embeddings(learner, TextEncoder(bundle.model))
    stored = None
    if memory:
        shot = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        stored = build_memory(bundle, LAA, shot, [2, 4], "harmonic").to_record()
    vectors = {
        "general": learner.general.detach(),
        "normal": learner.normal.detach(),
        "anomaly": learner.anomaly.detach(),
    }
    return PromptsFile(category=category, model=backbone_identity(bundle), sizes=(2, 1, 1), vectors=vectors,
                       text=text, laa=LAA, memory=stored)  # fmt: skip


def meta_prompts(bundle: ClipBundle, category: str = "disc", laa: LaaConfig = LAA, **fields: Any) -> PromptsFile:
    """The hand-written template ensemble of `category` as a prompts file (no learned vectors)."""
    text = meta_text_embeddings(bundle.model, bundle.tokenizer, category)
    return PromptsFile(category=category, model=backbone_identity(bundle), sizes=(0, 1, 1), vectors={}, text=text,
                       laa=laa, **fields)  # fmt: skip
