"""Weight-only int8 quantization (``--quantize int8``): a quarter of float32's bytes to read per token.

Every linear layer of the decoder and the LM head keeps its weight as int8 with one float scale per
output channel (symmetric, per row):

    scale[o] = max_i |W[o, i]| / 127        q[o, i] = round(W[o, i] / scale[o])  in [-127, 127]
    y = (x @ q.T) * scale + bias

Activations, norms, RoPE, attention and the KV cache are untouched (the model's dtype). Decoding at
batch 1 reads the weights once per token, so its speed is bound by their bytes: int8 reads 4x fewer
than float32, 2x fewer than bfloat16. A tied embedding is quantized with the LM head and shares its
int8 matrix (a looked-up row is dequantized).

The matmul itself runs in `compute_dtype`: bfloat16 where the hardware has native bfloat16
(`obinfer.hardware.native_bf16`), else the model's dtype. On the CPU a few rows at a time (decoding) go
through torch's packed int8 kernel, which reads the int8 weight directly; more rows (a prefill) are
compute-bound, so the weight is dequantized to `compute_dtype` and multiplied as usual.

The error is that of rounding each weight to 1/254 of its row's range plus, with a bfloat16
`compute_dtype`, rounding activations to 8 significant bits; tests/test_quantize.py states the
tolerances against float32 and checks greedy answers on the real model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from obinfer.errors import UserError
from obinfer.hardware import native_bf16
from obinfer.models.linear import fuse_projections

QUANTIZATIONS = ("int8",)
PACKED_MAX_ROWS = 16
"""At most this many rows go through torch's packed int8 kernel on the CPU (above, dequantize: at 32
rows and more the dequantized bfloat16 matmul was faster on a 2-core AVX512-BF16 CPU)."""


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 (out, in), scale float32 (out,)) for a weight (out, in): symmetric, one scale per row."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _packed_kernel() -> bool:
    return hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and per-output-channel scales (see the module docstring)."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scale", scale.float())  # float32, for dequantizing
        self.register_buffer("scale_c", scale.to(compute_dtype))  # the packed kernel's dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, compute_dtype: torch.dtype) -> Int8Linear:
        q, scale = quantize_rows(lin.weight)
        return cls(q, scale, lin.bias, compute_dtype)

    @classmethod
    def fuse(cls, parts: Sequence[Int8Linear]) -> Int8Linear | None:
        """One Int8Linear whose rows are the parts' rows in order (see `obinfer.models.linear.fuse`); the
        parts' buffers become row views of it. None when the parts differ in input size, compute dtype or
        in having a bias."""
        if len({(p.in_features, p.compute_dtype, p.bias is None) for p in parts}) != 1:
            return None
        bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
        fused = cls(
            torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts]), bias,
            parts[0].compute_dtype,
        )  # fmt: skip
        sizes = [p.out_features for p in parts]
        views = zip(*(t.split(sizes) for t in (fused.weight, fused.scale, fused.scale_c)), strict=True)
        biases = fused.bias.split(sizes) if bias is not None else [None] * len(parts)
        for p, (w, s, sc), b in zip(parts, views, biases, strict=True):
            p.weight, p.scale, p.scale_c = w, s, sc
            if b is not None:
                p.bias = nn.Parameter(b, requires_grad=False)
        return fused

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight (out, in) that the int8 values and scales stand for."""
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.compute_dtype)
        if x2.device.type == "cpu" and x2.shape[0] <= PACKED_MAX_ROWS and _packed_kernel():
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight, self.scale_c)
        else:
            y = F.linear(x2, self.dequantized(self.compute_dtype))
        y = y.to(x.dtype).view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8, compute={self.compute_dtype}"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with per-row scales (shared with a tied Int8Linear head)."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.head = [head]  # a plain list: the head is registered once, as lm_head
        self.dtype = dtype

    @property
    def weight(self) -> Tensor:
        return self.head[0].weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.head[0]
        return (h.weight[ids].to(torch.float32) * h.scale[ids, None]).to(self.dtype)


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantize!r}; choose from {', '.join(QUANTIZATIONS)}")


def quantize_int8(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the decoder's linear layers and LM head (and a tied embedding) by int8 ones, in place.

    Args:
        model: an `obinfer.models.llama.Transformer`.
        compute_dtype: the matmuls' dtype; default bfloat16 where the device has native bfloat16,
            else the model's dtype.
    Returns:
        the model (quantized; its float weights are released).
    """
    from obinfer.weights import weights_digest

    weights_digest(model)  # of the float weights, kept on the model (TRIM-KV gates files are checked by it)
    dtype = model.dtype
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if native_bf16(str(model.device)) else dtype
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.from_linear(child, compute_dtype))
    model.lm_head = Int8Linear.from_linear(model.lm_head, compute_dtype)
    if tied:
        model.model.embed_tokens = Int8Embedding(model.lm_head, dtype)
    model.quantization = "int8"
    return fuse_projections(model)  # (also drops the float weights the old fused products held)
