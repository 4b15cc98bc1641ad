"""Presses (policy + score + allocator) on spec vectors and on the tiny Llama: docs/scores.md sections 3-6.

(a) spec Examples 2, 3 and 4 through the policies and `PressRun.compress_layer`; (b) every press name
runs, keeps the right number of tokens and its protected tokens; (c) a budget >= the prompt changes
nothing; (d) decode-time eviction follows a float64 reference and keeps every head within budget;
H2O scores query chunks; (e) query-agnostic questions continue at the uncompressed positions and
one compressed context serves several questions; (f) a left-padded batch equals its rows run alone;
(g) errors (every option type- and range-checked) and float32 scores under bfloat16; (h) prompts not
longer than SnapKV's window are observed whole, and `GenStats.observed_queries` says so; (i) presses
are frozen settings whose runs hold the state, FULL is a real press, scoring is pure and H2O's
accumulators are an explicit state update, the registries and the name grammar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from spec_vectors import EX2_K, EX2_Q, EX2_V
from torch import Tensor

from obinfer.cache import allocators, policies, scores
from obinfer.cache.allocators import AdaKV
from obinfer.cache.kv_cache import KVCache, LayerCache
from obinfer.cache.policies import H2O, POLICIES, TOVA, Policy, SnapKV, register_policy
from obinfer.cache.presses import (
    FULL,
    Press,
    PressError,
    PressName,
    describe_presses,
    make_press,
    parse_press_name,
    policy_options,
    press_names,
)
from obinfer.cache.scores import ScoreInputs, get_score
from obinfer.errors import ObinferError
from obinfer.generate import GenStats, generate, stream
from obinfer.weights import load_model

INF = math.inf


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def tokens(n: int, seed: int, vocab: int = 320) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def base_press_names() -> list[str]:
    """Every press name but full, without a layer budget or query source prefix."""
    return [n for n in press_names()[1:] if PressName.parse(n).base == n]


def layer_positions(layer: LayerCache, row: int = 0) -> list[list[int]]:
    """Sorted positions kept per KV head of one row."""
    H = layer.n_kv_heads
    return [sorted(layer.segment(row * H + h)[2].tolist()) for h in range(H)]


# ================================================================ (a) spec examples through policies


def cache_of(k: list, v: list) -> LayerCache:
    """A one-row LayerCache holding keys/values k, v ([head][position] -> vector) at positions 0..n-1."""
    kt, vt = torch.tensor([k]), torch.tensor([v])
    cache = KVCache.empty(1, 1, kt.shape[1], kt.shape[3])
    cache.layers[0].append(kt, vt, cache.next_positions(kt.shape[2]))
    return cache.layers[0]


def allocator_of(name: str, alpha: float):  # noqa: ANN201
    """The allocator object: AdaKV with this alpha, or the uniform one (which has no alpha)."""
    return AdaKV(alpha=alpha) if name == "adakv" else name


def run_example2(score: str, kernel: int, allocator: str, cr: float, alpha: float) -> list[list[int]]:
    layer = cache_of(EX2_K, EX2_V)
    press = Press(
        SnapKV(window=2, kernel=kernel), score, allocator_of(allocator, alpha), compression_ratio=cr
    )
    press.start().compress_layer(0, torch.tensor([EX2_Q]), torch.tensor([[8, 9]]), layer)
    return layer_positions(layer)


@pytest.mark.parametrize("allocator", ["uniform", "adakv"])
def test_example2_snapkv_attn_pooled(allocator):
    assert run_example2("attn", 3, allocator, 0.4, 0.5) == [[1, 2, 4, 6, 8, 9], [1, 2, 5, 6, 8, 9]]


@pytest.mark.parametrize("score", ["obv", "obk", "obkv"])
@pytest.mark.parametrize("allocator", ["uniform", "adakv"])
def test_example2_ob_scores_unpooled(score, allocator):
    assert run_example2(score, 1, allocator, 0.4, 0.5) == [[1, 2, 3, 5, 8, 9], [1, 2, 6, 7, 8, 9]]


def test_example2_budget_moves_between_heads_alpha02():
    assert run_example2("obv", 1, "uniform", 0.5, 0.2) == [[2, 3, 5, 8, 9], [1, 2, 6, 8, 9]]
    assert run_example2("obv", 1, "adakv", 0.5, 0.2) == [[1, 2, 3, 5, 8, 9], [2, 6, 8, 9]]
    for allocator in ("uniform", "adakv"):
        assert run_example2("obkv", 1, allocator, 0.5, 0.2) == [[2, 3, 5, 8, 9], [1, 2, 6, 8, 9]]


def test_example2_tova_last_query():
    layer = cache_of(EX2_K, EX2_V)
    q, q_pos = torch.tensor([EX2_Q]), torch.tensor([[8, 9]])
    s = TOVA().score(q, q_pos, layer, get_score("attn"), "sum")
    spec = torch.tensor([0.1071, 0.1232, 0.1073, 0.0912, 0.0624, 0.1082, 0.1032, 0.1230, 0.0799])
    assert torch.equal(s[0, 0], s[0, 1])  # one ranking for every KV head
    assert s[0, 0, 9] == INF  # the last token is protected
    # mean over the 4 heads up to a constant factor: compare normalised rows
    torch.testing.assert_close(s[0, 0, :9] / s[0, 0, :9].sum(), spec / spec.sum(), atol=2e-4, rtol=0)
    press = Press(TOVA(), compression_ratio=0.5)  # n_kept 5: the last token and the spec row's top 4
    press.start().compress_layer(0, q, q_pos, layer)
    top4 = sorted(spec.topk(4).indices.tolist())
    assert layer_positions(layer) == [top4 + [9]] * 2


@dataclass(frozen=True)
class Fixed(Policy):
    """A policy returning given scores (to drive a Press with spec Example 4); not registered."""

    name = "fixed"
    given: Tensor | None = None

    def score(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
        return self.given


EX4 = torch.tensor(
    [[[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, INF, INF], [0.05, 0.04, 0.03, 0.02, 0.01, 0.3, INF, INF]]]
)


@pytest.mark.parametrize(
    "allocator, alpha, expected",
    [
        ("adakv", 0.5, [[0, 1, 2, 3, 6, 7], [6, 7]]),
        ("adakv", 0.75, [[0, 1, 2, 6, 7], [5, 6, 7]]),
        ("uniform", 0.2, [[0, 1, 6, 7], [0, 5, 6, 7]]),
    ],
)
def test_example4_through_a_press(allocator, alpha, expected):
    g = torch.Generator().manual_seed(0)
    layer = cache_of(torch.randn(2, 8, 4, generator=g).tolist(), torch.randn(2, 8, 4, generator=g).tolist())
    k_before = [layer.segment(h)[0].clone() for h in range(2)]
    press = Press(Fixed(given=EX4), allocator=allocator_of(allocator, alpha), compression_ratio=0.5)
    press.start().compress_layer(0, torch.zeros(1, 2, 1, 4), torch.tensor([[7]]), layer)
    assert layer_positions(layer) == expected
    for h in range(2):  # the kept slots hold the keys of their positions
        k, _, pos = layer.segment(h)
        assert torch.equal(k, k_before[h][pos])


EX3_Q = [(1, 0), (0.5, 0.5), (0, 1), (1, 1), (-0.5, 1)]
EX3_K = [(1, 0.5), (0, 1), (1, -1), (0.5, 0.5), (-1, 0)]
EX3_V = [(1, 0), (0, 1), (1, 1), (-1, 0.5), (0.5, -0.5)]


@pytest.mark.parametrize(
    "score, expected",
    [
        ("attn", [2.4355, 1.5637, 0.3086, 0.4545, 0.2377]),
        ("obv", [1.5863, 0.6519, 0.0696, 0.1310, 0.0282]),
        ("obk", [0.1713, 0.0969, 0.0073, 0.0513, 0.0063]),
        ("obkv", [2.1629, 1.1098, 0.0471, 0.3126, 0.0592]),
    ],
)
@pytest.mark.parametrize("chunk", [2, 256])
def test_example3_h2o_accumulated(score, expected, chunk):
    layer = cache_of([EX3_K], [EX3_V])
    q, q_pos = torch.tensor([[EX3_Q]]), torch.arange(5)[None]
    pol = H2O(chunk=chunk)
    raw = pol.score(q, q_pos, layer, get_score(score), "sum")
    assert "h2o" not in layer.acc  # scoring is pure: the state is written by update_state
    pos = layer.dense()[2]
    pol.update_state(layer, raw, pos)
    s = pol.protect(raw, pos, q_pos, torch.tensor([2]))
    expected = torch.tensor(expected)
    torch.testing.assert_close(layer.acc_dense("h2o")[0, 0], expected, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(s[0, 0, :4], expected[:4], atol=2e-4, rtol=1e-3)
    assert s[0, 0, 4] == INF  # recent window: half of n_kept = 2 -> the last token


def test_example3_h2o_normalize_visible():
    layer = cache_of([EX3_K], [EX3_V])
    q, q_pos = torch.tensor([[EX3_Q]]), torch.arange(5)[None]
    pol = H2O(normalize="visible")
    s = pol.protect(
        pol.score(q, q_pos, layer, get_score("attn"), "sum"), layer.dense()[2], q_pos, torch.tensor([2])
    )
    visible = torch.tensor([0.4871, 0.3909, 0.1029, 0.2272, 0.2377])
    torch.testing.assert_close(s[0, 0], visible, atol=2e-4, rtol=1e-3)  # no recent window
    for normalize, expected in [("visible", [0, 1]), ("none", [0, 4])]:  # n_kept = int(5 * 0.6) = 2
        layer = cache_of([EX3_K], [EX3_V])
        Press(H2O(normalize=normalize), compression_ratio=0.6).start().compress_layer(0, q, q_pos, layer)
        assert layer_positions(layer) == [expected]


# ================================================================ (b) every press on the tiny model
N_PROMPT, N_NEW, BUDGET = 150, 5, 100


def protected(name: str, n: int, n_kept: int) -> set[int]:
    """Positions the policy promises to keep after prefill."""
    if "snapkv" in name:
        return set(range(n - 64, n))
    if "tova" in name:
        return {n - 1}
    if "h2o" in name:
        return set(range(n - n_kept // 2, n))
    if "streamingllm" in name:
        return {0, 1, 2, 3}
    return set()


@pytest.mark.parametrize("budget", [None, BUDGET], ids=["ratio0.5", "budget"])
def test_every_press_runs_and_keeps_its_budget(model, budget):
    prompt = tokens(N_PROMPT, seed=1)
    cfg = model.cfg
    n_kept = BUDGET if budget else int(N_PROMPT * 0.5)
    for name in base_press_names():  # layer budgets and LAQ: tests/test_layer_budgets.py, test_laq.py
        press = make_press(name, compression_ratio=None if budget else 0.5, budget=budget)
        cache = model.new_cache()
        it = stream(model, [prompt], press=press, cache=cache, max_new_tokens=N_NEW)
        out = [next(it)]  # prefill done, first token sampled, nothing decoded yet
        for layer in cache.layers:
            lengths = layer.length
            if name.startswith("adakv"):
                assert sum(lengths) == cfg.n_kv_heads * n_kept, name
                assert min(lengths) >= int(n_kept * 0.2), name
            else:
                assert lengths == [n_kept] * cfg.n_kv_heads, name
            for kept in layer_positions(layer):
                assert protected(name, N_PROMPT, n_kept) <= set(kept), name
                if name == "streamingllm":
                    assert kept == [0, 1, 2, 3] + list(range(N_PROMPT - n_kept + 4, N_PROMPT))
        out += list(it)
        assert len(out) == N_NEW and all(0 <= int(t) < cfg.vocab_size for t in out)
        for layer in cache.layers:
            if press.decode_evicts:
                assert sum(layer.length) <= cfg.n_kv_heads * budget, name
            else:  # prefill-only presses: the 4 decoded tokens were appended to every head
                assert all(p[-4:] == list(range(N_PROMPT, N_PROMPT + 4)) for p in layer_positions(layer))


# ================================================================ (c) a budget >= the prompt changes nothing
def test_budget_at_least_prompt_equals_no_press(model):
    prompt, n_new = tokens(80, seed=2), 5
    ref = list(generate(model, prompt, max_new_tokens=n_new))
    ref_cache = model.new_cache()
    list(stream(model, [prompt], cache=ref_cache, max_new_tokens=n_new))
    for name in base_press_names():  # (a layer budget gives some layers less than the budget)
        # decode-time presses evict once a head exceeds the budget: leave room for the decoded tokens
        budget = len(prompt) + (n_new - 1 if make_press(name, budget=1).decode_evicts else 0)
        for kw in ({"budget": budget}, {"compression_ratio": 0.0}):
            press = make_press(name, **kw)
            cache = model.new_cache()
            got = [int(t[0]) for t in stream(model, [prompt], press=press, cache=cache, max_new_tokens=n_new)]
            assert got == ref, (name, kw)
            for a, b in zip(cache.layers, ref_cache.layers, strict=True):
                assert all(torch.equal(x, y) for x, y in zip(a.dense(), b.dense(), strict=True)), (name, kw)


# ================================================================ (d) decode-time eviction
def weights64(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Causal softmax(q k^T / sqrt(d)) in float64, one query at a time.

    q: (Hg, T, D) with positions q_pos (T,); k: (S, D) with positions k_pos (S,). Returns (Hg, T, S).
    """
    Hg, T, D = q.shape
    out = torch.zeros(Hg, T, k.shape[0], dtype=torch.float64)
    for h in range(Hg):
        for t in range(T):
            vis = (k_pos >= 0) & (k_pos <= q_pos[t])
            z = (k.double() @ q[h, t].double()) / math.sqrt(D)
            out[h, t, vis] = torch.softmax(z[vis], 0)
    return out


