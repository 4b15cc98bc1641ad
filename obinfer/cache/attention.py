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
        slots, stored without padding one after another in the flat buffers; each (row, KV head)
        segment is attended on its own slots, a view of the buffers (nothing is copied or padded):
        - T = 1 and no pad slot: `_decode_segments`, two small matmuls per segment, no mask; a run of
          neighbouring segments with one span and capacity (`_runs`) is one batched matmul; in float32
          with several threads a long segment is split into one part per thread (`_split_segment`),
          because a one-segment product would run on one thread;
        - otherwise: `_attend_segments`, one SDPA call per segment with its `_visibility` mask.
        Neither reads the device (segment bounds are host ints). Why not one vectorized pass: a pass
        over the whole layer must either copy the segments into a padded (B, Hkv, S_max, D) block or
        compute logits over slots that a head does not own (a masked pass over the flat buffers, or
        over overlapping strided windows of them), and in a model, whose weights push the cache out of
        the CPU caches between layers, the extra bytes and logits cost more than the per-segment calls save.
        Measured in the model (SmolLM2-135M, 2k tokens, AdaKV r = 0.5, 1 thread), append + attention
        per decode step, relative to the uniform cache of the same bytes in the same run:
        `_decode_segments` 1.2x, strided windows 1.75x, a masked pass over each row's slots 2.0x, the
        former SDPA call per segment 1.9x; with 8 rows stacked by `KVCache.cat_rows`, windows took 3.6x
        the time of `_decode_segments`. A question block (T = 32) through `_attend_segments` costs what
        the uniform path costs (benchmarks/bench_ragged.py).

bfloat16 / float16 on CPU (`_stable_shapes`): the decode paths and the ragged block path
(`_block_segments`) multiply over each segment's capacity instead of its length, the spare slots
masked, because oneDNN builds a kernel for every new matmul shape and a growing cache makes a new shape
at every step.

