"""Attention of new queries over one layer's KV cache: pure functions over a `LayerCache`.

`obinfer/models/llama.py` appends a step's keys and values to the layer's cache and then calls
`attend(layer, q, n_new)`; everything the queries attend to (old slots and the new tokens) is read from
the cache. The storage lives in `obinfer/cache/kv_cache.py`; this module only reads it, through the
small read API of `LayerCache`: `is_uniform()`, `dense()`, `segment(i)`, `n_segments`, `n_kv_heads`
and `n_invalid`.

Shapes (the glossary of `obinfer/__init__.py`):
    B    batch rows                    T    new tokens this step (n_new)
    S    slots of a KV head (after appending the T new ones: they are the last T slots)
    Hq   query heads                   Hkv  KV heads
    G    Hq / Hkv: query head hq reads KV head hq // G (grouped-query attention)
    D    head dim

Who sees what. Query t (0 <= t < T) of a row sees
    - every *valid* slot cached before this step (slot order does not matter: keys carry their position
      in their RoPE rotation, and softmax-attention is a sum over slots);
    - the new tokens 0..t (causal), except pad tokens;
    - always itself, so that a pad query (a left-padding token, position -1) attends to itself alone
      and produces a finite output that nobody reads.
A slot is *invalid* when its position is -1 (left padding). `_visibility` builds this mask.

Three paths, picked from the layout; they compute the same function:
    uniform (`_attend_uniform`): every (row, KV head) segment has the same length, so the cache is a
        (B, Hkv, S, D) view and one `scaled_dot_product_attention` call covers the layer:
        - T = 1 and no pad slot: the one new query sees every slot, no mask is needed, and
          `_decode_attention` (two small matmuls) is faster than SDPA on CPU;
        - T = S and no pad slot (a prefill into an empty cache): plain causal SDPA;
        - otherwise: SDPA with the (B, Hkv, T, S) visibility mask, repeated for the G query heads.
    ragged (`_attend_ragged`): after a head-adaptive press (AdaKV) heads hold different numbers of
        slots; each (row, KV head) segment is attended on its own, by its G query heads, with a mask
        only when T > 1 or the segment holds pad slots.

Numerics: softmax over logits q.k / sqrt(D) in the SDPA kernels' precision; `_decode_attention` takes
the softmax in float32 whatever the cache dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from obinfer.cache.kv_cache import LayerCache


def attend(layer: LayerCache, q: Tensor, n_new: int) -> Tensor:
    """Attention of the step's new queries over `layer`, which already holds the step's n_new tokens.

    Args:
        layer: the layer's cache, right after `layer.append(k, v, pos)` of this step's T tokens.
        q: (B, Hq, T, D) queries after RoPE, T = n_new.
        n_new: T, the tokens just appended (the last T slots of every segment).
    Returns:
        (B, Hq, T, D) attention outputs, before o_proj.
    """
    if layer.is_uniform():
        return _attend_uniform(layer, q, n_new)
    return _attend_ragged(layer, q, n_new)


def _attend_uniform(layer: LayerCache, q: Tensor, n_new: int) -> Tensor:
    """Every segment has the same length S: one SDPA call on the dense (B, Hkv, S, D) view."""
    k, v, pos = layer.dense()  # views: (B, Hkv, S, D), (B, Hkv, S, D), (B, Hkv, S)
    L = k.shape[2]
    if layer.n_invalid == 0 and n_new == 1:
        return _decode_attention(q, k, v)
    if layer.n_invalid == 0 and n_new == L:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask = _visibility(pos, L, n_new)  # (B, Hkv, T, S)
    mask = mask.repeat_interleave(q.shape[1] // layer.n_kv_heads, dim=1)  # (B, Hq, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _attend_ragged(layer: LayerCache, q: Tensor, n_new: int) -> Tensor:
    """Segments of different lengths: one SDPA call per (row, KV head), over that segment's own slots."""
    B, Hq, T, D = q.shape
    G = Hq // layer.n_kv_heads
    out = torch.empty_like(q)
    for i in range(layer.n_segments):
        b, h = divmod(i, layer.n_kv_heads)
        k, v, pos = layer.segment(i)  # (S_i, D), (S_i, D), (S_i,)
        qi = q[b, h * G : (h + 1) * G]  # (G, T, D): the query heads that read KV head h
        mask = None
        if n_new > 1 or (pos < 0).any():
            mask = _visibility(pos[None, None], k.shape[0], n_new)[0]  # (1, T, S_i)
        out[b, h * G : (h + 1) * G] = F.scaled_dot_product_attention(
            qi, k.expand(G, -1, -1), v.expand(G, -1, -1), attn_mask=mask
        )
    return out


def _decode_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One new query per row over every cached slot: two small batched matmuls, softmax in float32.

    (CPU SDPA kernels are tuned for long query blocks; for T = 1 this is several times faster.)
    q: (B, Hq, 1, D); k, v: (B, Hkv, S, D) -> (B, Hq, 1, D).
    """
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, D)  # the G query heads of a KV head as rows
    w = torch.softmax((qg @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(D)), dim=-1)
    return (w.to(v.dtype) @ v).reshape(B, Hq, 1, D)


def _visibility(pos: Tensor, L: int, n_new: int) -> Tensor:
    """Boolean mask (..., T, L): old slots visible if valid, new slots causal, a slot always sees itself.

    pos: (..., L) positions of the L slots, the last T = n_new of which are this step's tokens.
    Example, pos = [-1, 7, 8, 9] with T = 2 (slots 2 and 3 are new; slot 0 is padding)::

        query 0 (slot 2): [F, T, T, F]
        query 1 (slot 3): [F, T, T, T]
    """
    T = n_new
    old = torch.ones(T, L - T, dtype=torch.bool, device=pos.device)
    new = torch.ones(T, T, dtype=torch.bool, device=pos.device).tril()
    causal = torch.cat([old, new], dim=1)  # (T, L)
    valid = (pos >= 0)[..., None, :]  # (..., 1, L)
    own = torch.zeros(T, L, dtype=torch.bool, device=pos.device)
    own[torch.arange(T), L - T + torch.arange(T)] = True
    return (causal & valid) | own