class Reference:
    """Float64 reference scores for H2O (accumulated attention, summed over the group) and TOVA (the
    current query's attention, averaged over all heads), per layer and KV head, keyed by position."""

    def __init__(self, policy: str, cfg) -> None:  # noqa: ANN001
        self.policy, self.G, self.H = policy, cfg.group_size, cfg.n_kv_heads
        self.s: dict[tuple[int, int], dict[int, float]] = {}

    def update(self, idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
        per_head = []
        for h in range(self.H):
            k, _, pos = layer.segment(h)
            w = weights64(q[0, h * self.G : (h + 1) * self.G], k, q_pos[0], pos)
            per_head.append((pos.tolist(), w))
        for h, (pos, w) in enumerate(per_head):
            if self.policy == "h2o":
                acc = self.s.setdefault((idx, h), {})
                for p, x in zip(pos, w.sum((0, 1)).tolist(), strict=True):
                    acc[p] = acc.get(p, 0.0) + x
            else:  # tova: last query, mean over all query heads (every KV head holds the same positions)
                assert pos == per_head[0][0]
                mean = sum(w_[:, -1].sum(0) for _, w_ in per_head) / (self.H * self.G)
                self.s[(idx, h)] = dict(zip(pos, mean.tolist(), strict=True))

    def check_eviction(self, idx: int, layer: LayerCache, n_kept: int, prot: set[int]) -> None:
        """Kept = n_kept slots of every head, protected ones included, and a top set of the reference."""
        for h, kept in enumerate(layer_positions(layer)):
            s = self.s[(idx, h)]
            assert len(kept) == n_kept and prot <= set(kept)
            evicted = set(s) - set(kept)
            free = [s[p] for p in kept if p not in prot]
            if evicted and free:
                assert max(s[p] for p in evicted) <= min(free) + 1e-5 * max(1.0, min(free))
            for p in evicted:
                del s[p]


@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_decode_eviction_follows_reference(model, policy):
    cfg, budget, n = model.cfg, 40, 60
    prompt, question = tokens(n, seed=3), tokens(3, seed=4)
    press = make_press(policy, budget=budget)
    ref = Reference(policy, cfg)
    seen = [n]

    def prot() -> set[int]:
        r = budget // 2 if policy == "h2o" else 1
        return set(range(seen[0] - r, seen[0]))

    def wrap(observe):  # noqa: ANN001, ANN202
        def obs(idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
            ref.update(idx, q, q_pos, layer)
            observe(idx, q, q_pos, layer)
            ref.check_eviction(idx, layer, budget, prot())

        return obs

    cache, run = model.new_cache(), press.start()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache, observer=wrap(run.prefill_observer()))
        seen[0] += len(question)
        logits = model(torch.tensor([question]), cache, observer=wrap(run.decode_observer()))  # T = 3
        for _ in range(8):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            seen[0] += 1
            logits = model(tok, cache, observer=wrap(run.decode_observer()))
    assert cache.seen.tolist() == [seen[0]]


@pytest.mark.parametrize("name", [n for n in base_press_names() if "h2o" in n or "tova" in n])
def test_decode_eviction_keeps_heads_within_budget(model, name):
    """Uniform: every head <= budget after every step. AdaKV: each head keeps the length AdaKV gave it
    at prefill (presses.py), so the layer total stays <= Hkv x budget while heads stay ragged."""
    cfg, budget = model.cfg, 50
    run = make_press(name, budget=budget).start()
    cache = model.new_cache()
    with torch.inference_mode():
        logits = model(torch.tensor([tokens(90, seed=5)]), cache, observer=run.prefill_observer())
        after_prefill = [list(layer.length) for layer in cache.layers]
        for step in range(6):
            ids = torch.tensor([tokens(2, seed=6)]) if step == 0 else logits[:, -1].argmax(-1, keepdim=True)
            logits = model(ids, cache, observer=run.decode_observer())
            for layer, lengths in zip(cache.layers, after_prefill, strict=True):
                assert sum(layer.length) <= cfg.n_kv_heads * budget
                if name.startswith("adakv"):
                    assert layer.length == lengths  # one token in, one out, per head
                else:
                    assert layer.length == [budget] * cfg.n_kv_heads
                newest = int(cache.seen[0]) - 1
                assert all(p[-1] == newest for p in layer_positions(layer))  # the newest token survives


def test_h2o_never_builds_n_by_n(model, monkeypatch):
    n, chunk = 600, 256
    seen: list[tuple[int, int]] = []

    class Recording(scores.ScoreInputs):
        def __post_init__(self) -> None:
            super().__post_init__()
            seen.append((self.q.shape[2], self.k.shape[2]))

    prompt = torch.tensor([tokens(n, seed=7)])
    kept = {}
    for c in (chunk, 10**6):
        seen.clear()
        monkeypatch.setattr(scores, "ScoreInputs", Recording)
        monkeypatch.setattr(policies, "ScoreInputs", Recording)
        cache = model.new_cache()
        with torch.inference_mode():
            model(
                prompt,
                cache,
                observer=make_press("h2o-obk", compression_ratio=0.5, chunk=c).prefill_observer(),
            )
        monkeypatch.undo()
        kept[c] = cache.kept_positions()
        if c == chunk:
            assert seen and max(w for w, _ in seen) == chunk and max(k for _, k in seen) == n
            assert all(w * k <= chunk * n for w, k in seen)  # O(chunk x n) per step, never n x n
            assert min(k for _, k in seen) < n  # a chunk only scores the keys it can see (causal prefix)
    assert kept[chunk] == kept[10**6]  # chunking is exact


# ================================================================ (e) query-agnostic / query-aware
def test_query_agnostic_question_continues_at_uncompressed_positions(model):
    ctx, question, n_new = tokens(150, seed=8), tokens(6, seed=9), 4
    cache = model.new_cache()
    press = make_press("adakv-snapkv-obk", compression_ratio=0.5)
    out = list(stream(model, [ctx], press=press, questions=[question], cache=cache, max_new_tokens=n_new))
    assert len(out) == n_new
    end = len(ctx) + len(question) + n_new - 1
    assert cache.seen.tolist() == [end]
    full = model.new_cache()
    with torch.inference_mode():
        model(torch.tensor([ctx + question]), full)
    for layer in cache.layers:
        assert sum(sum(p < len(ctx) for p in kept) for kept in layer_positions(layer)) == 2 * 75
        assert all(kept[-(end - len(ctx)) :] == list(range(len(ctx), end)) for kept in layer_positions(layer))
    k_full = full.layers[0].dense()[0][0]  # layer-0 keys depend on token and position only
    for h in range(model.cfg.n_kv_heads):
        k, _, pos = cache.layers[0].segment(h)
        for i in range(len(question)):
            slot = pos.tolist().index(len(ctx) + i)
            torch.testing.assert_close(k[slot], k_full[h, len(ctx) + i], atol=1e-5, rtol=1e-5)


def test_query_aware_prompt_forward_is_uncompressed(model):
    ids = tokens(150, seed=10) + tokens(6, seed=11)
    with torch.inference_mode():
        ref = model(torch.tensor([ids]), model.new_cache())
        got = model(
            torch.tensor([ids]),
            model.new_cache(),
            observer=make_press("snapkv", compression_ratio=0.75).prefill_observer(),
        )
    torch.testing.assert_close(got, ref, atol=0, rtol=0)  # each layer ran on its full cache


@pytest.mark.parametrize("name", ["snapkv", "adakv-snapkv-obk"])
def test_one_compressed_context_serves_several_questions(model, name):
    ctx, n_new = tokens(150, seed=12), 6
    questions = [tokens(n, seed=13 + n) for n in (4, 7, 5)]
    cache = model.new_cache()
    with torch.inference_mode():
        model(torch.tensor([ctx]), cache, observer=make_press(name, compression_ratio=0.5).prefill_observer())
    snap = cache.snapshot()
    compressed = [[x.clone() for x in layer.dense()] for layer in cache.layers]
    for q in questions:
        answer = [int(t[0]) for t in stream(model, [q], cache=cache, max_new_tokens=n_new)]
        cache.truncate_to(*snap)
        for layer, ref in zip(cache.layers, compressed, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(layer.dense(), ref, strict=True))
        fresh = list(
            generate(
                model, ctx, press=make_press(name, compression_ratio=0.5), question=q, max_new_tokens=n_new
            )
        )
        assert answer == fresh


# ================================================================ (f) a left-padded batch
@pytest.mark.parametrize(
    "name, kw",
    [
        ("snapkv", {"compression_ratio": 0.5}),
        ("adakv-snapkv-obkv", {"compression_ratio": 0.5}),
        ("knorm", {"compression_ratio": 0.5}),
        ("tova", {"budget": 130}),
        ("h2o", {"budget": 130}),
        ("adakv-h2o-obk", {"budget": 130}),  # row 1 (120 tokens) is shorter than the budget
    ],
)
def test_padded_batch_equals_rows_alone(model, name, kw):
    prompts, n_new = [tokens(150, seed=20), tokens(120, seed=21)], 6
    cache = model.new_cache(2)
    it = stream(model, prompts, press=make_press(name, **kw), cache=cache, max_new_tokens=n_new)
    steps = [next(it)]
    assert all((layer.pos[: sum(layer.length)] >= 0).all() and layer.n_invalid == 0 for layer in cache.layers)
    steps += list(it)
    for b, prompt in enumerate(prompts):
        alone = model.new_cache()
        toks = [
            int(t[0])
            for t in stream(model, [prompt], press=make_press(name, **kw), cache=alone, max_new_tokens=n_new)
        ]
        assert [int(s[b]) for s in steps] == toks, (name, b)
        for layer, ref in zip(cache.layers, alone.layers, strict=True):
            assert layer_positions(layer, b) == layer_positions(ref), (name, b)


# ================================================================ (g) errors, dtypes
def test_press_errors():
    with pytest.raises(PressError, match="valid presses: .*adakv-snapkv-obk"):
        make_press("snapkv-foo", compression_ratio=0.5)
    with pytest.raises(PressError, match="valid presses"):
        make_press("streamingllm-obk", compression_ratio=0.5)  # streamingllm takes no score
    for kw in ({"compression_ratio": 1.0}, {"compression_ratio": -0.1}, {"budget": 0}, {}):
        with pytest.raises(PressError):
            make_press("snapkv", **kw)
    with pytest.raises(PressError, match="exactly one"):
        make_press("snapkv", compression_ratio=0.5, budget=10)
    with pytest.raises(PressError, match="unknown option"):
        make_press("snapkv", compression_ratio=0.5, windw=8)
    assert make_press("full", compression_ratio=0.5) is FULL and make_press("none") is FULL
    assert issubclass(PressError, ValueError) and issubclass(PressError, ObinferError)


@pytest.mark.parametrize(
    "name, option, match",
    [
        (
            "snapkv",
            {"windw": 8},
            r"unknown option windw for snapkv; its options are: window, kernel, pooling$",
        ),
        ("tova", {"window": 8}, r"its options are: per_head$"),
        ("h2o-obk", {"sinks": 2}, r"its options are: recent, normalize, chunk, fused$"),
        ("adakv-streamingllm", {"recent": 2}, r"its options are: sinks$"),
        ("knorm", {"window": 8}, r"knorm takes no options$"),
        ("random", {"seeds": 1}, r"its options are: seed$"),
    ],
)
def test_unknown_option_lists_the_policy_options(name, option, match):
    with pytest.raises(PressError, match=match):
        make_press(name, compression_ratio=0.5, **option)


@pytest.mark.parametrize(
    "name, option, match",
    [
        ("snapkv", {"window": 0}, r"snapkv option window must be an integer >= 1, got 0$"),
        ("snapkv", {"window": -4}, r"window must be an integer >= 1, got -4"),
        ("snapkv", {"window": 8.0}, r"window must be an integer >= 1, got 8.0 \(float\)"),
        ("snapkv", {"window": "8"}, r"window must be an integer >= 1, got '8' \(str\)"),
        ("snapkv", {"window": True}, r"window must be an integer >= 1, got True \(bool\)"),
        ("snapkv", {"kernel": 0}, r"kernel must be an integer >= 1"),
        ("snapkv", {"kernel": 4}, r"kernel must be odd"),
        ("snapkv", {"pooling": "min"}, r"pooling must be one of avg, max"),
        (
            "tova",
            {"per_head": "yes"},
            r"tova option per_head must be a bool \(true or false\), got 'yes' \(str\)",
        ),
        ("tova", {"per_head": 1}, r"per_head must be a bool"),
        ("h2o", {"recent": -1}, r"h2o option recent must be an integer >= 0 or None, got -1"),
        ("h2o", {"normalize": "mean"}, r"normalize must be one of none, visible"),
        ("h2o", {"chunk": 0}, r"chunk must be an integer >= 1"),
        ("streamingllm", {"sinks": -1}, r"streamingllm option sinks must be an integer >= 0"),
        ("streamingllm", {"sinks": 2.5}, r"sinks must be an integer"),
        ("random", {"seed": "x"}, r"random option seed must be an integer"),
        ("random", {"seed": 2**70}, r"seed must be an integer in"),
    ],
)
def test_bad_option_values_name_the_option_and_type(name, option, match):
    with pytest.raises(PressError, match=match):
        make_press(name, compression_ratio=0.5, **option)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"compression_ratio": 1.0}, r"compression ratio must be a number in \[0, 1\), got 1.0"),
        ({"compression_ratio": float("nan")}, r"compression ratio"),
        ({"compression_ratio": "0.5"}, r"compression ratio .* got '0.5' \(str\)"),
        ({"compression_ratio": True}, r"compression ratio .* \(bool\)"),
        ({"budget": 0}, r"cache budget must be an integer >= 1"),
        ({"budget": 10.5}, r"cache budget must be an integer >= 1 .*got 10.5"),
        ({"budget": "10"}, r"cache budget .* \(str\)"),
        ({"compression_ratio": 0.5, "alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
        ({"compression_ratio": 0.5, "gqa": "mean"}, r"gqa must be one of sum, pre"),
    ],
)
def test_bad_budget_and_allocator_settings(kw, match):
    with pytest.raises(PressError, match=match):
        make_press("adakv-snapkv", **kw)


