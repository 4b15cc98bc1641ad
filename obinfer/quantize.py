"""Weight-only quantization: int8 (``--quantize int8``), a quarter of float32's bytes to read per token,
and int4 (``--quantize int4``), an eighth for the decoder's layers.

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

**int4** (gpt-fast's scheme; llama.cpp's Q4_1 in spirit): the decoder's linear layers keep 4-bit
weights in groups of `INT4_GROUP` (32) inputs, each group with its own step and offset (asymmetric: the
group's minimum and (max - min) / 15), stored as bfloat16:

    q = round((W - lo) / step)  in [0, 15]        W ~ q * step + lo

and multiply through torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, bfloat16 activations),
which reads the packed nibbles directly: at one row it streamed ~32 G weights/s on 2 Zen 4 cores,
against ~10 G/s for the int8 kernel, whose per-weight work, not the memory, bounds it. The LM head
(and the tied embedding that shares it) stays int8, as llama.cpp's Q4 files keep their output matrix
at 6-8 bits. A layer whose shape the kernel cannot take (inputs not a multiple of `INT4_GROUP`,
outputs not a multiple of 16) stays int8 too, as does every layer on a torch that lacks the CPU int4
kernel (`int4_fits`). The int4 kernel is the CPU's: other devices are refused.
A checkpoint that was shipped in 4-bit blocks of 32 (the embedded SmolLM2's Q4_1 GGUF) comes back
almost exactly (mean KL to float32 0.003, below int8's 0.006); others lose more (Qwen2.5-Coder-0.5B
from its 5-6 bit GGUF: KL 0.05, top-1 agreement 87%; docs/results.md). Its prefill runs at
float32-like speed (~160 GFLOP/s here; the int8 path dequantizes to bfloat16 instead, ~400).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from obinfer.errors import UserError
from obinfer.hardware import native_bf16
from obinfer.models.linear import fuse_projections

QUANTIZATIONS = ("int8", "int4")
INT4_GROUP = 32
"""Inputs per int4 group (one step and offset each), as in llama.cpp's Q4 / Q5 / Q8 blocks (a model that was
shipped in those formats, like the embedded SmolLM2 and Qwen2.5-Coder GGUFs, is close to exact in it)."""
INT4_PACK_ROWS = 64
"""torch's CPU int4 packing interleaves blocks of 64 output rows with AVX-512, 32 with AVX2 or none:
parts of whole 64-row blocks stack the same way under both (`Int4Linear.fuse`)."""
PACKED_MAX_ROWS = 16
"""At most this many rows go through torch's packed int8 kernel on the CPU (above, dequantize: at 32
rows and more the dequantized bfloat16 matmul was faster on a 2-core AVX512-BF16 CPU)."""


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 (out, in), scale float32 (out,)) for a weight (out, in): symmetric, one scale per row."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _cat_parts(parts: Sequence[nn.Module], name: str, dim: int = 0) -> Tensor | None:
    """The parts' tensors called `name`, concatenated along `dim` (None for absent biases)."""
    ts = [getattr(p, name) for p in parts]
    return None if ts[0] is None else torch.cat([t.detach() for t in ts], dim)


def _share_storage(parts: Sequence[nn.Module], fused: nn.Module, dims: dict[str, int]) -> nn.Module:
    """Make each part's tensors named in `dims` (split along that dim by the parts' output sizes) and its
    bias views of `fused`'s, so nothing is held twice (the quantized layers' `fuse`). Returns `fused`."""
    sizes = [p.out_features for p in parts]
    splits = {name: getattr(fused, name).split(sizes, dim) for name, dim in dims.items()}
    biases = fused.bias.split(sizes) if fused.bias is not None else [None] * len(parts)
    for i, (p, b) in enumerate(zip(parts, biases, strict=True)):
        for name, views in splits.items():
            setattr(p, name, views[i])
        if b is not None:
            p.bias = nn.Parameter(b, requires_grad=False)
    return fused


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
        cat = functools.partial(_cat_parts, parts)
        fused = cls(cat("weight"), cat("scale"), cat("bias"), parts[0].compute_dtype)
        return _share_storage(parts, fused, {"weight": 0, "scale": 0, "scale_c": 0})

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