Numerics: softmax over logits q.k / sqrt(D) in the SDPA kernels' precision; `_decode_attention` and
`_decode_segments` take the softmax in float32 whatever the cache dtype. Slots outside a segment (other
segments, spare capacity) are never read.
"""

from __future__ import annotations

import math

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
        cap = layer.cap[0]
        if cap > L and _stable_shapes(layer.k) and layer.k.shape[0] == layer.n_segments * cap:
            B, H, _, D = k.shape  # attend over the capacity (a shape that lasts), spare slots masked
            return _decode_attention(q, layer.k.view(B, H, cap, D), layer.v.view(B, H, cap, D), L)
        return _decode_attention(q, k, v)
    if layer.n_invalid == 0 and n_new == L:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask = _visibility(pos, L, n_new)  # (B, Hkv, T, S)
    mask = mask.repeat_interleave(q.shape[1] // layer.n_kv_heads, dim=1)  # (B, Hq, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _attend_ragged(layer: LayerCache, q: Tensor, n_new: int) -> Tensor:
    """Segments of different lengths: each (row, KV head) segment is attended on its own slots, in
    place in the flat buffers (no copy, no padding, no device read)."""
    if n_new == 1 and layer.known_no_pads():
        return _decode_segments(layer, q)
    return _attend_segments(layer, q, n_new)


def _decode_segments(layer: LayerCache, q: Tensor) -> Tensor:
    """One new query per row, no pad slot: per segment, two small matmuls and a float32 softmax.

    The ragged counterpart of `_decode_attention`: segment i's G query heads (rows) against its own
    slots, a view of the flat buffers. No mask (the new query sees every slot of its segment), no
    SDPA call (its per-call cost dominates at one query), nothing read from the device. A run of
    neighbouring segments with the same span and capacity (`_runs`: the heads of a uniform row, or the
    rows of a batch of caches compressed to the same ratio) is one batched matmul instead.
    q: (B, Hq, 1, D) -> (B, Hq, 1, D).
    """
    B, Hq, _, D = q.shape
    G = Hq // layer.n_kv_heads
    scale = 1.0 / math.sqrt(D)
    qs = q.reshape(layer.n_segments, G, D)  # segment i = b * Hkv + h: query heads h * G ... as rows
    if q.dtype == torch.float32:  # scale the G x D queries, not the G x S logits (same float32 rounding)
        qs, scale = qs * scale, 1.0
    spans = layer.cap if _stable_shapes(layer.k) else layer.length  # slots multiplied (`_stable_shapes`)
    P = _split_parts(layer.k)
    outs = []
    for i, j in _runs(layer.start, layer.cap, spans):
        s, n, lengths = layer.start[i], spans[i], layer.length[i:j]
        if j == i + 1 and P > 1 and n >= SPLIT_MIN_SLOTS:  # float32: one segment's slots in P parts
            outs.append(_split_segment(qs[i], layer.k[s : s + n], layer.v[s : s + n], P)[None])
            continue
        if j == i + 1:
            logits = torch.mm(qs[i], layer.k[s : s + n].T)[None]  # (1, G, n)
        else:  # segments i..j-1 as one (j - i, n, D) strided view
            k = layer.k[s : s + (j - i) * layer.cap[i]].view(j - i, layer.cap[i], D)[:, :n]
            logits = torch.bmm(qs[i:j], k.transpose(1, 2))  # (j - i, G, n)
        if scale != 1.0:
            logits = logits.float().mul_(scale)
        if j == i + 1 and n > lengths[0]:
            logits[:, :, lengths[0] :] = -math.inf  # the segment's spare slots
        elif j > i + 1 and any(L < n for L in lengths):
            spare = torch.arange(n, device=q.device) >= host_tensor(lengths, q.device)[:, None]
            logits.masked_fill_(spare[:, None, :], -math.inf)
        w = torch.softmax(logits, dim=-1).to(layer.v.dtype)
        if j == i + 1:
            outs.append(torch.mm(w[0], layer.v[s : s + n])[None])  # (1, G, D)
        else:
            v = layer.v[s : s + (j - i) * layer.cap[i]].view(j - i, layer.cap[i], D)[:, :n]
            outs.append(torch.bmm(w, v))  # (j - i, G, D)
    return torch.cat(outs).view(B, Hq, 1, D)


SPLIT_MIN_SLOTS = 256  # a shorter segment is multiplied whole (the split's extra calls cost more)


def _split_parts(buf: Tensor) -> int:
    """Parts a long ragged segment's decode matmuls are split into (1: not split): the thread count for
    float32 on CPU, whose one-segment matmuls run on one thread (see `_split_segment`)."""
    if buf.device.type != "cpu" or buf.dtype != torch.float32:
        return 1
    return torch.get_num_threads()


def _split_segment(qs: Tensor, k: Tensor, v: Tensor, P: int) -> Tensor:
    """One segment's decode attention with its n slots in P parts, each matmul one P-batch `bmm`.

    torch's CPU float32 product of a few query rows by one segment's keys runs on one thread (like a
    one-row linear layer: obinfer/models/linear.py), while a batched product spreads its batch over the
    threads; the uniform path's (B, Hkv) batch gets that for free, a ragged segment needs the split.
    Part p is the strided window of slots [p m, p m + m + r), m = n // P, r = n % P: the windows cover
    the segment exactly (nothing outside it is read) and overlap by r slots, which are masked in all but
    the last window. qs: (G, D) scaled queries; k, v: (n, D) the segment's slots. Returns (G, D).
    """
    G, D = qs.shape
    n = k.shape[0]
    m, r = divmod(n, P)
    size, stride = (P, m + r, D), (m * k.stride(0), k.stride(0), k.stride(1))
    kw, vw = k.as_strided(size, stride), v.as_strided(size, stride)  # (P, m + r, D) windows, views
    logits = torch.bmm(qs.expand(P, G, D), kw.transpose(1, 2))  # (P, G, m + r)
    if r:
        logits[:-1, :, m:] = -math.inf  # the overlap, counted in the last window only
    w = torch.softmax(logits.transpose(0, 1).reshape(G, P * (m + r)), dim=-1)
    return torch.bmm(w.view(G, P, m + r).transpose(0, 1), vw).sum(0)  # (G, D)


def _runs(start: list[int], cap: list[int], span: list[int]) -> list[tuple[int, int]]:
    """Maximal [i, j) ranges of segments that follow one another in the buffers with equal capacity
    and equal span: segment i + m starts m capacities after segment i, so the run is a strided view."""
    runs, i = [], 0
    for j in range(1, len(start) + 1):
        if j == len(start) or cap[j] != cap[i] or span[j] != span[i] or start[j] != start[j - 1] + cap[i]:
            runs.append((i, j))
            i = j
    return runs


def _attend_segments(layer: LayerCache, q: Tensor, n_new: int) -> Tensor:
    """One SDPA call per (row, KV head) over that segment's own slots, with the `_visibility` mask."""
    if layer.known_no_pads() and _stable_shapes(layer.k):
        return _block_segments(layer, q, n_new)
    B, Hq, T, D = q.shape
    G = Hq // layer.n_kv_heads
    out = torch.empty_like(q)
    for i in range(layer.n_segments):
        b, h = divmod(i, layer.n_kv_heads)
        k, v, pos = layer.segment(i)  # (S_i, D), (S_i, D), (S_i,)
        qi = q[b : b + 1, h * G : (h + 1) * G]  # (1, G, T, D): the query heads that read KV head h
        mask = _visibility(pos[None, None], k.shape[0], n_new)  # (1, 1, T, S_i)
        # one KV head for G query heads (enable_gqa), not K/V expanded to G heads: an expanded (stride 0)
        # K/V sends CPU SDPA to its slow reference kernel
        out[b, h * G : (h + 1) * G] = F.scaled_dot_product_attention(
            qi, k[None, None], v[None, None], attn_mask=mask, enable_gqa=True
        )[0]
    return out


