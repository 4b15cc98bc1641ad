"""obinfer.cache.attention: attention over a LayerCache, against a float64 loop over each (row, head).

B = 2 rows, 3 KV heads, G = 2 query heads per KV head, with different contents per (row, head), so a
transposed row/head or a wrong query-head -> KV-head map shows up. The uniform, ragged (per-segment
decode and masked SDPA) and one-query (decode) paths are each compared with the reference and with
each other; ragged decode reads nothing outside its segments; a decode step never reads the device.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from obinfer.cache import attention, kv_cache
from obinfer.cache.kv_cache import KVCache, LayerCache

B, H, G, D = 2, 3, 2, 8  # rows, KV heads, query heads per KV head, head dim

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- the reference
def reference_attention(q: torch.Tensor, old: list, new: list) -> torch.Tensor:
    """Slow float64 attention, one (row, query head, query) at a time.

    Args:
        q: (B, Hq, T, D) new queries.
        old: old[i] = (k (L, D), v (L, D), pos (L,)) slots of segment i before this step.
        new: new[i] = (k (T, D), v (T, D), pos (T,)) the T new tokens of segment i, in order.
    Query t sees the valid old slots and new tokens 0..t that are valid, and always itself.
    """
    Bq, Hq, T, Dq = q.shape
    Hkv = len(old) // Bq
    out = torch.zeros(Bq, Hq, T, Dq, dtype=torch.float64)
    for b in range(Bq):
        for hq in range(Hq):
            i = b * Hkv + hq // (Hq // Hkv)
            for t in range(T):
                keys, vals = [], []
                for kk, vv, pp in zip(*old[i], strict=True):
                    if pp >= 0:
                        keys.append(kk), vals.append(vv)
                for j in range(t + 1):
                    if new[i][2][j] >= 0 or j == t:
                        keys.append(new[i][0][j]), vals.append(new[i][1][j])
                qd = q[b, hq, t].double()
                logits = torch.stack([qd @ kk.double() for kk in keys]) / math.sqrt(Dq)
                w = torch.softmax(logits, 0)
                out[b, hq, t] = sum(wi * vv.double() for wi, vv in zip(w, vals, strict=True))
    return out


def segments(layer: LayerCache) -> list:
    return [tuple(x.clone() for x in layer.segment(i)) for i in range(layer.n_segments)]


def step(cache: KVCache, T: int, g: torch.Generator, n_pad: torch.Tensor | None = None) -> tuple:
    """Append T random tokens and compare `attend` with the reference. Returns (q, reference)."""
    layer = cache.layers[0]
    old = segments(layer)
    pos = cache.next_positions(T, n_pad)
    k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    q = torch.randn(B, H * G, T, D, generator=g)
    layer.append(k, v, pos)
    new = [(k[b, h], v[b, h], pos[b]) for b in range(B) for h in range(H)]
    ref = reference_attention(q, old, new)
    out = attention.attend(layer, q, T)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    return q, ref


# ---------------------------------------------------------------- each layout vs the reference
@pytest.mark.parametrize("pads", [False, True])
def test_uniform_attention_matches_reference(pads):
    g = torch.Generator().manual_seed(2)
    cache = KVCache.empty(1, B, H, D)
    step(cache, 6, g, torch.tensor([2, 0]) if pads else None)  # prefill: SDPA causal or masked
    assert cache.layers[0].is_uniform()
    step(cache, 1, g)  # decode: fast path without mask (or masked when pads are stored)
    step(cache, 3, g)  # a block after a prefix: causal within the new block
    assert cache.layers[0].is_uniform()


@pytest.mark.parametrize("pads", [False, True])
@pytest.mark.parametrize("T", [1, 4])
def test_ragged_attention_matches_reference(T, pads):
    g = torch.Generator().manual_seed(3 + T)
    cache = KVCache.empty(1, B, H, D)
    step(cache, 7, g, torch.tensor([3, 0]) if pads else None)
    layer = cache.layers[0]
    # different lengths per (row, head); row 0 keeps pad slots 0, 1 (head 0) and 2 (head 1) when padded
    layer.keep([torch.tensor(s) for s in ([0, 1, 4, 6], [2, 5], [6], [0, 2, 3, 4, 5, 6], [1, 3], [5, 6])])
    assert not layer.is_uniform() and layer.n_invalid == (3 if pads else 0)
    step(cache, T, g)
    step(cache, T, g)  # again, after the append grew the segments
    assert not layer.is_uniform()


def _append_random(cache: KVCache, T: int, g: torch.Generator, dtype: torch.dtype) -> tuple:
    """Append T random tokens (in `dtype`) to the one layer without attending; returns (q, reference)."""
    layer = cache.layers[0]
    old = segments(layer)
    pos = cache.next_positions(T)
    k, v = torch.randn(B, H, T, D, generator=g).to(dtype), torch.randn(B, H, T, D, generator=g).to(dtype)
    q = torch.randn(B, H * G, T, D, generator=g).to(dtype)
    layer.append(k, v, pos)
    return q, reference_attention(q, old, [(k[b, h], v[b, h], pos[b]) for b in range(B) for h in range(H)])


RAGGED = ([0, 1, 4, 6], [2, 5], [6], [0, 2, 3, 4, 5, 6], [1, 3], [5, 6])  # kept slots per (row, head)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_both_ragged_paths_match_reference(dtype, tol):
    """`_decode_segments` (T = 1) and `_attend_segments` (any T) each equal the reference, also after a
    reallocation left spare capacity between the segments; a padded layer takes `_attend_segments`."""
    g = torch.Generator().manual_seed(30)
    cache = KVCache.empty(1, B, H, D, dtype=dtype)
    step_pos = cache.next_positions(7)
    layer = cache.layers[0]
    layer.append(
        torch.randn(B, H, 7, D, generator=g).to(dtype),
        torch.randn(B, H, 7, D, generator=g).to(dtype),
        step_pos,
    )
    layer.keep([torch.tensor(s) for s in RAGGED])
    for T in (1, 1, 3, 1):
        q, ref = _append_random(cache, T, g, dtype)
        paths = [attention._attend_segments] + ([attention._decode_segments] if T == 1 else [])
        for path in paths:
            out = path(layer, q, T) if path is attention._attend_segments else path(layer, q)
            assert out.dtype == dtype and out.shape == q.shape
            torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_ragged_decode_multiplies_runs_of_alike_segments_at_once(dtype, tol):
    """Caches compressed to the same size and stacked (`KVCache.cat_rows`, as the evaluation decodes
    them) make runs of neighbouring segments with one span and capacity; `_decode_segments` multiplies
    each run as one batch: still the reference, in both dtypes."""
    g = torch.Generator().manual_seed(33)
    kept = (
        [[0, 2, 4, 6]] * H,
        [[1, 3, 5, 6]] * H,
        [[0, 1, 2], [3], [0, 1, 2, 3, 4, 5]],
        [[0, 6]] * H,
        [[2, 4]] * H,
    )
    parts = []
    for slots in kept:
        c = KVCache.empty(1, 1, H, D, dtype=dtype)
        rand = lambda: torch.randn(1, H, 7, D, generator=g).to(dtype)  # noqa: E731
        c.layers[0].append(rand(), rand(), c.next_positions(7))
        c.layers[0].keep([torch.tensor(s) for s in slots])
        parts.append(c)
    cache = KVCache.cat_rows(parts)
    layer, n_rows = cache.layers[0], len(kept)
    for _ in range(3):
        old = segments(layer)
        pos = cache.next_positions(1)
        k, v = (torch.randn(n_rows, H, 1, D, generator=g).to(dtype) for _ in range(2))
        q = torch.randn(n_rows, H * G, 1, D, generator=g).to(dtype)
        layer.append(k, v, pos)
        spans = layer.cap if attention._stable_shapes(layer.k) else layer.length
        runs = attention._runs(layer.start, layer.cap, spans)
        if dtype == torch.float32:  # rows 0-1 and 3-4 (equal lengths, exact capacities): a batch each
            assert runs == [
                (0, 2 * H),
                (2 * H, 2 * H + 1),
                (2 * H + 1, 2 * H + 2),
                (2 * H + 2, 3 * H),
                (3 * H, 5 * H),
            ]
        else:  # bfloat16 on CPU: every capacity is rounded up to CAP_ALIGN slots: one batch, spans masked
            assert runs == [(0, 5 * H)] and layer.cap == [kv_cache.CAP_ALIGN] * 5 * H
        new = [(k[b, h], v[b, h], pos[b]) for b in range(n_rows) for h in range(H)]
        out = attention._decode_segments(layer, q)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out.double(), reference_attention(q, old, new), atol=tol, rtol=tol)


def test_ragged_decode_reads_only_its_segments():
    """Spare capacity between segments changes nothing, bit for bit (it is never read)."""
    g = torch.Generator().manual_seed(31)
    cache = KVCache.empty(1, B, H, D)
    step(cache, 7, g)
    layer = cache.layers[0]
    layer.keep([torch.tensor(s) for s in RAGGED])
    step(cache, 1, g)  # reallocates: every segment now has spare capacity after its slots
    pos = cache.next_positions(1)
    layer.append(torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g), pos)
    in_use = torch.zeros(layer.k.shape[0], dtype=torch.bool)
    for s, L in zip(layer.start, layer.length, strict=True):
        in_use[s : s + L] = True
    assert not in_use.all()
    q = torch.randn(B, H * G, 1, D, generator=g)
    before = attention.attend(layer, q, 1)
    free = int((~in_use).sum())
    layer.k[~in_use] = torch.full((free, D), float("nan"))
    layer.v[~in_use] = torch.full((free, D), float("inf"))
    assert torch.equal(attention.attend(layer, q, 1), before)


@pytest.mark.parametrize("threads", [2, 3])
def test_long_float32_segments_split_over_threads_match_reference(threads, monkeypatch):
    """With several threads, float32 ragged decoding multiplies each long segment in `threads` parts
    (`_split_segment`, overlapping windows when the length does not divide): still the reference, and
    still nothing outside the segments is read (NaN / inf in the spare capacity change nothing)."""
    g = torch.Generator().manual_seed(34)
    cache = KVCache.empty(1, B, H, D)
    layer = cache.layers[0]
    n0 = 600
    layer.append(torch.randn(B, H, n0, D, generator=g), torch.randn(B, H, n0, D, generator=g),
                 cache.next_positions(n0))  # fmt: skip
    sizes = [300, 257, 513, 256, 400, 301]  # some divisible by 2 or 3, some not
    layer.keep([torch.randperm(n0, generator=g)[:m].sort().values for m in sizes])
    _append_random(cache, 1, g, torch.float32)  # reallocates: spare capacity after every segment
    in_use = torch.zeros(layer.k.shape[0], dtype=torch.bool)
    for s, L in zip(layer.start, layer.length, strict=True):
        in_use[s : s + L + 1] = True  # + the slot the next append writes
    layer.k[~in_use], layer.v[~in_use] = float("nan"), float("inf")
    calls = []
    real = attention._split_segment
    monkeypatch.setattr(attention, "_split_segment", lambda *a: calls.append(a[-1]) or real(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, ref = _append_random(cache, 1, g, torch.float32)
        out = attention._decode_segments(layer, q)
    finally:
        torch.set_num_threads(before)
    assert calls == [threads] * len(sizes)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["uniform", "ragged"])
def test_bfloat16_attends_over_the_capacity_with_spare_slots_masked(layout, monkeypatch):
    """On CPU in bfloat16 the decode and question paths multiply over each segment's capacity (a
    matmul shape that lasts, `_stable_shapes`): still equal to the reference, and spare slots holding
    large stale values change nothing, bit for bit."""
    g = torch.Generator().manual_seed(32)
    dtype = torch.bfloat16
    cache = KVCache.empty(1, B, H, D, dtype=dtype)
    layer = cache.layers[0]
    layer.append(torch.randn(B, H, 7, D, generator=g).to(dtype), torch.randn(B, H, 7, D, generator=g).to(dtype),
                 cache.next_positions(7))  # fmt: skip
    if layout == "ragged":
        layer.keep([torch.tensor(s) for s in RAGGED])
    capped = []
    real = attention._decode_attention
    monkeypatch.setattr(attention, "_decode_attention", lambda *a: capped.append(len(a) == 4) or real(*a))
    for T in (1, 3, 1, 1):
        q, ref = _append_random(cache, T, g, dtype)
        assert all(c % kv_cache.CAP_ALIGN == 0 for c in layer.cap) and layer.is_uniform() == (
            layout == "uniform"
        )
        assert any(c > L for c, L in zip(layer.cap, layer.length, strict=True))  # spare slots exist
        out = attention.attend(layer, q, T)
        torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=3e-2)
        for s, L, c in zip(layer.start, layer.length, layer.cap, strict=True):
            layer.k[s + L : s + c] = 1e4  # stale, large, finite
            layer.v[s + L : s + c] = -1e4
        assert torch.equal(attention.attend(layer, q, T), out)
    if layout == "uniform":
        assert capped and all(capped)  # the T = 1 steps took the capacity path


def test_a_decode_step_never_reads_the_device(tiny_llama_dir, monkeypatch):
    """Appending and attending (uniform and ragged layouts) convert no tensor to a Python value.

    On an accelerator each such conversion (item, tolist, bool, int, ...) waits for the device.
    """
    from obinfer.weights import load_model

    model = load_model(tiny_llama_dir)
    ids = torch.randint(3, model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(33))
    caches = [model.new_cache(), model.new_cache()]
    with torch.inference_mode():
        for cache in caches:
            model(ids, cache)
        for layer in caches[1].layers:  # ragged: heads keep 10 and 23 tokens
            layer.keep([torch.arange(0, 40, 4), torch.arange(0, 40, 2)[:-3]])
            assert not layer.is_uniform()

    def read(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a decode step read a tensor's value on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, read)
    tok = torch.tensor([[5]])
    with torch.inference_mode():
        for cache in caches:
            for _ in range(20):  # crosses a reallocation of every segment
                model(tok, cache)
    monkeypatch.undo()
    assert all(layer.n_invalid == 0 for c in caches for layer in c.layers)


# ---------------------------------------------------------------- the paths agree with each other
@pytest.mark.parametrize("pads", [False, True])
def test_uniform_and_ragged_paths_agree_on_a_uniform_layer(pads):
    """The per-segment path is valid on any layout: on a uniform one it must equal the one-call path."""
    g = torch.Generator().manual_seed(11)
    cache = KVCache.empty(1, B, H, D)
    layer = cache.layers[0]
    for T, n_pad in [(6, torch.tensor([0, 2]) if pads else None), (1, None), (3, None), (1, None)]:
        q, ref = step(cache, T, g, n_pad)  # prefill (causal or masked), decode, block, decode
        assert layer.is_uniform()
        uniform = attention._attend_uniform(layer, q, T)
        outs = [attention._attend_segments(layer, q, T)]
        if T == 1 and not pads:
            outs.append(attention._decode_segments(layer, q))
        for ragged in outs:
            torch.testing.assert_close(uniform, ragged, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ragged.double(), ref, atol=1e-5, rtol=1e-5)


def test_attend_picks_the_path_from_the_layout(monkeypatch):
    """Decode fast path only for uniform + T = 1 + no pad slot; ragged layout -> per-segment path."""
    calls = []
    for name in ("_attend_uniform", "_attend_ragged", "_decode_attention"):
        real = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    g = torch.Generator().manual_seed(12)

    def run(cache: KVCache, T: int, n_pad: torch.Tensor | None = None) -> list[str]:
        calls.clear()
        step(cache, T, g, n_pad)
        return list(calls)

    plain, padded = KVCache.empty(1, B, H, D), KVCache.empty(1, B, H, D)
    assert run(plain, 5) == ["_attend_uniform"]
    assert run(plain, 1) == ["_attend_uniform", "_decode_attention"]
    assert run(padded, 5, torch.tensor([1, 0])) == ["_attend_uniform"]
    assert run(padded, 1) == ["_attend_uniform"]  # a stored pad slot: masked SDPA, not the fast path
    plain.layers[0].keep([torch.arange(1 + i) for i in range(B * H)])
    assert run(plain, 1) == ["_attend_ragged"]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_decode_path_equals_general_path(dtype, tol):
    """`_decode_attention` (two matmuls, float32 softmax) == masked SDPA with an all-visible mask."""
    g = torch.Generator().manual_seed(13)
    S = 9
    q = torch.randn(B, H * G, 1, D, generator=g).to(dtype)
    k, v = torch.randn(B, H, S, D, generator=g).to(dtype), torch.randn(B, H, S, D, generator=g).to(dtype)
    pos = torch.arange(S).expand(B, H, S)
    mask = attention._visibility(pos, S, 1).repeat_interleave(G, dim=1)  # (B, Hq, 1, S), all True
    assert mask.all()
    general = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    fast = attention._decode_attention(q, k, v)
    assert fast.dtype == dtype and fast.shape == q.shape
    torch.testing.assert_close(fast.float(), general.float(), atol=tol, rtol=tol)
    old = [(k[b, h, :-1], v[b, h, :-1], pos[b, h, :-1]) for b in range(B) for h in range(H)]
    new = [(k[b, h, -1:], v[b, h, -1:], pos[b, h, -1:]) for b in range(B) for h in range(H)]
    torch.testing.assert_close(fast.double(), reference_attention(q, old, new), atol=tol, rtol=tol)


# ---------------------------------------------------------------- padding rows
def test_a_padded_row_equals_the_row_alone():
    """Left padding changes nothing for a row's real tokens, at prefill and while decoding, on both paths."""
    g = torch.Generator().manual_seed(14)
    n, n_pad = 5, 3
    N = n + n_pad + 2  # enough tokens for row 1's prefill and for two decode steps
    k, v = torch.randn(2, H, N, D, generator=g), torch.randn(2, H, N, D, generator=g)
    q = torch.randn(2, H * G, N, D, generator=g)
    pad = torch.zeros(1, H, n_pad, D)
    batch = KVCache.empty(1, 2, H, D)  # row 0: 3 pads + n tokens; row 1: n + 3 tokens
    alone = KVCache.empty(1, 1, H, D)  # row 0 without its padding
    pos = batch.next_positions(n + n_pad, torch.tensor([n_pad, 0]))
    kb = torch.cat([torch.cat([pad, k[:1, :, :n]], 2), k[1:, :, : n + n_pad]])
    vb = torch.cat([torch.cat([pad, v[:1, :, :n]], 2), v[1:, :, : n + n_pad]])
    qb = torch.cat([torch.cat([pad.repeat(1, G, 1, 1), q[:1, :, :n]], 2), q[1:, :, : n + n_pad]])
    batch.layers[0].append(kb, vb, pos)
    alone.layers[0].append(k[:1, :, :n], v[:1, :, :n], alone.next_positions(n))
    got = attention.attend(batch.layers[0], qb, n + n_pad)[:1, :, n_pad:]
    want = attention.attend(alone.layers[0], q[:1, :, :n], n)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for t in (n, n + 1):  # decode: uniform (masked, pads stored) then ragged after a keep
        pb, pa = batch.next_positions(1), alone.next_positions(1)
        batch.layers[0].append(k[:, :, t : t + 1], v[:, :, t : t + 1], pb)
        alone.layers[0].append(k[:1, :, t : t + 1], v[:1, :, t : t + 1], pa)
        got = attention.attend(batch.layers[0], q[:, :, t : t + 1], 1)[:1]
        want = attention.attend(alone.layers[0], q[:1, :, t : t + 1], 1)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        if t == n:  # the same ragged eviction in both: odd heads drop the token just decoded
            batch.layers[0].keep([torch.arange(n + n_pad + 1 - (i % 2)) for i in range(2 * H)])
            alone.layers[0].keep([torch.arange(n + 1 - (i % 2)) for i in range(H)])
            assert not batch.layers[0].is_uniform() and batch.layers[0].n_invalid == n_pad * H


def test_a_pad_query_attends_to_itself_alone():
    """A pad token's query sees only its own slot, so its output is its own value (finite, never NaN)."""
    g = torch.Generator().manual_seed(15)
    cache = KVCache.empty(1, B, H, D)
    T = 4
    pos = cache.next_positions(T, torch.tensor([T, 1]))  # row 0 is all padding, row 1 has one pad
    k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    q = torch.randn(B, H * G, T, D, generator=g)
    cache.layers[0].append(k, v, pos)
    out = attention.attend(cache.layers[0], q, T)
    torch.testing.assert_close(out[0], v[0].repeat_interleave(G, dim=0))
    torch.testing.assert_close(out[1, :, 0], v[1, :, 0].repeat_interleave(G, dim=0))


def test_visibility_mask():
    """The docstring example: slot 0 is padding, slots 2 and 3 are the new tokens."""
    mask = attention._visibility(torch.tensor([-1, 7, 8, 9]), 4, 2)
    assert mask.tolist() == [[False, True, True, False], [False, True, True, True]]
    pad_new = attention._visibility(torch.tensor([5, -1, -1]), 3, 2)  # new pad tokens still see themselves
    assert pad_new.tolist() == [[True, True, False], [True, False, True]]