def test_press_level_checks():
    with pytest.raises(PressError, match="min_safe must be an integer >= 0"):
        Press(SnapKV(), allocator=AdaKV(min_safe=-1), compression_ratio=0.5)
    with pytest.raises(PressError, match="min_safe must be an integer >= 0"):
        make_press("adakv-snapkv", compression_ratio=0.5, min_safe=-1)
    with pytest.raises(PressError, match=r"unknown option alpha for snapkv; its options are: window"):
        make_press("snapkv", compression_ratio=0.5, alpha=0.3)  # the uniform allocator has no alpha
    with pytest.raises(PressError, match="unknown score"):
        Press(SnapKV(), score="foo", compression_ratio=0.5)
    with pytest.raises(PressError, match="unknown allocator"):
        Press(SnapKV(), allocator="greedy", compression_ratio=0.5)
    with pytest.raises(PressError, match="policy must be a Policy"):
        Press("snapkv", compression_ratio=0.5)
    with pytest.raises(PressError, match="full takes no options"):
        make_press("full", window=3)
    with pytest.raises(PressError, match=r"alpha must be a number in \[0, 1\]"):
        allocators.adakv(torch.zeros(1, 2, 4), 2, alpha=-0.1)
    with pytest.raises(PressError, match="compression_ratio"):
        allocators.n_kept_for(10, "0.5")


