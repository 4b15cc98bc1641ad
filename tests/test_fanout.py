"""`obinfer/cache/fanout.py`: one uncompressed prefill, then compressed forks that equal, bit for bit, the
cache each press produces inside its own prefill (kept positions, slot order, K/V, policy state, the run's
decode budgets), for every policy and allocator; scores are computed once per (policy, score, gqa); only
the queries the presses read are recorded."""

from __future__ import annotations

import pytest
import torch

from obinfer.cache import allocators, policies
from obinfer.cache.fanout import Fanout
from obinfer.cache.kv_cache import KVCache
from obinfer.cache.policies import POLICIES
from obinfer.cache.presses import FULL, make_press
from obinfer.weights import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

N = 150


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def press_grid() -> list[tuple[str, dict]]:
    """Every policy with both allocators at two ratios and a budget, plus option and score variants."""
    out = []
    for policy in POLICIES:
        for prefix in ("", "adakv-"):
            for kw in ({"compression_ratio": 0.5}, {"compression_ratio": 0.25}, {"budget": 100}):
                out.append((prefix + policy, kw))
    out += [
        ("snapkv-obk", {"compression_ratio": 0.5, "window": 16, "pooling": "max", "kernel": 7}),
        ("adakv-snapkv-obkv", {"compression_ratio": 0.5, "min_safe": 1}),
        ("h2o-obv", {"compression_ratio": 0.5, "normalize": "visible"}),
        ("adakv-h2o-obk", {"budget": 60, "recent": 8}),
        ("tova-obk", {"budget": 60, "per_head": True}),
        ("adakv-tova", {"compression_ratio": 0.5, "gqa": "pre"}),
    ]
    return out


def assert_same_cache(a: KVCache, b: KVCache, what: str) -> None:
    """Same segments slot by slot (positions, keys, values, accumulators) and the same counter."""
    assert torch.equal(a.seen, b.seen), what
    for i, (x, y) in enumerate(zip(a.layers, b.layers, strict=True)):
        assert x.length == y.length, (what, i)
        assert set(x.acc) == set(y.acc), (what, i)
        for s in range(x.n_segments):
            for u, v in zip(x.segment(s), y.segment(s), strict=True):
                assert torch.equal(u, v), (what, i, s)
        for name in x.acc:
            assert torch.equal(x.acc_dense(name), y.acc_dense(name)), (what, i, name)


@torch.inference_mode()
def real_prefill(model, ids: list[int], press):  # noqa: ANN001, ANN201
    """Reference: the press compresses inside the model's own prefill."""
    cache, run = model.new_cache(1), press.start(model=model)  # (trimkv reads the model's gates)
    model(torch.tensor([ids]), cache, observer=run.prefill_observer(), last_only=True)
    return cache, run


