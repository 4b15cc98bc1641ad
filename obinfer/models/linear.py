"""`Linear`: `nn.Linear` whose few-row float32 products on CPU use every thread.

A decoding step multiplies one row (or a few: a batch of caches) by every weight matrix, so it is a
stream of the weights through the cores. torch's CPU float32 kernel for that (MKL's, through
`F.linear`) runs on one thread whatever `torch.get_num_threads()` says: measured on 2 Zen 4 cores, a
one-row product streams SmolLM2's matrices at 11-22 GB/s, the same with 1 thread or 2, while the machine
reads 33+ GB/s. A batched matmul (`torch.bmm`) does spread its batch over the threads, so `Linear`
splits the inner (input) dimension into P = `torch.get_num_threads()` blocks, multiplies each block of x
by its block of rows of the (in, out) weight as one P-batch `bmm`, and adds the P partial products:

    x W^T = sum_p x[:, block p] (W^T)[block p, :]

The weight is stored input-major on CPU in float32 (`obinfer.weights.input_major`: W^T is a contiguous
(in, out) tensor), so the P blocks are a free view; nothing is copied. Measured (2 threads, whole
decoding steps at 1k tokens): 1.45x faster at one row on SmolLM2-135M and Qwen2.5-0.5B, 1.15-1.5x at 2-8
rows; products with more than `SPLIT_MAX_ROWS` rows (a prefill) gain nothing and take `F.linear`.

Numerics: the P partial sums are added at the end, a different summation order from one dot product,
so outputs differ from `F.linear` by float32 rounding only (~1e-5 relative; tests/test_linear.py).
bfloat16 / float16 weights and other devices always take `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPLIT_MAX_ROWS = 16  # above this many rows the split product is no faster (measured: 0.95-1.4x at 32-64)
MIN_BLOCK = 64  # inner-dimension elements per block, at least


def split_blocks(x: Tensor, weight: Tensor) -> int:
    """How many inner-dimension blocks `Linear` multiplies x by weight (out, in) in: 1 means `F.linear`."""
    P = torch.get_num_threads()
    rows = x.numel() // max(1, x.shape[-1])
    if (
        P < 2
        or rows > SPLIT_MAX_ROWS
        or weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or x.dtype != torch.float32
        or not weight.t().is_contiguous()  # input-major storage: the blocks are views
        or weight.shape[1] % P
        or weight.shape[1] // P < MIN_BLOCK
    ):
        return 1
    return P


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, as P inner-dimension blocks in one batched matmul when it pays."""
    P = split_blocks(x, weight)
    if P == 1:
        return F.linear(x, weight, bias)
    K, N = weight.shape[1], weight.shape[0]
    rows = x.numel() // K
    xs = x.reshape(rows, P, K // P).transpose(0, 1)  # (P, rows, K/P)
    out = torch.bmm(xs, weight.t().view(P, K // P, N)).sum(0)  # (rows, N)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], N)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
