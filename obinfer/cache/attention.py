"""Attention of new queries over one layer's KV cache: pure functions over a `LayerCache`.

`obinfer/models/llama.py` appends a step's keys and values to the layer's cache and then calls
`attend(layer, q, n_new)`; everything the queries attend to (old slots and the new tokens) is read from
the cache. The storage lives in `obinfer/cache/kv_cache.py`; this module only reads it, through the
small read API of `LayerCache`: `is_uniform()`, `dense()`, `segment(i)`, `n_segments`, `n_kv_heads`,
`n_invalid`, `known_no_pads()`, and the flat buffers `k`, `v`, `pos` with the segment lists `start`,
`length` (host ints: nothing here reads the device).

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
        slots, stored without padding one after another in the flat buffers:
        - T <= WINDOWS_MAX_T (decode steps, short blocks): `_attend_windows`, one masked pass for the
          whole layer over a zero-copy strided view of the flat buffers, (B * Hkv, W, D) windows of
          about the longest segment's size, each holding its segment (plus neighbours' slots, masked);
        - longer blocks (a question after a compressed context): `_attend_segments`, one masked SDPA
          call per (row, KV head) over that segment's own slots.

Numerics: softmax over logits q.k / sqrt(D) in the SDPA kernels' precision; `_decode_attention` and
`_attend_windows` take the softmax in float32 whatever the cache dtype. Masked slots get logit -inf and
weight exactly 0, whatever their (finite) contents.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from obinfer.cache.kv_cache import LayerCache, host_tensor


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
    """Segments of different lengths: one masked pass over strided windows of the flat buffers for a
    short query block (a decode step), else one SDPA call per (row, KV head) over its own slots."""
    if n_new <= WINDOWS_MAX_T:
        return _attend_windows(layer, q, n_new)
    return _attend_segments(layer, q, n_new)


# Query blocks up to this many tokens take `_attend_windows`; longer ones `_attend_segments`. Measured on
# 2 CPU cores with SmolLM2-135M shapes (3 KV heads x 3 query heads, D = 64; AdaKV head lengths of a 2k /
# 8k prompt at r = 0.5): one query, windows 0.21 / 0.59 ms per layer vs per-segment SDPA 0.50 / 1.0 ms
# (uniform decode of the same bytes: 0.13 / 0.46 ms: a window is as long as the longest head, ~1.4x the
# mean for AdaKV); the windows pass stays ahead up to T = 16 and falls behind from T = 24-32 on, where its
# wasted logits (neighbouring segments' slots) and (n, T, W) mask outgrow the per-segment calls.
WINDOWS_MAX_T = 16


class _Windows(NamedTuple):
    """Window i (segment i = b * Hkv + h) = the W flat slots from base + i * stride."""

    base: int
    stride: int
    W: int
    lo: list[int]  # per segment: its first slot, relative to its window's start
    hi: list[int]  # per segment: one past its last slot in use, relative to its window's start


def _plan_windows(start: list[int], end: list[int], N: int) -> _Windows:
    """Equally spaced windows of one size W inside the N slots, window i holding segment i's slots in use.

    Segments lie one after another in the buffers (each followed by its spare capacity; rows too), so
    windows spaced like the segments' starts are barely longer than the longest segment. The spacing
    is the largest that starts every window at or before its segment and ends the last one inside the
    buffers; with spacing 0 (a fallback for unusual layouts) every window is the whole range in use.
    """
    n = len(start)
    spacing = [(s - start[0]) // i for i, s in enumerate(start) if i]
    spacing += [(N - e) // (n - 1 - i) for i, e in enumerate(end[:-1])]
    for stride in (max(0, min(spacing, default=0)), 0):
        base = min(s - i * stride for i, s in enumerate(start))
        w = [base + i * stride for i in range(n)]
        W = max(e - x for e, x in zip(end, w, strict=True))
        if base >= 0 and w[-1] + W <= N or stride == 0:
            lo = [s - x for s, x in zip(start, w, strict=True)]
            return _Windows(base, stride, W, lo, [e - x for e, x in zip(end, w, strict=True)])
    raise AssertionError("unreachable: spacing 0 always fits")


def _attend_windows(layer: LayerCache, q: Tensor, T: int) -> Tensor:
    """One masked pass over equally spaced, overlapping windows of the flat buffers: no copy of K/V, no
    loop over segments or rows, no device read.

    The segments lie one after another in the buffers, so a strided view (B * Hkv, W, D) whose window i
    starts at or before segment i = b * Hkv + h and is W slots long holds that segment, plus some slots
    of its neighbours (W is about the longest segment). A mask keeps, for the G query heads of KV head
    h, only the slots of their own segment that they may see (`_visibility`'s rule): masked logits are
    -inf, so other segments' slots and spare capacity get weight exactly 0.
    """
    B, Hq, _, D = q.shape
    n, G, dev = layer.n_segments, Hq // layer.n_kv_heads, layer.k.device
    end = [s + L for s, L in zip(layer.start, layer.length, strict=True)]
    win = _plan_windows(layer.start, end, layer.k.shape[0])
    W = win.W

    def windows(buf: Tensor) -> Tensor:  # (n, W, *rest), overlapping, no copy
        st = buf.stride()
        return buf.as_strided(
            (n, W, *buf.shape[1:]), (win.stride * st[0], *st), buf.storage_offset() + win.base * st[0]
        )

    bounds = host_tensor([win.lo, win.hi], dev)[:, :, None]
    lo, hi = bounds[0], bounds[1]  # (n, 1): where each segment's slots are in its window
    j = torch.arange(W, device=dev)
    vis = (j >= lo) & (j < hi)  # (n, W)
    no_pads = layer.known_no_pads()
    if T > 1 or not no_pads:
        new = (j - (hi - T))[:, None, :]  # (n, 1, W): index among the T new slots (< 0: an old slot)
        t = torch.arange(T, device=dev)[:, None]  # (T, 1)
        seen = new <= t  # old slots, and new slots up to the query's own (causal)
        if not no_pads:
            seen = seen & (windows(layer.pos) >= 0)[:, None, :]  # valid slots only
        vis = vis[:, None, :] & (seen | (new == t))  # (n, T, W); a query always sees its own slot
    bias = torch.where(vis, 0.0, -math.inf).to(q.dtype)  # (n, W) or (n, T, W)
    qh = q.reshape(n, G * T, D)  # segment i's G query heads x T queries as rows
    kt = windows(layer.k).transpose(1, 2)  # (n, D, W)
    if T == 1:  # logits, scale and mask in one call: bias (n, 1, W) broadcast over the G query heads
        logits = torch.baddbmm(bias.view(n, 1, W), qh, kt, alpha=1.0 / math.sqrt(D))
    else:
        logits = torch.bmm(qh, kt).mul_(1.0 / math.sqrt(D)).view(n, G, T, W)
        logits += bias.view(n, 1, T, W)
    w = torch.softmax(logits.float(), dim=-1).to(q.dtype).view(n, G * T, W)
    return torch.bmm(w, windows(layer.v)).view(B, Hq, T, D)


def _attend_segments(layer: LayerCache, q: Tensor, n_new: int) -> Tensor:
    """One SDPA call per (row, KV head) over that segment's own slots, with the `_visibility` mask."""
    B, Hq, T, D = q.shape
    G = Hq // layer.n_kv_heads
    out = torch.empty_like(q)
    for i in range(layer.n_segments):
        b, h = divmod(i, layer.n_kv_heads)
        k, v, pos = layer.segment(i)  # (S_i, D), (S_i, D), (S_i,)
        qi = q[b, h * G : (h + 1) * G]  # (G, T, D): the query heads that read KV head h
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