def _block_segments(layer: LayerCache, q: Tensor, n_new: int) -> Tensor:
    """`_attend_segments` without pad slots, in bfloat16 / float16 on CPU: per segment, two matmuls over
    its capacity (`_stable_shapes`) and a float32 softmax; old slots visible, the T new ones causal,
    spare slots masked. (An SDPA call per segment builds a kernel per new segment length too.)"""
    B, Hq, T, D = q.shape
    G = Hq // layer.n_kv_heads
    qs = q.reshape(layer.n_segments, G * T, D)  # segment i's G query heads x T queries as rows
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)  # (t, new slot u): u > t hidden
    scale = 1.0 / math.sqrt(D)
    outs = []
    for i, (s, L, n) in enumerate(zip(layer.start, layer.length, layer.cap, strict=True)):
        logits = torch.mm(qs[i], layer.k[s : s + n].T).float().mul_(scale).view(G, T, n)
        logits[:, :, L - T : L].masked_fill_(causal, -math.inf)
        logits[:, :, L:] = -math.inf
        w = torch.softmax(logits, dim=-1).to(layer.v.dtype).view(G * T, n)
        outs.append(torch.mm(w, layer.v[s : s + n]))  # (G * T, D)
    return torch.stack(outs).view(B, Hq, T, D)


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, valid: int | None = None) -> Tensor:
    """One new query per row over every cached slot: two small batched matmuls, softmax in float32.

    (CPU SDPA kernels are tuned for long query blocks; for T = 1 this is several times faster.)
    q: (B, Hq, 1, D); k, v: (B, Hkv, S, D) -> (B, Hq, 1, D). valid: only the first `valid` slots are
    attended (the rest are spare capacity, masked); None: all S.
    """
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, Hq // Hkv, D)  # the G query heads of a KV head as rows
    logits = (qg @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(D))
    if valid is not None and valid < k.shape[2]:
        logits[..., valid:] = -math.inf
    w = torch.softmax(logits, dim=-1)
    return (w.to(v.dtype) @ v).reshape(B, Hq, 1, D)


def _stable_shapes(buf: Tensor) -> bool:
    """Whether decode attention should multiply over each segment's capacity, not its length.

    On CPU a bfloat16 / float16 matmul goes through oneDNN, which builds (JIT-compiles) a kernel for
    every new shape: about 1.4 ms, 15x the multiply itself for a (7 x 64) x (64 x 1500) product. A decode
    step makes every segment one slot longer, so every matmul of every step had a new shape (measured:
    batched bfloat16 decoding of 41 ragged rows at 4k, 1.0 s per step, 0.3 s of it multiplies). A segment's
    capacity changes only when it is re-allocated (every length/16 tokens) and takes few distinct values
    (`kv_cache.headroom` rounds it to `CAP_ALIGN` slots), so the kernels are built once and cached; the
    spare slots (zeros or stale finite values, never uninitialised memory) get a -inf logit and weight 0.
    float32 (MKL, no per-shape kernel) and CUDA keep the exact lengths.
    """
    return buf.device.type == "cpu" and buf.dtype in (torch.bfloat16, torch.float16)


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