@torch.inference_mode()
def decode(model, cache: KVCache, run, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    """Feed ids one at a time with the run's decode-time eviction; the logits."""
    return torch.cat([model(torch.tensor([[t]]), cache, observer=run.decode_observer()) for t in ids], 1)


@pytest.mark.parametrize("n", [N, 40], ids=["long", "within-window"])
def test_every_press_equals_its_own_compressed_prefill(model, n):
    ids = tokens(n, seed=n)
    grid = [(name, make_press(name, **kw)) for name, kw in press_grid()]
    fan = Fanout(model, ids, [p for _, p in grid] + [FULL])
    follow = tokens(5, seed=7)
    for name, press in grid:
        run = press.start(model=model)
        got = fan.compress(press, run=run)
        ref, ref_run = real_prefill(model, ids, press)
        what = f"{name} {press.compression_ratio or press.budget}"
        assert_same_cache(got, ref, what)
        assert got.kept_positions() == ref.kept_positions(), what
        assert (run.bytes_before, run.observed_queries, run.head_budgets) == (
            ref_run.bytes_before,
            ref_run.observed_queries,
            ref_run.head_budgets,
        ), what
        if press.decode_evicts:  # the run carries on exactly: decode-time eviction from the fork
            torch.testing.assert_close(decode(model, got, run, follow), decode(model, ref, ref_run, follow))
            assert_same_cache(got, ref, what + " after decoding")
    full = fan.compress(FULL, in_place=True)  # the uncompressed cache itself
    assert full is fan.cache and full.n_tokens() == n * model.cfg.n_layers * model.cfg.n_kv_heads
    with pytest.raises(ValueError, match="in place"):
        fan.compress(grid[0][1])


def test_one_scoring_per_layer_for_every_ratio_budget_and_allocator(model, monkeypatch):
    calls: list[str] = []
    real = policies.SnapKV.score

    def counting(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(repr(self))
        return real(self, *args, **kw)

    monkeypatch.setattr(policies.SnapKV, "score", counting)
    names = ["snapkv-obk", "adakv-snapkv-obk"]
    presses = [make_press(n, compression_ratio=r) for n in names for r in (0.25, 0.5, 0.75)]
    presses += [
        make_press("snapkv-obk", budget=40),
        make_press("snapkv-obk", compression_ratio=0.5, window=16),
    ]
    fan = Fanout(model, tokens(N, seed=1), presses)
    for p in presses:
        fan.compress(p)
    L = model.cfg.n_layers
    assert len(calls) == 2 * L  # window 64 once per layer, window 16 once per layer
    assert len(set(calls)) == 2


def test_h2o_scores_of_sibling_presses_come_from_one_pass(model, monkeypatch):
    """Presses that differ only in the score (h2o, h2o-obk, h2o-obv, adakv-h2o-obk) are scored in one
    chunked pass per layer (`Policy.score_many`), and each cache and ranking equals the press's own
    prefill bit for bit."""
    calls: list[tuple[str, int]] = []
    real_many, real_one = policies.H2O.score_many, policies.H2O.score

    def many(self, q, q_pos, layer, fns, gqa):  # noqa: ANN001, ANN202
        calls.append(("many", len(fns)))
        return real_many(self, q, q_pos, layer, fns, gqa)

    def one(self, *args):  # noqa: ANN001, ANN002, ANN202
        calls.append(("one", 1))
        return real_one(self, *args)

    monkeypatch.setattr(policies.H2O, "score_many", many)
    monkeypatch.setattr(policies.H2O, "score", one)
    presses = [make_press("h2o", compression_ratio=0.5), make_press("h2o-obk", compression_ratio=0.5),
               make_press("h2o-obv", compression_ratio=0.25), make_press("adakv-h2o-obk", compression_ratio=0.5)]  # fmt: skip
    ids = tokens(N, seed=4)
    fan = Fanout(model, ids, presses)
    for press in presses:
        got, scores = fan.compress(press, with_scores=True)
        alone, alone_scores = Fanout(model, ids, [press]).compress(press, with_scores=True)
        ref, _ = real_prefill(model, ids, press)
        assert_same_cache(got, ref, press.name)
        assert torch.equal(scores, alone_scores), press.name
    L = model.cfg.n_layers
    # the shared fanout scored every layer once, for its 3 scores, when it compressed the first press, and
    # never again (its other presses hit the memos); the references (a fanout of one press, the press's
    # own prefill) scored each press alone: 2 x 4 presses x L calls
    assert calls[:L] == [("many", 3)] * L
    assert calls.count(("many", 3)) == L and calls.count(("one", 1)) == 2 * len(presses) * L


def test_only_the_queries_the_presses_read_are_recorded(model):
    ids = tokens(N, seed=2)

    def recorded(*names: str) -> int:
        fan = Fanout(model, ids, [make_press(n, compression_ratio=0.5) for n in names])
        assert all(fan.q[i].shape[2] == fan.n_queries == fan.q_pos[i].shape[1] for i in fan.q)
        return fan.n_queries

    assert recorded("snapkv", "adakv-tova-obk") == 64
    assert recorded("tova", "knorm") == 1  # at least the last query
    assert recorded("streamingllm") == 1 and recorded() == 1
    assert recorded("snapkv", "h2o") == N  # H2O reads every query
    fan = Fanout(model, ids, [make_press("tova", compression_ratio=0.5)])
    with pytest.raises(ValueError, match="only 1 were recorded"):
        fan.compress(make_press("snapkv", compression_ratio=0.5))


def test_scores_are_those_the_press_ranked_by(model):
    ids = tokens(N, seed=3)
    presses = [
        make_press(n, compression_ratio=0.5) for n in ("snapkv-obk", "adakv-h2o", "tova", "streamingllm")
    ]
    fan = Fanout(model, ids, presses)
    n_kept = allocators.n_kept_for(N, 0.5)
    for press in presses:
        cache, scores = fan.compress(press, with_scores=True)
        assert scores.shape == (model.cfg.n_layers, model.cfg.n_kv_heads, N) and scores.dtype == torch.float32
        for i, layer in enumerate(cache.kept_positions()):
            mask = press.allocator(scores[i][None], torch.tensor([n_kept]))
            assert [m.tolist() for m in allocators.keep_indices(mask)[0]] == layer[0], (press.name, i)
        fork = fan.compress(press)  # scores or not, the same cache
        assert fork.kept_positions() == cache.kept_positions()


@pytest.mark.parametrize(
    "names", [("snapkv-obk",), ("snapkv", "snapkv-obk", "adakv-snapkv-obkv", "snapkv-caote")]
)
def test_window_scores_equal_the_press_own_prefill_bit_for_bit(model, names):
    """SnapKV scores its window with the layer's attention outputs (`Policy.reuses_outputs`) in its own
    prefill; the fanout records those outputs in its prefill and hands them over, so the scores are the
    same bit for bit (not only the kept tokens), alone or shared between scores (`score_many`)."""
    from obinfer.cache.fanout import scores_by_position

    ids = tokens(N, seed=5)
    presses = [make_press(n, compression_ratio=0.5, window=16) for n in names]
    fan = Fanout(model, ids, presses)
    assert sorted(fan.outputs) == list(range(model.cfg.n_layers))
    assert all(o.shape[2] == 16 for o in fan.outputs.values())  # only the window's rows are kept
    L, H = model.cfg.n_layers, model.cfg.n_kv_heads
    for press in presses:
        _, scores = fan.compress(press, with_scores=True)
        cache, run = model.new_cache(1), press.start(model=model, keep_scores=True)
        with torch.inference_mode():
            model(torch.tensor([ids]), cache, observer=run.prefill_observer(), last_only=True)
        assert torch.equal(scores, scores_by_position(run.scores, L, H, N)), press.name
    assert Fanout(model, ids, [make_press("tova", compression_ratio=0.5)]).outputs == {}