def test_policy_defaults_are_valid_and_options_are_listed():
    for name, cls in POLICIES.items():
        cls()  # the defaults pass their own checks
        assert all(hasattr(cls(), o) for o in policy_options(name))
    assert policy_options("snapkv") == ["window", "kernel", "pooling"]
    assert policy_options("knorm") == []


# ================================================================ (h) short prompts and observed queries
def whole_prompt_reference(q: Tensor, k: Tensor, kernel: int) -> Tensor:
    """SnapKV scores of a prompt observed whole, float64 loops: key p's attention summed over the group and
    over the queries at or after it, divided by their number (n - p), then avg-pooled with zero padding.

    q: (Hq, n, D), k: (Hkv, n, D) for positions 0..n-1. Returns (Hkv, n).
    """
    Hq, n, _ = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    pos = torch.arange(n)
    raw = torch.zeros(Hkv, n, dtype=torch.float64)
    for h in range(Hkv):
        A = weights64(q[h * G : (h + 1) * G], k[h], pos, pos)  # (G, n, n)
        raw[h] = A.sum((0, 1)) / (n - pos).double()
    out = torch.zeros_like(raw)
    r = kernel // 2
    for p in range(n):
        lo, hi = max(0, p - r), min(n, p + r + 1)
        out[:, p] = raw[:, lo:hi].sum(-1) / kernel
    return out


