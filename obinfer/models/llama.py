"""The decoder: Llama-3.x and Qwen-2.5 in one small file.

A token's path: `embed_tokens` -> for each `Block`: RMSNorm -> q/k/v projections -> RoPE on q and k ->
append k, v to this layer's `LayerCache` -> attention of q over the cache (`attention.attend`, in
obinfer/cache/attention.py) -> o_proj -> residual -> RMSNorm -> SwiGLU MLP -> residual; then the final
RMSNorm and the LM head give logits.

Module names mirror Hugging Face's (`model.layers.{i}.self_attn.q_proj`, ...), so HF safetensors
load with `load_state_dict(strict=True)` and no renaming. The KV cache is an argument, never a
module attribute; an optional `observer` is called after each layer's attention with that layer's
queries, which is how presses compress the cache (see `obinfer/cache/presses.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from obinfer.cache import attention
from obinfer.cache.kv_cache import KVCache, LayerCache
from obinfer.config import ModelConfig
from obinfer.models.linear import Fused, Linear, fuse_projections

# observer(layer_idx, q (B, Hq, T, D) after RoPE, q_pos (B, T), layer_cache) -> None
Observer = Callable[[int, Tensor, Tensor, LayerCache], None]


class LayerObserver:
    """`observer` bound to layer `idx`, as `Attention.forward` calls it.

    `observe(q, pos, layer)` runs after the layer's attention. An observer function with an
    ``observe_input(idx, x, pos, layer)`` attribute is also shown the layer's normalised input x (B, T, C)
    right after the new tokens' K/V are appended (`input`; TRIM-KV's retention gates read it). One that also carries an
    ``attend_and_observe(idx, q, q_pos, layer)`` attribute (a press whose scores compute the attention
    anyway, H2O: `PressRun.prefill_observer`) is instead asked for the attention outputs first
    (`attend`), and compresses the layer itself; it returns None where it does not attend, and the
    usual path runs.
    """

    __slots__ = ("observer", "idx", "_attend", "_input")

    def __init__(self, observer: Observer, idx: int):
        self.observer, self.idx = observer, idx
        self._attend = getattr(observer, "attend_and_observe", None)
        self._input = getattr(observer, "observe_input", None)

    def __call__(self, q: Tensor, pos: Tensor, layer: LayerCache) -> None:
        self.observer(self.idx, q, pos, layer)

    def input(self, x: Tensor, pos: Tensor, layer: LayerCache) -> None:
        if self._input is not None:
            self._input(self.idx, x, pos, layer)

    def attend(self, q: Tensor, pos: Tensor, layer: LayerCache) -> Tensor | None:
        return None if self._attend is None else self._attend(self.idx, q, pos, layer)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., C). Normalised in float32, as the reference implementation does."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies (D/2,) float32, with Llama-3.1's frequency-dependent scaling if configured."""
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_len = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)  # long wavelengths: slowed down
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: Tensor, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin (B, 1, T, D) for positions pos (B, T), rotate-half layout (each angle twice)."""
    ang = pos.float()[..., None] * inv_freq.to(pos.device)[None, None, :]  # (B, T, D/2)
    emb = torch.cat([ang, ang], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D): dim i pairs with dim i + D/2 (Hugging Face's rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        C, D, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = Linear(C, cfg.n_heads * D, bias=bias)
        self.k_proj = Linear(C, cfg.n_kv_heads * D, bias=bias)
        self.v_proj = Linear(C, cfg.n_kv_heads * D, bias=bias)
        self.o_proj = Linear(cfg.n_heads * D, C, bias=False)
        self.fused_qkv: Fused | None = None  # q/k/v as one product (`linear.fuse_projections`)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        pos: Tensor,
        cache: LayerCache,
        observe: Callable | None,
        n_pad: int | None = None,
    ) -> Tensor:
        """x: (B, T, C) -> (B, T, C). Appends this step's K/V to `cache` and attends over it.

        n_pad: the number of pad positions (-1) in pos, if known (saves the cache a device read).
        """
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.fused_qkv(x) if self.fused_qkv is not None else None
        if qkv is not None:  # one product, heads side by side: RoPE on the q and k heads at once
            qkv = qkv.view(B, T, H + 2 * Hkv, D).transpose(1, 2)
            qk = apply_rope(qkv[:, : H + Hkv], cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]  # (B, Hq, T, D), (B, Hkv, T, D) x 2
        else:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, Hq, T, D)
            k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # the cache now holds this step's T tokens as the last T slots of each head
        cache.append(k, v, pos, n_pad)
        if observe is not None:
            observe.input(x, pos, cache)
        out = observe.attend(q, pos, cache) if observe is not None else None
        if out is None:  # (B, Hq, T, D): q over every slot it may see (causal, no pads)
            out = attention.attend(cache, q, T)
            if observe is not None:  # after the layer's own attention: compression never changes this step
                observe(q, pos, cache)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, F_, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(C, F_, bias=bias)
        self.up_proj = Linear(C, F_, bias=bias)
        self.down_proj = Linear(F_, C, bias=bias)
        self.fused_gate_up: Fused | None = None  # gate and up as one product (`linear.fuse_projections`)

    def forward(self, x: Tensor) -> Tensor:
        gu = self.fused_gate_up(x) if self.fused_gate_up is not None else None
        if gu is not None:
            gate, up = gu.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        pos: Tensor,
        cache: LayerCache,
        observe,  # noqa: ANN001
        n_pad: int | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, cache, observe, n_pad)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # the table is given, not initialised: on the meta device (`weights.load_model`) nn.Embedding's
        # own init imports sympy, 1.2 s of every command's start-up
        table = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=table)
        if not table.is_meta:
            nn.init.normal_(table)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """A decoder-only LM. `forward(ids, cache)` runs T new tokens against (and into) the cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq = torch.empty(cfg.head_dim // 2)  # on the meta device (loading) an empty placeholder
        self.register_buffer(
            "inv_freq", inv_freq if inv_freq.is_meta else rope_inv_freq(cfg), persistent=False
        )

    quantization: str | None = None  # "int8" / "int4" after obinfer.quantize.quantize_int8 / quantize_int4

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and KV cache's) dtype; with int8 weights, the dtype the model was loaded in."""
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        """`.to(...)`, `.float()`, `.cuda()`, ...: the fused products (`linear.fuse_projections`) are
        dropped first, so their old storage is not kept alive beside the converted weights, and built
        again from the converted ones."""
        fused = any(b.self_attn.fused_qkv or b.mlp.fused_gate_up for b in self.model.layers)
        for b in self.model.layers:
            b.self_attn.fused_qkv = b.mlp.fused_gate_up = None
        out = super()._apply(fn, recurse)
        return fuse_projections(self) if fused else out

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache.for_model(self.cfg, batch, self.dtype, self.device)

    def forward(
        self,
        ids: Tensor,
        cache: KVCache,
        *,
        n_pad: Tensor | None = None,
        observer: Observer | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Run new tokens through the model.

        Args:
            ids: (B, T) token ids, left-padded if rows differ in length.
            cache: the KV cache; new K/V are appended and its position counter advances.
            n_pad: (B,) left-padding tokens per row (prefill only); they get position -1.
            observer: called after each layer's attention as observer(layer, q, q_pos, layer_cache).
            last_only: return logits only for the last position, (B, 1, V).
        Returns:
            logits (B, T, V) (or (B, 1, V)) in the model's dtype.
        """
        B, T = ids.shape
        pos = cache.next_positions(T, n_pad)  # (B, T)
        n_pads = 0 if n_pad is None else int((pos < 0).sum())  # counted once here, not by every layer
        cos, sin = rope_cos_sin(self.inv_freq, pos.clamp(min=0), self.dtype)
        x = self.model.embed_tokens(ids)
        for i, (block, layer_cache) in enumerate(zip(self.model.layers, cache.layers, strict=True)):
            observe = None if observer is None else LayerObserver(observer, i)
            x = block(x, cos, sin, pos, layer_cache, observe, n_pads)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))
