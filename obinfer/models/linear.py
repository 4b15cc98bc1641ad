"""`Linear`: `nn.Linear` whose few-row float32 products on CPU use every thread (and whose one-row
bfloat16 products skip oneDNN).

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
bfloat16 / float16 weights and other devices take `F.linear`.

One bfloat16 row on CPU: torch sends a bfloat16 `F.linear` to oneDNN, whose one-row product streamed the
weights at 15-32 GB/s on a 2-core Zen 4 machine (no AMX), Qwen2.5-0.5B's LM head at 15.5 GB/s; the same
call with oneDNN switched off goes to torch's own BLAS path (MKL's bfloat16 GEMM, float32 accumulation)
at 34-47 GB/s, the LM head at 35.8. So `linear` makes a one-row bfloat16 product with oneDNN off
(`one_row_bfloat16`; the switch is torch's process-wide flag, set back after the call): whole decoding
steps 1.6-1.7x faster in bfloat16 (SmolLM2 26.2 -> 41.6 tok/s, Qwen 14.5 -> 24.3 at 1k), logits as close to
float32 as before (mean KL 0.0015 / 0.0009 against 0.0013 / 0.0009). Two or more rows stay with oneDNN
(faster from 2-4 rows on); float16 gains nothing (equal speed) and stays too; a build without MKL (ARM)
keeps oneDNN, whose replacement there would be torch's slow reference loops.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

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


_MKL = torch.backends.mkl.is_available()


def one_row_bfloat16(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` multiplies x by weight (out, in) with oneDNN switched off: one bfloat16 row on a
    CPU build with MKL, the weight row-major (out, in) as loaded (the fast layout of that path)."""
    return (
        _MKL
        and weight.dtype == torch.bfloat16
        and x.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and x.numel() == weight.shape[1]
        and weight.is_contiguous()
    )


def _without_onednn(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return F.linear(x, weight, bias)
    finally:
        torch.backends.mkldnn.enabled = enabled


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, as P inner-dimension blocks in one batched matmul when it pays, and
    without oneDNN for one bfloat16 row (`one_row_bfloat16`)."""
    P = split_blocks(x, weight)
    if P == 1:
        if one_row_bfloat16(x, weight):
            return _without_onednn(x, weight, bias)
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


# ------------------------------------------------------------------------------- fused projections
def fuse(parts: Sequence[nn.Module]) -> Callable[[Tensor], Tensor] | None:
    """One operator for several linear layers that read the same input (q/k/v, gate/up): it computes
    ``torch.cat([p(x) for p in parts], -1)`` as one product, and the parts' weights (and biases) become
    views into its storage, so nothing is held twice and every part still works alone.

    `Linear` parts of one dtype and device are fused here (the storage keeps their layout: input-major
    float32 on CPU stays input-major); a part type with a ``fuse`` classmethod (`Int8Linear`,
    `Int4Linear`) fuses itself. Anything else (mixed types, some parts with a bias and some without): None.
    """
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts):
        return None
    if kind is not Linear:
        own = getattr(kind, "fuse", None)
        return own(parts) if own is not None else None
    ws, bs = [p.weight for p in parts], [p.bias for p in parts]
    if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1 or len({b is None for b in bs}) != 1:
        return None
    sizes = [w.shape[0] for w in ws]
    with torch.no_grad():
        if all(w.t().is_contiguous() for w in ws):  # input-major: (in, out) columns side by side
            buf = torch.empty(ws[0].shape[1], sum(sizes), dtype=ws[0].dtype, device=ws[0].device)
            cols = buf.split(sizes, dim=1)
            for c, w in zip(cols, ws, strict=True):
                c.copy_(w.t())
            weight, views = buf.t(), [c.t() for c in cols]
        else:
            weight = torch.cat(ws)
            views = list(weight.split(sizes))
        bias = None if bs[0] is None else torch.cat(bs)
    biases = bias.split(sizes) if bias is not None else [None] * len(parts)
    for p, view, b, w_old, b_old in zip(parts, views, biases, ws, bs, strict=True):
        p.weight = nn.Parameter(view, requires_grad=w_old.requires_grad)
        if b is not None:
            p.bias = nn.Parameter(b, requires_grad=b_old.requires_grad)
    return functools.partial(linear, weight=weight, bias=bias)


class Fused:
    """A fused operator (`fuse`) for parts whose first is `first`, used only while `first` still holds
    the weight it was fused with: a weight replaced since (`.to(...)`, a new Parameter) falls back to
    the separate parts, never to stale values. Not a module: it adds nothing to the state dict."""

    __slots__ = ("op", "first", "ptr")

    def __init__(self, op: Callable[[Tensor], Tensor], first: nn.Module):
        self.op, self.first, self.ptr = op, first, first.weight.data_ptr()

    def __call__(self, x: Tensor) -> Tensor | None:
        return self.op(x) if self.first.weight.data_ptr() == self.ptr else None


def fuse_projections(model: nn.Module) -> nn.Module:
    """Fuse every decoder layer's q/k/v projections and its MLP's gate/up projections (`fuse`), in place.

    A decoding step then makes 4 products per layer instead of 7 (SmolLM2-135M float32 decoding on
    2 threads: 37.9 -> 32.9 ms a step, the same logits). `obinfer.weights.load_model` and
    `obinfer.quantize.quantize_int8` / `quantize_int4` call it; a model built by hand works without it.
    """
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        op = fuse([a.q_proj, a.k_proj, a.v_proj])
        a.fused_qkv = Fused(op, a.q_proj) if op is not None else None
        op = fuse([m.gate_proj, m.up_proj])
        m.fused_gate_up = Fused(op, m.gate_proj) if op is not None else None
    return model