@pytest.mark.parametrize("n", [2, 7, 16])
def test_snapkv_prompt_within_window_is_observed_whole(n):
    g = torch.Generator().manual_seed(n)
    q, k, v = (
        torch.randn(1, 4, n, 8, generator=g),
        torch.randn(1, 2, n, 8, generator=g),
        torch.randn(1, 2, n, 8),
    )
    cache = KVCache.empty(1, 1, 2, 8)
    cache.layers[0].append(k, v, cache.next_positions(n))
    pol = SnapKV(window=16, kernel=3)
    s = pol.score(q, torch.arange(n)[None], cache.layers[0], get_score("attn"), "sum")
    assert torch.isfinite(s).all()  # nothing protected: the window is the whole prompt
    torch.testing.assert_close(s[0].double(), whole_prompt_reference(q[0], k[0], 3), atol=1e-5, rtol=1e-4)
    assert pol.observed_queries(n) == n and pol.observed_queries(40) == 16
    assert (
        pol.observed_span(n) == (0, n) and pol.observed_span(40) == (24, 40) and pol.queries_needed(40) == 16
    )


def test_snapkv_window_scores_unchanged_for_longer_prompts():
    """One token more than the window: the window is protected and the context scored as before."""
    g = torch.Generator().manual_seed(0)
    n, w = 17, 16
    q, k, v = (
        torch.randn(1, 4, n, 8, generator=g),
        torch.randn(1, 2, n, 8, generator=g),
        torch.randn(1, 2, n, 8),
    )
    cache = KVCache.empty(1, 1, 2, 8)
    cache.layers[0].append(k, v, cache.next_positions(n))
    s = SnapKV(window=w, kernel=1).score(q, torch.arange(n)[None], cache.layers[0], get_score("attn"), "sum")
    ref = get_score("attn")(
        ScoreInputs(q[:, :, -w:], k, v, torch.arange(n - w, n)[None], torch.arange(n).expand(1, 2, n))
    )
    assert (s[..., n - w :] == INF).all()
    torch.testing.assert_close(s[..., : n - w], ref[..., : n - w])