def quantize_groups(w: Tensor, group: int | None = None) -> tuple[Tensor, Tensor]:
    """(q int32 (out, in) in [0, 15], steps_offsets bfloat16 (in // group, out, 2)) for a weight (out, in).

    Per group of `group` inputs of a row: step = (max - min) / 15, offset = min, both rounded to bfloat16
    (what the kernel reads), and q = round((W - offset) / step) with the rounded values, so
    ``q * step + offset`` (`dequantize_groups`) is within step / 2 of W, up to the bfloat16 rounding of
    the offset. The kernel's own form stores ``offset + 8 step`` (its nibbles are centred on 8).
    """
    group = INT4_GROUP if group is None else group
    w = w.detach().float()
    N, K = w.shape
    wg = w.view(N, K // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    step = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16).float()
    lo = lo.to(torch.bfloat16).float()
    q = torch.round((wg - lo[..., None]) / step[..., None]).clamp_(0, 15).to(torch.int32).view(N, K)
    return q, torch.stack([step, lo], -1).transpose(0, 1).to(torch.bfloat16).contiguous()


def dequantize_groups(q: Tensor, steps_offsets: Tensor) -> Tensor:
    """The float32 weight (out, in) that `quantize_groups`' output stands for."""
    N, K = q.shape
    so = steps_offsets.float().transpose(0, 1)  # (out, groups, 2)
    return (q.view(N, so.shape[1], -1).float() * so[..., :1] + so[..., 1:]).view(N, K)


def int4_fits(lin: nn.Module, device: torch.device | str) -> bool:
    """Whether torch's CPU int4 kernel takes this layer (see the module docstring)."""
    return (
        torch.device(device).type == "cpu"
        and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        and lin.in_features % INT4_GROUP == 0
        and lin.out_features % 16 == 0
    )


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights in groups of `INT4_GROUP` inputs (see the module docstring).

    Buffers: ``weight``, the kernel's packed nibbles (uint8, (out, in / 2)); ``scales_zeros``, per group
    and output the step and ``offset + 8 step`` in bfloat16 ((in / group, out, 2): the kernel's form).
    """

    def __init__(self, packed: Tensor, scales_zeros: Tensor, in_features: int, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, packed.shape[0]
        self.register_buffer("weight", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int4Linear:
        q, so = quantize_groups(lin.weight)
        sz = so.float()
        sz[..., 1] += 8 * sz[..., 0]  # the kernel subtracts 8 from each nibble
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        return cls(packed, sz.to(torch.bfloat16), lin.in_features, lin.bias)

    @classmethod
    def fuse(cls, parts: Sequence[Int4Linear]) -> Int4Linear | None:
        """One Int4Linear whose outputs are the parts' in order (`obinfer.models.linear.fuse`); the parts'
        buffers become views of it. The kernel packs blocks of `INT4_PACK_ROWS` output rows, each on its
        own, so when every part but the last fills whole blocks the fused weight is the packed weights
        stacked (tests/test_quantize.py checks both facts). None when that does not hold, or when the
        parts differ in input size or in having a bias."""
        if len({(p.in_features, p.bias is None) for p in parts}) != 1:
            return None
        if any(p.out_features % INT4_PACK_ROWS for p in parts[:-1]):
            return None
        cat = functools.partial(_cat_parts, parts)
        fused = cls(cat("weight"), cat("scales_zeros", dim=1), parts[0].in_features, cat("bias"))
        return _share_storage(parts, fused, {"weight": 0, "scales_zeros": 1})

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        sz = self.scales_zeros.to(torch.bfloat16).contiguous()  # (a fused part's is a strided view)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, INT4_GROUP, sz)
        y = y.to(x.dtype).view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, int4 (groups of {INT4_GROUP}), compute=bfloat16"
        )


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


def check_quantize(quantize: str | None, device: str = "cpu") -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantize!r}; choose from {', '.join(QUANTIZATIONS)}")
    if quantize == "int4" and torch.device(device).type != "cpu":
        raise UserError(f"--quantize int4 runs on the CPU only (torch's int4 kernel), not on {device}")


def quantize_int8(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the decoder's linear layers and LM head (and a tied embedding) by int8 ones, in place.

    Args:
        model: an `obinfer.models.llama.Transformer`.
        compute_dtype: the matmuls' dtype; default bfloat16 where the device has native bfloat16,
            else the model's dtype.
    Returns:
        the model (quantized; its float weights are released).
    """
    return _quantize(model, compute_dtype, bits=8)


def quantize_int4(model: nn.Module) -> nn.Module:
    """`quantize_int8`, but with the decoder's linear layers in 4 bits (`Int4Linear`) wherever the int4
    kernel takes them; the LM head, a tied embedding and any other layer stay int8. CPU only."""
    check_quantize("int4", str(model.device))
    return _quantize(model, None, bits=4)


def _quantize(model: nn.Module, compute_dtype: torch.dtype | None, bits: int) -> nn.Module:
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
                    if bits == 4 and int4_fits(child, model.device):
                        setattr(parent, name, Int4Linear.from_linear(child))
                    else:
                        setattr(parent, name, Int8Linear.from_linear(child, compute_dtype))
    model.lm_head = Int8Linear.from_linear(model.lm_head, compute_dtype)
    if tied:
        model.model.embed_tokens = Int8Embedding(model.lm_head, dtype)
    model.quantization = f"int{bits}"
    return fuse_projections(model)  # (also drops the float weights the old fused products held)
