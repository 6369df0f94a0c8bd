"""Floating-point bounds shared by the tests, derived from what a comparison can guarantee (never from a run).

Two fp32 computations of the same formula that differ only in the order of their sums (another kernel, batch size,
thread count, sequence length, backend) differ by at most 2 K u sum|a b| per length-K sum, u = 2^-24. In these
towers sum|a b| is of the size of the values themselves (LayerNorm'd inputs, weights of scale 1/sqrt(width)), and
an error passes on with gain about 1, so a whole tower is off by at most 2 u x (the sum of the reduction lengths
on the way) relative to the size of its outputs: `reorder_bound`. A wrong computation (a missing token, mask,
layer or cast, a shuffled batch) is off by O(1) of that size.

The reduction lengths on the way through the tiny model (mpad-tiny, width 128, 4 heads of 32, MLP 512):
- image tower, 65 tokens: the patch embedding (3 x 8 x 8 = 192), 4 blocks x (qkv 128 + scores 32 + attention x V
  65 + out_proj 128 + c_fc 128 + c_proj 512 = 993), the projection 128: 4292;
- text tower, <= 77 tokens: 3 blocks x (128 + 32 + 77 + 128 + 128 + 512 = 1005) + the projection 128: 3143; its
  backward pass computes each product's transpose as well: about twice that.

Checked on a Xeon with avx512f/bw/vl/vnni, avx512_bf16 and AMX (torch capability AVX512; oneDNN using AMX), with
oneDNN held to AVX512_CORE_VNNI and to AVX2, with ATEN_CPU_CAPABILITY=default and avx2, and with 1 and 2 threads.
"""

from __future__ import annotations

import torch

FP32_U = 2.0**-24
IMAGE_TERMS = 4292
TEXT_TERMS = 3143
TEXT_BACKWARD_TERMS = 2 * TEXT_TERMS


def reorder_bound(terms: int) -> float:
    """Relative bound (to the largest |value|) between two summation orders of a computation through `terms`
    reduction terms in fp32: 2 u terms (image tower 2.6e-4, text tower 1.9e-4, text backward 3.7e-4)."""
    return 2 * terms * FP32_U


def assert_reordered_close(actual: torch.Tensor, expected: torch.Tensor, terms: int) -> None:
    """`actual` equals `expected` up to another summation order through `terms` reduction terms: elementwise
    within reorder_bound(terms) x max|expected| (not relative to each element: a value near 0 has the same
    absolute rounding as its neighbours)."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=reorder_bound(terms) * scale)