@pytest.mark.parametrize("name", ["snapkv", "adakv-snapkv-obk", "snapkv-obkv"])
@pytest.mark.parametrize("n", [2, 37, 64])
def test_short_prompt_works_and_stats_say_the_window_shrank(model, name, n):
    press, stats, cache = make_press(name, compression_ratio=0.5), GenStats(), model.new_cache()
    it = stream(model, [tokens(n, seed=40 + n)], press=press, stats=stats, cache=cache, max_new_tokens=3)
    run = press.start()
    with torch.inference_mode():
        model(torch.tensor([tokens(n, seed=40 + n)]), model.new_cache(), observer=run.prefill_observer())
    next(it)
    n_kept = max(1, int(n * 0.5))
    for layer in cache.layers:
        assert sum(layer.length) == n_kept * layer.n_kv_heads, (name, n)
        if not name.startswith("adakv"):
            assert layer.length == [n_kept] * layer.n_kv_heads
    assert len(list(it)) == 2
    assert stats.observed_queries == run.observed_queries == n  # the window (64) shrank to the prompt


def test_observed_queries_per_policy(model):
    prompt = tokens(100, seed=41)
    expected = {"snapkv": 64, "tova": 1, "h2o": 100, "streamingllm": 0, "knorm": 0, "random": 0}
    for name, n_obs in expected.items():
        stats = GenStats()
        list(
            generate(
                model, prompt, press=make_press(name, compression_ratio=0.5), stats=stats, max_new_tokens=1
            )
        )
        assert stats.observed_queries == n_obs, name
    stats = GenStats()
    list(
        generate(
            model,
            prompt,
            press=make_press("snapkv", compression_ratio=0.5, window=16),
            stats=stats,
            max_new_tokens=1,
        )
    )
    assert stats.observed_queries == 16
    stats = GenStats()
    list(generate(model, prompt, stats=stats, max_new_tokens=1))
    assert stats.observed_queries is None  # no press


