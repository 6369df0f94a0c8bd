"""open_clip's transformer blocks run by parts, where a caller shares work the block would do twice.

`plain_blocks` tells whether a tower's blocks are open_clip's `ResidualAttentionBlock` with a plain batch-first
`nn.MultiheadAttention` (ln_1, attn, ls_1, ln_2, mlp, ls_2; no cross-attention, no extra key/value biases): only
then may their attention be recomputed from `attn.in_proj_weight` / `out_proj` as the block computes it
(`mpad.prompts.TextEncoder.forward_shared`, `mpad.laa.LocalityAwareEncoder`). Other blocks take the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PARTS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")


def plain_blocks(transformer: nn.Module) -> bool:
    """Whether every block of `transformer` is a ResidualAttentionBlock with a plain batch-first self-attention."""
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not getattr(transformer, "batch_first", False):
        return False
    for block in blocks:
        attn = getattr(block, "attn", None)
        if not all(hasattr(block, part) for part in _PARTS) or hasattr(block, "ln_1_kv"):
            return False
        if not isinstance(attn, nn.MultiheadAttention) or not (attn.batch_first and attn._qkv_same_embed_dim):
            return False
        if attn.bias_k is not None or attn.add_zero_attn:
            return False
    return True


def qkv_heads(attn: nn.MultiheadAttention, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, L, width), already through ln_1 -> q, k, v (B, heads, L, width / heads): the block's in-projection."""
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return split_heads(q, attn.num_heads), split_heads(k, attn.num_heads), split_heads(v, attn.num_heads)


def v_heads(attn: nn.MultiheadAttention, y: torch.Tensor) -> torch.Tensor:
    """y (B, L, width), already through ln_1 -> v (B, heads, L, width / heads) alone: the last third of the block's
    in-projection (what V-V attention needs), without computing q and k."""
    width = y.shape[-1]
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[2 * width :]
    return split_heads(F.linear(y, attn.in_proj_weight[2 * width :], bias), attn.num_heads)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, width) -> (B, heads, L, width / heads)."""
    batch, length, width = t.shape
    return t.reshape(batch, length, heads, width // heads).transpose(1, 2)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, head width) -> (B, L, width)."""
    batch, heads, length, head_width = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * head_width)
