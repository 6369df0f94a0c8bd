"""Few-shot visual memory branch (beyond the paper; WinCLIP+ / PromptAD style).

The k normal shot images' patch tokens of the *original* ViT path, taken after a few transformer
blocks (`layers`, 1-based), are stored per layer as a bank of L2-normalised vectors. A test patch's
memory score is its nearest-neighbour cosine distance to the bank of the same layer,
(1 - max cos) / 2 in [0, 1], averaged over the layers. The memory map, upsampled to the output size,
is fused with the text map (harmonic or arithmetic mean).

A memory is saved inside the prompts file (key "memory", see `VisualMemory.to_record`) so that
evaluate and predict rebuild exactly what train built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mpad.clip import ClipBundle
from mpad.config import LaaConfig
from mpad.features import build_encoder, encode_batched

FUSIONS = ("harmonic", "arithmetic")
# Query chunk x bank size bound for one similarity matmul (float32 elements, ~64 MB).
_CHUNK_ELEMENTS = 1 << 24


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk_elements: int = _CHUNK_ELEMENTS) -> torch.Tensor:
    """Cosine nearest-neighbour distance of each query to the bank, (1 - max cos) / 2 in [0, 1].

    queries (N, C) and bank (M, C), both L2-normalised, same device -> (N,) distances.
    Batched matmuls over chunks of queries (and of the bank when it is large) keep the similarity
    block at most ~`chunk_elements` floats; no per-patch Python loop.
    """
    n, m = queries.shape[0], bank.shape[0]
    if m == 0:
        raise ValueError("empty memory bank")
    if n * m <= chunk_elements:  # one block, no loop: also the form torch.onnx traces for any batch size
        return ((1.0 - (queries @ bank.t()).amax(dim=1)) / 2.0).clamp(0.0, 1.0)
    bank_chunk = max(1, min(m, chunk_elements))
    query_chunk = max(1, chunk_elements // bank_chunk)
    out = torch.empty(n, dtype=queries.dtype, device=queries.device)
    for q0 in range(0, n, query_chunk):
        q = queries[q0 : q0 + query_chunk]
        best = torch.full((q.shape[0],), -1.0, dtype=queries.dtype, device=queries.device)
        for b0 in range(0, m, bank_chunk):
            best = torch.maximum(best, (q @ bank[b0 : b0 + bank_chunk].t()).amax(dim=1))
        out[q0 : q0 + query_chunk] = best
    return ((1.0 - out) / 2.0).clamp(0.0, 1.0)


def fuse_maps(a: torch.Tensor, b: torch.Tensor, fusion: str) -> torch.Tensor:
    """Combine two maps of equal shape: "harmonic" 2ab/(a+b) (0 where a+b = 0) or "arithmetic" (a+b)/2."""
    if fusion == "arithmetic":
        return (a + b) / 2
    if fusion == "harmonic":
        total = a + b
        safe = torch.where(total > 0, total, torch.ones_like(total))
        return torch.where(total > 0, 2 * a * b / safe, torch.zeros_like(total))
    raise ValueError(f"memory.fusion must be one of {FUSIONS}, got {fusion!r}")


class VisualMemory:
    """Per-layer banks of normal patch features and how to fuse their map with the text map.

    layers: 1-based transformer blocks, ascending (the order the encoder returns intermediates in).
    banks: per layer an (M, C) tensor of L2-normalised patch tokens, M = k * H' * W' (use `build` to
        normalise raw tokens; the constructor stores the banks as given, so a record roundtrip is exact).
    fusion: "harmonic" or "arithmetic".
    """

    def __init__(self, banks: Sequence[torch.Tensor], layers: Sequence[int], fusion: str = "harmonic") -> None:
        if fusion not in FUSIONS:
            raise ValueError(f"memory.fusion must be one of {FUSIONS}, got {fusion!r}")
        if len(banks) != len(layers) or not layers:
            raise ValueError(f"need one bank per layer, got {len(banks)} banks for layers {list(layers)}")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"memory layers must be distinct and ascending, got {list(layers)}")
        self.banks = [b.float() for b in banks]  # already normalised (by `build`, or stored so)
        self.layers = [int(i) for i in layers]
        self.fusion = fusion
        self._on: dict[torch.device, list[torch.Tensor]] = {}

    @classmethod
    def build(
        cls, intermediates_per_layer: Sequence[torch.Tensor], layers: Sequence[int], fusion: str = "harmonic"
    ) -> VisualMemory:
        """From the shots' original-path tokens: per layer (K, H', W', C), in the order of `layers`."""
        if len(intermediates_per_layer) != len(layers):
            raise ValueError(f"got {len(intermediates_per_layer)} token maps for layers {list(layers)}")
        order = sorted(range(len(layers)), key=lambda i: layers[i])
        banks = [
            F.normalize(intermediates_per_layer[i].reshape(-1, intermediates_per_layer[i].shape[-1]).float(), dim=-1)
            for i in order
        ]
        return cls(banks, [layers[i] for i in order], fusion)

    def _banks_on(self, device: torch.device) -> list[torch.Tensor]:
        if device not in self._on:
            self._on[device] = [b.to(device) for b in self.banks]
        return self._on[device]

    @torch.no_grad()
    def memory_map(self, intermediates: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per layer (B, H', W', C) test tokens (ascending `layers` order) -> (B, H', W') map in [0, 1]."""
        if len(intermediates) != len(self.layers):
            raise ValueError(f"memory needs tokens of layers {self.layers}, got {len(intermediates)} maps")
        banks = self._banks_on(intermediates[0].device)
        total = None
        for tokens, bank in zip(intermediates, banks, strict=True):
            b, h, w, c = tokens.shape
            if c != bank.shape[1]:
                raise ValueError(f"memory bank width {bank.shape[1]} != token width {c} (another backbone?)")
            queries = F.normalize(tokens.reshape(-1, c).float(), dim=-1)
            dist = nearest_distance(queries, bank).reshape(b, h, w)
            total = dist if total is None else total + dist
        return total / len(self.layers)

    @torch.no_grad()
    def fuse(self, text_maps: torch.Tensor, intermediates: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """text_maps (B, H, W) with H, W = `size`, test tokens per layer -> fused (B, H, W) maps."""
        mem = self.memory_map(intermediates)[:, None]
        mem = F.interpolate(mem, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        return fuse_maps(text_maps, mem.to(text_maps.dtype), self.fusion)

    def to_record(self) -> dict[str, Any]:
        """{"layers", "fusion", "banks": [(M, C) CPU tensors]}: what the prompts file stores under "memory"."""
        return {"layers": list(self.layers), "fusion": self.fusion, "banks": [b.detach().cpu() for b in self.banks]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> VisualMemory:
        """Inverse of `to_record`."""
        return cls(list(record["banks"]), list(record["layers"]), str(record["fusion"]))


def build_memory(
    bundle: ClipBundle,
    laa: LaaConfig,
    images: torch.Tensor,
    layers: Sequence[int],
    fusion: str = "harmonic",
    batch_size: int = 16,
) -> VisualMemory:
    """The memory of the shot images (K, 3, H, W) in [0, 1] at `layers` (1-based blocks) of `bundle`.

    `laa`: the encoder settings; the memory reads only the original
    path, so it does not depend on them, but the same encoder code path is used as at inference.
    ValueError when a layer is outside the model's blocks (e.g. [6, 9, 12] on the 4-block mpad-tiny).
    """
    layers = sorted({int(i) for i in layers})
    depth = len(bundle.model.visual.transformer.resblocks)
    bad = [i for i in layers if not 1 <= i <= depth]
    if not layers or bad:
        raise ValueError(f"memory.layers {layers}: {bundle.name} has blocks 1..{depth} (1-based); got {bad or 'none'}")
    encoder = build_encoder(bundle, laa, intermediate_layers=layers)
    tokens = encode_batched(encoder, bundle, images, batch_size).intermediates
    return VisualMemory.build([t.cpu() for t in tokens], layers, fusion)  # banks built on the CPU