@pytest.mark.parametrize("name", ["snapkv", "adakv-snapkv-obkv"])
def test_padded_batch_with_a_short_row_equals_rows_alone(model, name):
    """Row 1 (30 tokens) is observed whole, row 0 (150) with the usual window, in one padded batch."""
    prompts, n_new = [tokens(150, seed=42), tokens(30, seed=43)], 4
    cache = model.new_cache(2)
    steps = list(
        stream(
            model, prompts, press=make_press(name, compression_ratio=0.5), cache=cache, max_new_tokens=n_new
        )
    )
    for b, prompt in enumerate(prompts):
        alone = model.new_cache()
        toks = [
            int(t[0])
            for t in stream(
                model,
                [prompt],
                press=make_press(name, compression_ratio=0.5),
                cache=alone,
                max_new_tokens=n_new,
            )
        ]
        assert [int(s[b]) for s in steps] == toks, (name, b)
        for layer, ref in zip(cache.layers, alone.layers, strict=True):
            assert layer_positions(layer, b) == layer_positions(ref), (name, b)


@pytest.mark.parametrize("name", ["tova", "h2o-obk", "streamingllm", "knorm", "random", "adakv-tova"])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_every_policy_runs_on_tiny_prompts(model, name, n):
    for kw in ({"compression_ratio": 0.5}, {"budget": 1}):
        out = list(generate(model, tokens(n, seed=44), press=make_press(name, **kw), max_new_tokens=3))
        assert len(out) == 3, (name, n, kw)


@pytest.mark.parametrize("name", ["snapkv-obkv", "adakv-tova-obk", "h2o-obv", "knorm", "streamingllm"])
def test_scores_float32_in_bfloat16(tiny_llama_dir, monkeypatch, name):
    model = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    dtypes = []
    real = allocators._check  # every allocator checks the scores it is given

    def spy(s):  # noqa: ANN001, ANN202
        dtypes.append(s.dtype)
        return real(s)

    monkeypatch.setattr(allocators, "_check", spy)
    out = list(
        generate(model, tokens(100, seed=31), press=make_press(name, compression_ratio=0.5), max_new_tokens=3)
    )
    assert len(out) == 3
    assert dtypes and all(d == torch.float32 for d in dtypes)


# ================================================================ (i) press API: settings vs runs, FULL, registries
def test_press_is_frozen_and_one_press_serves_interleaved_runs(model):
    press = make_press("adakv-h2o-obk", budget=40)
    with pytest.raises(AttributeError):
        press.budget = 10  # frozen settings
    prompts = [tokens(70, seed=50), tokens(55, seed=51)]
    alone = [list(generate(model, p, press=press, max_new_tokens=6)) for p in prompts]
    its = [generate(model, p, press=press, max_new_tokens=6) for p in prompts]
    interleaved: list[list[int]] = [[], []]
    for _ in range(6):  # both runs decode (and evict) at the same time with the same press
        for i, it in enumerate(its):
            interleaved[i].append(next(it))
    assert interleaved == alone


def test_full_is_a_press_that_compresses_nothing(model):
    assert Press.full() is FULL and FULL.is_full and FULL.name == "full" and not FULL.decode_evicts
    run = FULL.start(GenStats())
    assert (
        run.prefill_observer() is None and run.decode_observer() is None and FULL.prefill_observer() is None
    )
    assert FULL.queries_needed(100) == 0 and FULL.observed_span(100) is None
    prompt = tokens(40, seed=52)
    assert list(generate(model, prompt, press=FULL, max_new_tokens=4)) == list(
        generate(model, prompt, max_new_tokens=4)
    )
    with pytest.raises(ObinferError, match="press must be a Press"):
        generate(model, prompt, press=None, max_new_tokens=4)  # no None: FULL is the press for none


def _h2o_layer() -> tuple[LayerCache, Tensor, Tensor]:
    layer = cache_of([EX3_K], [EX3_V])
    return layer, torch.tensor([[EX3_Q]]), torch.arange(5)[None]


