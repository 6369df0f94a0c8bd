"""Locality-aware dual-path image encoder (paper sec. 3.5, eq. 11-12; how it is read: docs/method.md#laa).

The original ViT path is open_clip's, so the global image embedding is `encode_image`'s (equal within float
rounding). Over the last `layers` blocks a second path is added, as in CLIP Surgery: at each of those blocks it
reads `ln_1` of the *original* stream, applies a dense attention (V-V or Q-K, with the locality mask of eq. 12),
and accumulates the attention outputs; it skips the MLP. The second path's patch tokens, through `ln_post` and
`proj`, are the patch features that text prompts score. Where the blocks are open_clip's plain ones
(`mpad.blocks`), both paths take q, k, v from one in-projection of ln_1 per block, as the block itself would.

The original stream after the last block feeds only the global embedding (and the last block's intermediate
tokens): an encoder built with `image_embedding=False` and without the last block among its intermediate
layers skips that block's original attention and MLP, about 7 % of ViT-B's work, and computes only the
second path there (the patch features are the same function of the image, within float rounding).

CLS treatment ("neighbor-cls-only", sec. 3.2): `cls="neighbor-cls"` (default): each patch attends to its
neighbours within distance k and to the CLS token; `cls="neighbor"`: to its neighbours only. The CLS row itself
is unmasked (the second path's CLS output is never used).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mpad.blocks import merge_heads, plain_blocks, qkv_heads, v_heads

ATTENTIONS = ("vv", "qk")
CLS_MODES = ("neighbor-cls", "neighbor")


def locality_mask(h: int, w: int, k: float) -> torch.Tensor:
    """Eq. 12: (h*w, h*w) float mask, 0 where patches (i,j), (m,n) are within Euclidean distance k, else -inf.

    Patches are numbered row-major: index i*w + j for grid position (i, j).
    """
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], dim=1).double()
    distance = torch.cdist(coords, coords)
    mask = torch.zeros(h * w, h * w)
    mask[distance > k + 1e-9] = -math.inf
    return mask


def token_mask(h: int, w: int, k: float | None, cls: str = "neighbor-cls") -> torch.Tensor | None:
    """The (1+h*w, 1+h*w) additive attention mask over [CLS, patches] for the second path, or None.

    k None or <= 0 means no locality constraint (plain dense attention, the paper's "VV-att").
    """
    if cls not in CLS_MODES:
        raise ValueError(f"laa.cls must be one of {CLS_MODES}, got {cls!r}")
    if k is None or k <= 0:
        return None
    n = h * w
    mask = torch.zeros(n + 1, n + 1)
    mask[1:, 1:] = locality_mask(h, w, k)
    if cls == "neighbor":
        mask[1:, 0] = -math.inf
    return mask


@dataclass
class EncoderOutput:
    """What one forward pass gives.

    image_embedding: (B, D) the original path's global embedding, `encode_image`'s (not normalised); None from
        an encoder built without it.
    patch_features: (B, H', W', D) the second path's patch features after ln_post and proj, L2-normalised.
    intermediates: per requested block, (B, H', W', width) patch tokens of the original path after it.
    All three are fp32 whatever precision the model computes in.
    """

    image_embedding: torch.Tensor | None
    patch_features: torch.Tensor
    intermediates: list[torch.Tensor] = field(default_factory=list)


class LocalityAwareEncoder(nn.Module):
    """Dual-path wrapper around an open_clip `VisionTransformer` (frozen; the wrapped module is shared).

    Args:
        visual: `model.visual` of an open_clip CLIP with a ViT image tower (class-token pooling).
        layers: how many of the last blocks get the second path (1..depth).
        attention: "vv" (V-V self-attention, CLIP Surgery) or "qk" (the block's own Q-K attention).
        k: neighbour distance of eq. 12 in patches; None or <= 0: no mask.
        cls: "neighbor-cls" or "neighbor", see the module docstring.
        intermediate_layers: 1-based block indices whose original-path patch tokens are also returned.
        image_embedding: whether to compute the global embedding (False: it is None, see the module docstring).
    """

    def __init__(
        self,
        visual: nn.Module,
        layers: int,
        attention: str = "vv",
        k: float | None = None,
        cls: str = "neighbor-cls",
        intermediate_layers: Sequence[int] = (),
        image_embedding: bool = True,
    ) -> None:
        super().__init__()
        depth = len(visual.transformer.resblocks)
        if not 1 <= layers <= depth:
            raise ValueError(f"laa.layers must be in 1..{depth} for this model, got {layers}")
        if attention not in ATTENTIONS:
            raise ValueError(f"laa.attention must be one of {ATTENTIONS}, got {attention!r}")
        bad = [i for i in intermediate_layers if not 1 <= i <= depth]
        if bad:
            raise ValueError(f"intermediate layers {bad} outside 1..{depth}")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError("only ViT image towers with class-token pooling are supported")
        self.visual = visual
        self.start = depth - layers
        self.attention = attention
        self.intermediate_layers = tuple(intermediate_layers)
        self.image_embedding = image_embedding
        # The original stream after the last block: needed for the global embedding or that block's tokens only.
        self.last_original = image_embedding or depth in self.intermediate_layers
        self.grid = tuple(int(g) for g in visual.grid_size)
        # open_clip's plain blocks: both paths take q, k, v from one in-projection (`_both_paths`).
        self.shared_projection = plain_blocks(visual.transformer)
        mask = token_mask(*self.grid, k, cls)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        """images: (B, 3, H, W) normalised as the model expects -> EncoderOutput."""
        visual = self.visual
        x = visual._embeds(images)  # (B, 1+N, width), batch first
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        dense = None
        intermediates = []
        last = len(blocks) - 1
        for index, block in enumerate(blocks):
            original = index < last or self.last_original  # the original stream after this block is used
            if index >= self.start and self.shared_projection and original:
                start = x if dense is None else dense  # the second path starts from the stream entering the block
                x, update = self._both_paths(block, x)
                dense = start + update
            else:
                if index >= self.start:
                    update = block.ls_1(self._dense_attention(block.attn, block.ln_1(x)))
                    dense = (x if dense is None else dense) + update
                if original:
                    x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
            if index + 1 in self.intermediate_layers:
                intermediates.append(self._grid(x[:, 1:]))
        pooled = None
        if self.image_embedding:
            pooled, _ = visual._pool(x)
            if visual.proj is not None:
                pooled = pooled @ visual.proj
            pooled = pooled.float()
        patches = visual.ln_post(dense[:, 1:])
        if visual.proj is not None:
            patches = patches @ visual.proj
        # Outputs in fp32 whatever the model's precision: everything downstream (scores, losses) is fp32.
        return EncoderOutput(
            pooled, F.normalize(self._grid(patches).float(), dim=-1), [t.float() for t in intermediates]
        )

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, H', W', C)."""
        return tokens.reshape(tokens.shape[0], *self.grid, tokens.shape[-1])

    def _both_paths(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One block of both paths from one in-projection of ln_1(x) (B, L, width): (the original stream after the
        block, the second path's update ls_1(out_proj(dense attention))). The block itself would project ln_1(x)
        again: the same q, k, v, a quarter of a block's matrix work (tested equal within float rounding)."""
        attn = block.attn
        q, k, v = qkv_heads(attn, block.ln_1(x))
        mask = None if self.mask is None else self.mask.to(q.dtype)
        dense_q, dense_k = (v, v) if self.attention == "vv" else (q, k)
        original = F.scaled_dot_product_attention(q, k, v)
        dense = F.scaled_dot_product_attention(dense_q, dense_k, v, attn_mask=mask)
        original, dense = attn.out_proj(merge_heads(torch.cat([original, dense]))).chunk(2)
        x = x + block.ls_1(original)
        return x + block.ls_2(block.mlp(block.ln_2(x))), block.ls_1(dense)

    def _dense_attention(self, attn: nn.MultiheadAttention, y: torch.Tensor) -> torch.Tensor:
        """Eq. 11 with the block's weights: softmax((QK^T + M) / sqrt(d)) V, Q = K = V for "vv"; y (B, L, width)."""
        if self.attention == "vv":
            q = k = v = v_heads(attn, y)
        else:
            q, k, v = qkv_heads(attn, y)
        mask = None if self.mask is None else self.mask.to(q.dtype)
        return attn.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
