"""Invariants of obinfer.cache.kv_cache: storage, positions, n_invalid, memory, fork, versioned snapshots.

B = 2 rows and 3 KV heads everywhere, with different contents per (row, head), so that a transposed
row/head shows up. References are explicit loops, never the code under test. Attention over the cache
is tested in tests/test_attention.py.
"""

from __future__ import annotations

import doctest

import pytest
import torch

from obinfer.cache import kv_cache
from obinfer.cache.kv_cache import CacheError, CacheSnapshot, KVCache, LayerCache
from obinfer.cache.presses import make_press
from obinfer.errors import ObinferError
from obinfer.weights import load_model

B, H, G, D = 2, 3, 2, 8  # rows, KV heads, query heads per KV head, head dim


pytestmark = pytest.mark.usefixtures("one_thread")


def test_module_docstring_example_runs():
    result = doctest.testmod(kv_cache, extraglobs={"torch": torch})
    assert result.attempted >= 5 and result.failed == 0


# ---------------------------------------------------------------- storage invariants
class Tokens:
    """Every appended token of every (row, head) gets a unique id, written into k[..., 0].

    The test remembers each id's k, v, position, owner (row, head) and expected accumulator value, so
    any slot of the cache can be checked against what was appended for it.
    """

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.pos: dict[int, int] = {}
        self.owner: dict[int, tuple[int, int]] = {}
        self.acc: dict[int, float] = {}
        self.next = 1
        self.g = torch.Generator().manual_seed(0)

    def new(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, T, D) for positions pos (B, T); ids in k[..., 0]."""
        T = pos.shape[1]
        k = torch.randn(B, H, T, D, generator=self.g)
        v = torch.randn(B, H, T, D, generator=self.g)
        for b in range(B):
            for h in range(H):
                for t in range(T):
                    i = self.next
                    self.next += 1
                    k[b, h, t, 0] = i
                    self.k[i], self.v[i], self.pos[i] = k[b, h, t].clone(), v[b, h, t].clone(), int(pos[b, t])
                    self.owner[i], self.acc[i] = (b, h), 0.0
        return k, v


def ids_of(layer: LayerCache) -> list[list[int]]:
    """Token ids per segment, in slot order."""
    return [layer.segment(i)[0][:, 0].long().tolist() for i in range(layer.n_segments)]


def check(layer: LayerCache, tok: Tokens, expected: list[list[int]] | None = None) -> None:
    """Every slot's k, v, position and accumulator belong to the token whose id it holds."""
    acc = layer.accumulator("a")
    for i, ids in enumerate(ids_of(layer)):
        b, h = divmod(i, H)
        k, v, pos = layer.segment(i)
        s = layer.start[i]
        for slot, t in enumerate(ids):
            assert tok.owner[t] == (b, h), f"segment {i} holds a token of {tok.owner[t]}"
            assert torch.equal(k[slot], tok.k[t]) and torch.equal(v[slot], tok.v[t])
            assert int(pos[slot]) == tok.pos[t]
            assert float(acc[s + slot]) == pytest.approx(tok.acc[t])
        if expected is not None:
            assert ids == expected[i]
    assert layer.lengths() == [[len(x) for x in ids_of(layer)[b * H : (b + 1) * H]] for b in range(B)]
    assert layer.n_invalid == sum(int((layer.segment(i)[2] < 0).sum()) for i in range(layer.n_segments))
    # what the mutations keep up to date without reading the device: segment tensors, layout flag
    start, length = layer.segment_tensors()
    assert start.tolist() == layer.start and length.tolist() == layer.length
    L, c = layer.length[0], layer.cap[0]
    uniform = all(x == L for x in layer.length) and all(x == c for x in layer.cap)
    assert layer.is_uniform() == (uniform and layer.start == [i * c for i in range(layer.n_segments)])
    # dense(): same contents, padded with pos -1 beyond each segment's length
    k, v, pos = layer.dense()
    a = layer.acc_dense("a")
    for i in range(layer.n_segments):
        b, h = divmod(i, H)
        ks, vs, ps = layer.segment(i)
        L = len(ps)
        assert (
            torch.equal(k[b, h, :L], ks) and torch.equal(v[b, h, :L], vs) and torch.equal(pos[b, h, :L], ps)
        )
        assert (pos[b, h, L:] == -1).all()
        assert torch.equal(a[b, h, :L], acc[layer.start[i] : layer.start[i] + L])