def test_h2o_state_is_updated_on_a_memo_hit_and_when_nothing_is_evicted():
    press = Press(H2O(), budget=2)
    ref, q, q_pos = _h2o_layer()
    press.start().compress_layer(0, q, q_pos, ref)
    memo: dict = {}
    for _ in range(2):  # the second run takes its scores from the memo
        layer, _, _ = _h2o_layer()
        run = press.start(memo=memo)
        run.compress_layer(0, q, q_pos, layer)
        assert layer_positions(layer) == layer_positions(ref)
        torch.testing.assert_close(layer.acc_dense("h2o"), ref.acc_dense("h2o"), rtol=0, atol=0)
        assert run.head_budgets == {0: [2]}
    layer, _, _ = _h2o_layer()
    run = Press(H2O(), budget=8).start()  # the budget holds the prompt: nothing evicted ...
    run.compress_layer(0, q, q_pos, layer)
    assert layer_positions(layer) == [[0, 1, 2, 3, 4]] and run.head_budgets == {0: [8]}
    expected = torch.tensor([2.4355, 1.5637, 0.3086, 0.4545, 0.2377])  # ... but the sums are kept (Example 3)
    torch.testing.assert_close(layer.acc_dense("h2o")[0, 0], expected, atol=2e-4, rtol=1e-3)


def test_policy_spans_and_queries_needed():
    n = 100
    assert make_press("snapkv-obk", compression_ratio=0.5).observed_span(n) == (36, 100)
    assert make_press("adakv-tova", compression_ratio=0.5).observed_span(n) == (99, 100)
    assert make_press("h2o", compression_ratio=0.5).observed_span(n) == (0, 100)
    for name in ("streamingllm", "knorm", "random"):
        assert make_press(name, compression_ratio=0.5).observed_span(n) is None
    needed = {name: make_press(name, compression_ratio=0.5).queries_needed(n) for name in POLICIES}
    assert needed == {"snapkv": 64, "tova": 1, "h2o": 100, "streamingllm": 0, "knorm": 0, "random": 0,
                      "trimkv": 0}  # fmt: skip


def test_press_name_grammar_comes_from_the_registries():
    for name in press_names():
        parsed = PressName.parse(name)
        assert str(parsed) == name and tuple(parse_press_name(name)) == tuple(parsed)
        if not parsed.is_full:
            assert make_press(name, compression_ratio=0.5).press_name == parsed
    assert PressName.parse("adakv-snapkv-obk") == PressName("adakv", "snapkv", "obk")
    assert PressName.parse("snapkv") == PressName("uniform", "snapkv", "attn")
    assert PressName.parse("adakv-snapkv-obk").family == "adakv-snapkv"
    assert PressName.parse("full") == PressName() and PressName().is_full
    assert str(PressName.parse("snapkv-attn")) == "snapkv"  # the default score is left out
    allocator, policy, score = PressName.parse("adakv-h2o")
    assert (allocator, policy, score) == ("adakv", "h2o", "attn")
    for bad in (
        "uniform-snapkv",
        "uniform-snapkv-obk",
        "adakv",
        "adakv-full",
        "snapkv-obk-x",
        "snapkv-",
        "none",
    ):
        with pytest.raises(PressError, match="unknown press"):
            PressName.parse(bad)
    # unchecked: names read back from results files, with parts this process has not registered
    assert PressName.parse("snapkv-mine", check=False) == PressName("uniform", "snapkv", "mine")
    assert PressName.parse("greedy-snapkv-obk", check=False) == PressName("greedy", "snapkv", "obk")
    assert PressName.parse("adakv-mine", check=False) == PressName("adakv", "mine", "attn")


@pytest.fixture()
def registered():
    """Register a policy and an allocator for one test, and remove them afterwards."""
    added: list[tuple[dict, str]] = []
    yield added
    for registry, name in added:
        registry.pop(name, None)


def test_one_registered_definition_adds_a_policy_or_an_allocator(model, registered):
    @register_policy
    class Newest(Policy):
        """Newest: keep the most recent tokens (a test policy)."""

        name = "newest"
        uses_score = False

        def score(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
            pos = layer.dense()[2]
            return pos.float().masked_fill(pos < 0, -INF)

    registered.append((POLICIES, "newest"))

    @allocators.register_allocator("first")
    def first_head_order(scores: Tensor, n_kept: Tensor) -> Tensor:
        """Keep each head's top n_kept (a test allocator, the same as uniform)."""
        return allocators.uniform(scores, n_kept)

    registered.append((allocators.ALLOCATORS, "first"))
    names = press_names()
    assert {"newest", "first-newest", "first-snapkv-obk"} <= set(names)
    assert "newest-obk" not in names  # a score-free policy takes no score
    assert dict(describe_presses())["first-newest"] == (
        "Newest: keep the most recent tokens (a test policy). Keep each head's top n_kept (a test allocator, "
        "the same as uniform)."
    )
    prompt = tokens(60, seed=53)
    for name in ("newest", "first-newest"):
        cache = model.new_cache()
        list(
            stream(
                model, [prompt], press=make_press(name, compression_ratio=0.5), cache=cache, max_new_tokens=1
            )
        )
        assert all(p == list(range(30, 60)) for layer in cache.layers for p in layer_positions(layer))
    with pytest.raises(ValueError, match="already registered"):
        register_policy(Newest)
    with pytest.raises(ValueError, match="without '-'"):

        @register_policy
        class Dashed(Policy):
            name = "my-policy"

    with pytest.raises(ValueError, match="shadow"):
        allocators.register_allocator("snapkv")
    with pytest.raises(ValueError, match="already registered"):
        allocators.register_allocator("adakv")