def add_acc(layer: LayerCache, tok: Tokens, f) -> None:  # noqa: ANN001
    """Add f(id) to every slot's accumulator through the dense-layout API."""
    _, _, pos = layer.dense()
    vals = torch.zeros(pos.shape)
    for i, ids in enumerate(ids_of(layer)):
        b, h = divmod(i, H)
        for slot, t in enumerate(ids):
            vals[b, h, slot] = f(t)
            tok.acc[t] += f(t)
    layer.add_to_accumulator("a", vals)


def test_positions_from_counter_with_left_padding():
    cache = KVCache.empty(1, B, H, D)
    pos = cache.next_positions(6, n_pad=torch.tensor([2, 0]))
    assert pos.tolist() == [[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert cache.seen.tolist() == [4, 6]  # pads do not advance the counter
    tok = Tokens()
    cache.layers[0].append(*tok.new(pos), pos)
    cache.layers[0].keep([torch.tensor([0, 5])] * (B * H))  # lengths now 2: the counter is unaffected
    assert cache.next_positions(2).tolist() == [[4, 5], [6, 7]]
    assert cache.seen.tolist() == [6, 8]


def test_append_keep_remove_keep_slots_together():
    cache = KVCache.empty(1, B, H, D)
    layer, tok = cache.layers[0], Tokens()
    layer.accumulator("a")  # created before the first fill: must be sized by it
    pos = cache.next_positions(7, n_pad=torch.tensor([2, 0]))
    layer.append(*tok.new(pos), pos)
    check(layer, tok)
    assert layer.is_uniform() and layer.n_invalid == 2 * H
    add_acc(layer, tok, lambda t: 0.5 * t + 1)
    check(layer, tok)

    # ragged keep: different lengths per segment, arbitrary order, a pad slot kept in row 0
    g = torch.Generator().manual_seed(1)
    slots = [torch.randperm(7, generator=g)[: 2 + i % 4] for i in range(B * H)]
    slots[0] = torch.tensor([6, 0, 3])  # slot 0 of row 0 is left padding
    before = ids_of(layer)
    layer.keep(slots)
    check(layer, tok, [[before[i][s] for s in slots[i].tolist()] for i in range(B * H)])
    assert not layer.is_uniform()
    assert layer.nbytes() == sum(len(s) for s in slots) * 2 * D * 4  # exactly the kept slots

    # append to the ragged layout (grows every segment), then accumulate in the ragged layout
    before = ids_of(layer)
    pos = cache.next_positions(3)
    layer.append(*tok.new(pos), pos)
    new_ids = ids_of(layer)
    check(layer, tok, [before[i] + new_ids[i][-3:] for i in range(B * H)])
    new_pos = [[tok.pos[t] for t in new_ids[i][-3:]] for i in (0, H)]
    assert new_pos == [[5, 6, 7], [7, 8, 9]]  # row 0 had 2 pads: its counter is 2 behind
    add_acc(layer, tok, lambda t: float(t % 7))
    check(layer, tok)

    # remove_slot: middle, first and last slots; the segment keeps every other token
    for i, slot in [(0, 2), (1, 0), (4, -1), (5, 1)]:
        before = ids_of(layer)[i]
        slot = slot % len(before)
        layer.remove_slot(i, slot)
        assert sorted(ids_of(layer)[i]) == sorted(before[:slot] + before[slot + 1 :])
        check(layer, tok)
    layer.remove_slot(0, ids_of(layer)[0].index(next(t for t in ids_of(layer)[0] if tok.pos[t] < 0)))
    check(layer, tok)  # the pad slot is gone and n_invalid follows

    # append after removals (no reallocation needed), then a uniform keep
    pos = cache.next_positions(1)
    layer.append(*tok.new(pos), pos)
    check(layer, tok)
    before = ids_of(layer)
    slots = [torch.tensor([len(x) - 1, 0]) for x in before]
    layer.keep(slots)
    check(layer, tok, [[x[-1], x[0]] for x in before])
    assert layer.is_uniform() and layer.nbytes() == B * H * 2 * 2 * D * 4
    pos = cache.next_positions(2)
    layer.append(*tok.new(pos), pos)  # the uniform append path after a keep
    check(layer, tok)
    assert layer.is_uniform()


def test_keep_rejects_bad_input():
    cache = KVCache.empty(1, B, H, D)
    pos = cache.next_positions(4)
    cache.layers[0].append(*Tokens().new(pos), pos)
    with pytest.raises(ValueError, match="index tensors"):
        cache.layers[0].keep([torch.tensor([0])])
    with pytest.raises(IndexError, match="out of range"):
        cache.layers[0].keep([torch.tensor([4])] * (B * H))


def test_remove_slots_equals_remove_slot_per_segment():
    """The vectorized eviction (one slot of every segment) == remove_slot on each segment in turn."""
    cache = KVCache.empty(1, B, H, D)
    layer, tok = cache.layers[0], Tokens()
    pos = cache.next_positions(6, n_pad=torch.tensor([1, 0]))
    layer.append(*tok.new(pos), pos)
    add_acc(layer, tok, lambda t: 0.25 * t)
    layer.keep(
        [torch.randperm(6, generator=torch.Generator().manual_seed(i))[: 2 + i % 3] for i in range(B * H)]
    )
    pos = cache.next_positions(1)
    layer.append(*tok.new(pos), pos)  # spare capacity after each segment
    ref = layer.copy()
    slots = torch.tensor([i % L for i, L in enumerate(layer.length)])  # first, middle and last slots
    layer.remove_slots(slots)
    for i, slot in enumerate(slots.tolist()):
        ref.remove_slot(i, slot)
    assert ids_of(layer) == ids_of(ref) and layer.length == ref.length
    check(layer, tok)
    check(ref, tok)
    assert layer.n_invalid == ref.n_invalid
    with pytest.raises(IndexError, match="out of range"):
        layer.remove_slots(torch.tensor(layer.length))
    with pytest.raises(ValueError, match="slot indices"):
        layer.remove_slots(torch.tensor([0]))
    snap = cache.snapshot()
    layer.remove_slots(torch.zeros(B * H, dtype=torch.long))
    with pytest.raises(CacheError, match="evicted"):
        cache.truncate_to(snap)


def test_append_with_a_known_pad_count_reads_nothing():
    """n_pad passed by the caller (as the model does) keeps n_invalid without counting."""
    cache = KVCache.empty(1, B, H, D)
    layer, tok = cache.layers[0], Tokens()
    pos = cache.next_positions(5, n_pad=torch.tensor([2, 0]))
    layer.append(*tok.new(pos), pos, n_pad=2)
    assert layer.n_invalid == 2 * H and not layer.known_no_pads()
    other = KVCache.empty(1, B, H, D)
    pos = other.next_positions(5)
    other.layers[0].append(*tok.new(pos), pos, n_pad=0)
    other.layers[0].keep([torch.tensor([0, 4])] * (B * H))  # removals keep a count of 0 without a recount
    pos = other.next_positions(1)
    other.layers[0].append(*tok.new(pos), pos, n_pad=0)
    assert other.layers[0].known_no_pads() and count_invalid(other.layers[0]) == 0


# ---------------------------------------------------------------- stacking caches into one batch
def single_rows(seed: int = 40) -> list[KVCache]:
    """Three one-row caches: uniform, ragged (with an accumulator), ragged with a pad slot kept."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, n_pad, keep in [
        (6, 0, None),
        (9, 0, ([0, 3, 8], [1, 2, 4, 5, 6, 7, 8], [8])),
        (7, 2, ([0, 2, 6], [5], [1, 3, 4, 6])),
    ]:
        c = KVCache.empty(2, 1, H, D)
        pos = c.next_positions(n, torch.tensor([n_pad]) if n_pad else None)
        for layer in c.layers:
            layer.append(torch.randn(1, H, n, D, generator=g), torch.randn(1, H, n, D, generator=g), pos)
            if keep is not None:
                layer.keep([torch.tensor(s) for s in keep])
        if keep is not None and n_pad == 0:
            c.layers[1].add_to_accumulator("a", torch.rand(1, H, 7, generator=g))
        out.append(c)
    return out


def test_cat_rows_stacks_segments_counters_and_accumulators():
    parts = single_rows()
    before = [
        [[x.clone() for x in (lc.k, lc.v, lc.pos)] + [list(lc.length)] for lc in p.layers] for p in parts
    ]
    has_acc = [[("a" in lc.acc) for lc in p.layers] for p in parts]
    snap = parts[0].snapshot()
    both = KVCache.cat_rows(parts)
    assert both.batch == 3 and both.seen.tolist() == [int(p.seen[0]) for p in parts]
    for li, layer in enumerate(both.layers):
        assert layer.batch == 3 and layer.nbytes() == sum(layer.length) * 2 * D * 4  # exactly the slots
        assert layer.n_invalid == sum(p.layers[li].n_invalid for p in parts)
        assert ("a" in layer.acc) == any(h[li] for h in has_acc)  # layer 1 only
        for b, p in enumerate(parts):
            src = p.layers[li]
            for h in range(H):
                for x, y in zip(layer.segment(b * H + h), src.segment(h), strict=True):
                    assert torch.equal(x, y)
                if "a" in layer.acc:
                    s, L = layer.start[b * H + h], layer.length[b * H + h]
                    want = src.acc["a"][src.start[h] : src.start[h] + L] if "a" in src.acc else torch.zeros(L)
                    assert torch.equal(layer.acc["a"][s : s + L], want)
        start, length = layer.segment_tensors()
        assert start.tolist() == layer.start and length.tolist() == layer.length
    for p, was in zip(parts, before, strict=True):  # the parts are untouched
        for lc, (k, v, pos, lengths) in zip(p.layers, was, strict=True):
            assert torch.equal(lc.k, k) and torch.equal(lc.v, v) and torch.equal(lc.pos, pos)
            assert lc.length == lengths
    with pytest.raises(CacheError):
        both.truncate_to(snap)  # a snapshot of a part does not apply to the stack
    pos = both.next_positions(2)  # the stack grows like any ragged cache
    for layer in both.layers:
        layer.append(torch.randn(3, H, 2, D), torch.randn(3, H, 2, D), pos)
    assert both.seen.tolist() == [int(p.seen[0]) + 2 for p in parts]
    new_pos = [both.layers[0].segment(b * H + h)[2][-2:].tolist() for b in range(3) for h in range(H)]
    assert new_pos == [[int(p.seen[0]) + t for t in (0, 1)] for p in parts for _ in range(H)]
    with pytest.raises(ValueError, match="rows"):
        both.layers[0].append(torch.randn(2, H, 1, D), torch.randn(2, H, 1, D), pos[:2, :1])
    with pytest.raises(ValueError, match="layers"):
        KVCache.cat_rows([parts[0], KVCache.empty(1, 1, H, D)])
    with pytest.raises(ValueError, match="KV heads"):
        KVCache.cat_rows([parts[0], KVCache.empty(2, 1, H + 1, D)])
    with pytest.raises(ValueError, match="at least one"):
        KVCache.cat_rows([])


def test_keep_rows_keeps_those_rows_in_that_order_and_frees_the_rest():
    parts = single_rows()
    both = KVCache.cat_rows(parts)
    pos = both.next_positions(1)  # one decode step: the stack gets spare capacity in every segment
    for layer in both.layers:
        layer.append(torch.randn(3, H, 1, D), torch.randn(3, H, 1, D), pos)
    seen = both.seen.tolist()
    ref = [[[x.clone() for x in layer.segment(i)] for i in range(3 * H)] for layer in both.layers]
    acc = {li: layer.acc["a"].clone() for li, layer in enumerate(both.layers) if "a" in layer.acc}
    starts = [list(layer.start) for layer in both.layers]
    caps = [list(layer.cap) for layer in both.layers]
    version = both.layers[0].version
    both.keep_rows([2, 1])
    assert both.batch == 2 and both.seen.tolist() == [seen[2], seen[1]]
    for li, layer in enumerate(both.layers):
        assert layer.batch == 2 and layer.n_segments == 2 * H
        assert layer.cap == [caps[li][b * H + h] for b in (2, 1) for h in range(H)]  # spare capacity kept
        assert layer.nbytes() == sum(layer.cap) * 2 * D * 4  # only the kept rows' memory
        assert layer.n_invalid == count_invalid(layer)
        for j, (b, h) in enumerate((b, h) for b in (2, 1) for h in range(H)):
            for x, y in zip(layer.segment(j), ref[li][b * H + h], strict=True):
                assert torch.equal(x, y)
            if li in acc:
                s, L = layer.start[j], layer.length[j]
                s0 = starts[li][b * H + h]
                assert torch.equal(layer.acc["a"][s : s + L], acc[li][s0 : s0 + L])
    assert both.layers[0].version != version  # rows were removed: a new version
    pos = both.next_positions(1)  # and the kept rows go on growing from their own counters
    for layer in both.layers:
        layer.append(torch.randn(2, H, 1, D), torch.randn(2, H, 1, D), pos)
    assert pos[:, 0].tolist() == [seen[2], seen[1]]
    assert both.layers[0].segment(0)[2][-1].item() == seen[2]
    for bad in ([], [0, 0], [2]):
        with pytest.raises(ValueError, match="keep_rows"):
            both.keep_rows(bad)


@torch.inference_mode()
def test_decoding_stacked_caches_equals_decoding_each_alone(tiny_llama_dir):
    """Caches compressed by different presses from prompts of different lengths, decoded as one batch:
    every row's logits equal its cache decoded alone (float32 rounding), and so do the greedy tokens."""
    model = load_model(tiny_llama_dir)
    g = torch.Generator().manual_seed(42)
    parts, first = [], []
    for n, name in [(50, "adakv-snapkv-obk"), (37, "snapkv"), (61, "adakv-snapkv"), (20, "full")]:
        ids = torch.randint(3, model.cfg.vocab_size, (1, n), generator=g)
        cache = model.new_cache()
        press = make_press(name, compression_ratio=0.5)
        logits = model(ids, cache, observer=press.prefill_observer(), last_only=True)
        parts.append(cache)
        first.append(int(logits[0, -1].argmax()))
    assert not all(layer.is_uniform() for layer in parts[0].layers)  # AdaKV: ragged heads
    alone = [p.fork() for p in parts]
    both = KVCache.cat_rows(parts)
    tok_b = torch.tensor(first)[:, None]
    tok_a = [torch.tensor([[t]]) for t in first]
    for _ in range(12):
        lb = model(tok_b, both)[:, -1]
        la = torch.cat([model(t, c)[:, -1] for t, c in zip(tok_a, alone, strict=True)])
        torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
        tok_b = lb.argmax(-1, keepdim=True)
        tok_a = [x[None, None] for x in la.argmax(-1)]
        assert tok_b[:, 0].tolist() == [int(t) for t in tok_a]


# ---------------------------------------------------------------- memory accounting
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_follows_kept_tokens(dtype):
    cache = KVCache.empty(2, B, H, D, dtype=dtype)
    pos = cache.next_positions(40)
    esize = torch.tensor([], dtype=dtype).element_size()
    for layer in cache.layers:
        layer.append(torch.randn(B, H, 40, D), torch.randn(B, H, 40, D), pos)
        assert layer.nbytes() == B * H * 40 * 2 * D * esize
    cache.layers[0].keep([torch.arange(0, 40, 2)] * (B * H))  # uniform: 20 per head
    ragged = [torch.arange(n) for n in (3, 37, 20, 20, 1, 39)]  # AdaKV-like: same total, uneven heads
    cache.layers[1].keep(ragged)
    assert cache.layers[0].nbytes() == B * H * 20 * 2 * D * esize
    assert cache.layers[1].nbytes() == 120 * 2 * D * esize  # not 6 x 39 (the longest head)
    assert cache.nbytes() == cache.n_tokens() * 2 * D * esize


@pytest.mark.parametrize("name", ["snapkv", "adakv-snapkv", "adakv-snapkv-obk"])
def test_press_on_model_frees_memory(tiny_llama_dir, name):
    model = load_model(tiny_llama_dir)
    cfg = model.cfg
    n, r = 160, 0.5
    ids = torch.randint(3, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(4))
    full = model.new_cache()
    model(ids, full)
    cache = model.new_cache()
    model(ids, cache, observer=make_press(name, compression_ratio=r).prefill_observer())
    per_token = 2 * cfg.head_dim * 4  # K and V of one token in one KV head, float32
    assert full.nbytes() == n * cfg.n_layers * cfg.n_kv_heads * per_token
    assert cache.n_tokens() == cfg.n_layers * cfg.n_kv_heads * int(n * (1 - r))  # layer totals (AdaKV too)
    assert cache.nbytes() == cache.n_tokens() * per_token  # exact after keep (the spec allows 5%)
    assert cache.nbytes() == pytest.approx((1 - r) * full.nbytes(), rel=0.05)
    lengths = {L for layer in cache.layers for L in layer.length}
    assert (len(lengths) > 1) == name.startswith("adakv")  # ragged heads for AdaKV


# ---------------------------------------------------------------- positions on the model
@torch.inference_mode()
def test_positions_after_eviction_use_the_counter(tiny_llama_dir):
    """After eviction the next token is rotated at position n (the counter), not at a segment length."""
    model = load_model(tiny_llama_dir)
    n = 50
    ids = torch.randint(3, model.cfg.vocab_size, (1, n + 1), generator=torch.Generator().manual_seed(5))
    full = model.new_cache()
    ref_logits = model(ids, full)[:, -1]
    k_full = full.layers[0].dense()[0]  # (1, Hkv, n + 1, D); layer-0 keys depend on token and position only

    cache = model.new_cache()
    model(ids[:, :n], cache)
    for layer in cache.layers:  # keep everything, in reversed slot order: attention must not change
        layer.keep([torch.arange(n - 1, -1, -1)] * layer.n_segments)
    torch.testing.assert_close(model(ids[:, n:], cache)[:, -1], ref_logits, atol=1e-5, rtol=1e-5)

    cache = model.new_cache()
    model(ids[:, :n], cache)
    for layer in cache.layers:  # ragged eviction: heads keep 10 and 23 tokens
        layer.keep([torch.arange(0, n, 5), torch.arange(0, n, 2)[2:]])
    model(ids[:, n:], cache)
    assert cache.seen.tolist() == [n + 1]
    for h in range(model.cfg.n_kv_heads):
        k, _, pos = cache.layers[0].segment(h)
        assert int(pos[-1]) == n
        torch.testing.assert_close(k[-1], k_full[0, h, n], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(k[-1], k_full[0, h, len(pos) - 1], atol=1e-3)  # a length would differ


# ---------------------------------------------------------------- fork, snapshot, truncate
def filled_cache(seed: int = 6) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    cache = KVCache.empty(2, B, H, D)
    pos = cache.next_positions(8, n_pad=torch.tensor([1, 0]))
    for layer in cache.layers:
        layer.append(torch.randn(B, H, 8, D, generator=g), torch.randn(B, H, 8, D, generator=g), pos)
        layer.add_to_accumulator("a", torch.rand(B, H, 8, generator=g))
    cache.layers[1].keep([torch.arange(1 + i) for i in range(B * H)])  # layer 1 ragged
    return cache


def state(cache: KVCache) -> list:
    out = [cache.seen.clone()]
    for layer in cache.layers:
        out += [*layer.dense(), layer.acc_dense("a").clone(), list(layer.length), layer.n_invalid]
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in out]


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def grow(cache: KVCache, T: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pos = cache.next_positions(T)
    for layer in cache.layers:
        layer.append(torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g), pos)


def test_fork_is_independent():
    cache = filled_cache()
    original = state(cache)
    fork = cache.fork()
    assert_same(state(fork), original)
    grow(fork, 3, seed=7)
    fork.layers[0].keep([torch.tensor([0])] * (B * H))
    fork.layers[1].remove_slot(5, 0)
    assert_same(state(cache), original)  # the original did not move
    forked = state(fork)
    grow(cache, 200, seed=8)  # forces a reallocation of the original
    cache.layers[1].keep([torch.tensor([0])] * (B * H))
    assert_same(state(fork), forked)


@pytest.mark.parametrize("T", [2, 300])  # 300 > the reserve: the buffers are reallocated in between
def test_snapshot_truncate_restores_exactly(T):
    cache = filled_cache()
    original = state(cache)
    snap = cache.snapshot()
    grow(cache, T, seed=9)
    cache.truncate_to(*snap)
    assert_same(state(cache), original)
    grow(cache, 5, seed=10)  # appending after truncation == appending to an untouched copy
    ref = filled_cache()
    grow(ref, 5, seed=10)
    assert_same(state(cache), state(ref))


def test_truncate_to_the_same_snapshot_again_and_again():
    """One context, many questions: snapshot once, truncate after each question (both call forms)."""
    cache = filled_cache()
    original = state(cache)
    snap = cache.snapshot()
    for i, T in enumerate([3, 40, 1]):
        grow(cache, T, seed=20 + i)
        if i % 2:
            cache.truncate_to(snap)
        else:
            cache.truncate_to(*snap)
        assert_same(state(cache), original)


@pytest.mark.parametrize("evict", ["keep", "remove_slot", "keep_everything"])
def test_truncate_after_an_eviction_raises_and_changes_nothing(evict):
    cache = filled_cache()
    snap = cache.snapshot()
    grow(cache, 3, seed=11)
    layer = cache.layers[1]  # layer 0 is untouched: the check must still be all or nothing
    if evict == "keep":
        layer.keep([torch.tensor([0])] * (B * H))
    elif evict == "remove_slot":
        layer.remove_slot(4, 1)
    else:  # a keep that keeps every slot still counts: the check is on the operation, not the outcome
        layer.keep([torch.arange(L) for L in layer.length])
    before = state(cache)
    with pytest.raises(CacheError, match="layer 1 .*evicted"):
        cache.truncate_to(snap)
    assert_same(state(cache), before)
    assert issubclass(CacheError, ObinferError)
    grow(cache, 2, seed=12)  # the cache is still usable, and a new snapshot works
    snap = cache.snapshot()
    grow(cache, 2, seed=13)
    cache.truncate_to(snap)


def test_an_eviction_before_the_snapshot_is_fine():
    """Compress, then snapshot (the ask-many-questions pattern): only removals after the snapshot count."""
    cache = filled_cache()  # layer 1 was compacted by keep() before the snapshot
    cache.layers[0].remove_slot(0, 3)
    original = state(cache)
    snap = cache.snapshot()
    grow(cache, 4, seed=14)
    cache.truncate_to(snap)
    assert_same(state(cache), original)


def test_truncate_to_a_later_snapshot_after_an_earlier_one_raises():
    """Back to s1, then new appends: the slots s2 remembered are gone, even though lengths would fit."""
    cache = filled_cache()
    s1 = cache.snapshot()
    grow(cache, 3, seed=15)
    s2 = cache.snapshot()
    at_s2 = state(cache)
    grow(cache, 2, seed=16)
    cache.truncate_to(s2)  # s2 is still reachable, and so is s1 afterwards
    assert_same(state(cache), at_s2)
    cache.truncate_to(s1)
    grow(cache, 5, seed=17)  # longer than s2 again, but different slots
    with pytest.raises(CacheError, match="earlier snapshot"):
        cache.truncate_to(s2)
    cache.truncate_to(s1)  # s1 still works


def test_snapshots_of_forks_and_of_other_caches():
    cache = filled_cache()
    original = state(cache)
    before_fork = cache.snapshot()
    grow(cache, 2, seed=18)
    fork = cache.fork()
    after_fork = cache.snapshot()
    fork.truncate_to(before_fork)  # the fork has the same contents up to the fork
    assert_same(state(fork), original)
    with pytest.raises(CacheError):
        fork.truncate_to(after_fork)  # taken by the original after the fork: the fork cannot know it
    with pytest.raises(CacheError):
        filled_cache().truncate_to(before_fork)  # same shapes, different cache
    with pytest.raises(CacheError, match="KVCache.snapshot"):
        cache.truncate_to(before_fork.lengths, before_fork.seen)  # the unversioned (lengths, seen) form
    with pytest.raises(CacheError, match="layers"):
        cache.truncate_to(CacheSnapshot(before_fork.lengths[:1], before_fork.seen, before_fork.versions[:1]))
    cache.truncate_to(before_fork)
    assert_same(state(cache), original)


# ---------------------------------------------------------------- n_invalid after every mutation
def count_invalid(layer: LayerCache) -> int:
    """Pad slots in use, one slot at a time."""
    return sum(int(p) < 0 for i in range(layer.n_segments) for p in layer.segment(i)[2].tolist())


def test_n_invalid_follows_every_mutation():
    cache = KVCache.empty(1, B, H, D)
    layer, tok = cache.layers[0], Tokens()
    counts = []

    def checked() -> None:
        assert layer.n_invalid == count_invalid(layer)
        counts.append(layer.n_invalid)

    def append(T: int, n_pad: torch.Tensor | None = None) -> None:
        pos = cache.next_positions(T, n_pad)
        layer.append(*tok.new(pos), pos)
        checked()

    checked()  # empty
    append(6, torch.tensor([2, 1]))  # first fill, uniform: 3 pads per head
    append(2)  # uniform append, no pads
    snap = cache.snapshot()
    append(3, torch.tensor([0, 2]))  # pads appended later (a padded batch of questions)
    cache.truncate_to(snap)  # truncation drops them again
    checked()
    fork = cache.fork()
    assert fork.layers[0].n_invalid == layer.n_invalid
    fork.layers[0].keep([torch.tensor([2])] * (B * H))  # the fork's count moves, not the original's
    assert fork.layers[0].n_invalid == 0
    checked()
    # Ragged keep. Row 0 (segments 0-2) has pads in slots 0, 1; row 1 (segments 3-5) in slot 0.
    layer.keep([torch.tensor(s) for s in ([3, 0], [1, 4, 0], [5], [7, 6, 0], [0], [2, 3])])
    checked()  # pads kept: 1 + 2 + 0 + 1 + 1 + 0
    # ragged append (reallocates): segment 0 [v, pad, new], 1 [pad, v, pad, new], 3 [v, v, pad, new], 4 [pad, new]
    append(1)
    layer.remove_slot(0, 1)  # a pad is removed, the new token moves in
    checked()
    layer.remove_slot(3, 0)  # a valid slot is removed, a valid one moves in: [new, v, pad]
    checked()
    layer.remove_slot(1, 0)  # a pad is removed: [new, v, pad]
    checked()
    layer.remove_slot(4, 0)  # the segment's only pad: [new]
    checked()
    layer.remove_slot(3, 0)  # a valid slot is removed and the pad moves into it: [pad, v]
    checked()
    layer.keep([torch.arange(L) for L in layer.length])  # keep everything (a ragged copy)
    checked()
    layer.keep([torch.tensor([0])] * (B * H))  # uniform keep: segment 3 keeps its pad
    checked()
    assert counts == [0, 9, 9, 15, 9, 9, 5, 5, 4, 4, 3, 2, 2, 2, 1], counts


def test_decoding_keeps_memory_close_to_tokens_held():
    """After compression and 200 decode steps, allocated K/V stays within 6% + 16 slots per head of the held tokens."""
    B, H, D = 2, 3, 8
    layer = LayerCache(B, H, D, torch.float32, torch.device("cpu"))
    layer.append(torch.randn(B, H, 300, D), torch.randn(B, H, 300, D), torch.arange(300).expand(B, 300))
    layer.keep([torch.arange(0, 300, 3)] * (B * H))  # 100 slots per head, exact
    assert layer.nbytes() == B * H * 100 * 2 * D * 4
    for t in range(200):
        layer.append(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D), torch.full((B, 1), 300 + t))
        held = sum(layer.length) * 2 * D * 4
        assert layer.nbytes() <= held * 1.0625 + B * H * 16 * 2 * D * 4
