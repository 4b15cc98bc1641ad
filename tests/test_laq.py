"""Lookahead queries (issue 12, part 2): LAQ and LAQ++ as an observation-query source.

Checked: lookahead=0 is the base press; the lookahead queries are those of a plain greedy decode on the
base-compressed copy (fed at once, another code path); the final cache is the full prompt cache scored
by those queries, against a slow by-hand SnapKV ranking; the pseudo tokens leave no trace (positions,
counter, first token); LAQ++ adds the prompt tail; a padded batch equals its rows; Fanout equals the
press's own prefill; every score and allocator composes; names and errors.
"""

from __future__ import annotations

import pytest
import torch

from obinfer.cache.fanout import Fanout
from obinfer.cache.presses import PressError, PressName, make_press, press_names
from obinfer.generate import GenStats, generate, stream
from obinfer.weights import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
K = 8


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def positions(layer, row: int = 0) -> list[list[int]]:  # noqa: ANN001
    H = layer.n_kv_heads
    return [sorted(layer.segment(row * H + h)[2].tolist()) for h in range(H)]


def prefilled(model, press, ids, **kw):  # noqa: ANN001, ANN201
    run = press.start(model=model, **kw)
    cache = model.new_cache(len(ids))
    with torch.inference_mode():
        logits = run.prefill(model, torch.tensor(ids), cache)
    return run, cache, logits


@pytest.mark.parametrize("name", ["snapkv-obk", "adakv-tova", "pyramid-snapkv-caote"])
def test_lookahead_zero_is_the_base_press(model, name):
    prompt = tokens(140, seed=1)
    outs = []
    for press in (
        make_press(name, compression_ratio=0.6),
        make_press(f"laq-{name}", compression_ratio=0.6, lookahead=0),
    ):
        cache = model.new_cache()
        out = [int(t[0]) for t in stream(model, [prompt], press=press, cache=cache, max_new_tokens=5)]
        outs.append((out, [positions(layer) for layer in cache.layers]))
    assert outs[0] == outs[1]


def test_lookahead_queries_are_a_plain_greedy_decode_on_the_compressed_copy(model):
    prompt = tokens(150, seed=2)
    base = make_press("snapkv-obk", compression_ratio=0.7)
    # the plain greedy decode with the base press: its first K tokens
    greedy = list(generate(model, prompt, press=base, max_new_tokens=K))
    # reference queries: those K tokens fed at once on the base-compressed cache (one forward, causal)
    _, ref_cache, _ = prefilled(model, base, [prompt])
    ref_q: dict[int, torch.Tensor] = {}

    def grab(idx, q, q_pos, layer):  # noqa: ANN001
        ref_q[idx] = (q.clone(), q_pos.clone())

    with torch.inference_mode():
        model(torch.tensor([greedy]), ref_cache, observer=grab)
    # LAQ's own: the source decoding on a compressed copy
    press = make_press("laq-snapkv-obk", compression_ratio=0.7)
    _, copy, logits = prefilled(model, base, [prompt])
    la_q, la_pos = press.source.queries(model, copy, logits)
    assert la_pos.tolist() == [list(range(150, 150 + K))]
    for i in ref_q:
        assert torch.allclose(la_q[i], ref_q[i][0], atol=1e-5), i
        assert torch.equal(la_pos, ref_q[i][1])


def slow_snapkv_keep(q, k, q_pos, n_kept, window=64, kernel=5):  # noqa: ANN001, ANN201
    """By hand: attention of every observer over all n prompt keys (softmax over visible keys), summed over
    observers and the query heads of each KV head, avg-pooled (zero padding), last `window` protected,
    top n_kept per head (ties: lower position)."""
    B, Hq, W, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = []
    for h in range(Hkv):
        s = torch.zeros(n, dtype=torch.float64)
        for g in range(G):
            for i in range(W):
                z = (k[0, h].double() @ q[0, h * G + g, i].double()) / D**0.5
                vis = torch.arange(n) <= q_pos[0, i]
                a = torch.softmax(z.masked_fill(~vis, float("-inf")), -1)
                s += a
        ctx = s[: n - window]
        pad = torch.nn.functional.pad(ctx[None, None], (kernel // 2, kernel // 2))
        pooled = torch.nn.functional.avg_pool1d(pad, kernel, 1)[0, 0]
        ranked = sorted(range(n - window), key=lambda p: (-float(pooled[p]), p))[: n_kept - window]
        out.append(sorted(ranked + list(range(n - window, n))))
    return out


@pytest.mark.parametrize("source", ["laq", "laqpp"])
def test_final_cache_is_the_full_prompt_scored_by_the_lookahead_queries(model, source):
    n, ratio = 160, 0.5
    prompt = tokens(n, seed=3)
    base = make_press("snapkv", compression_ratio=ratio)
    _, copy, logits = prefilled(model, base, [prompt])
    press = make_press(f"{source}-snapkv", compression_ratio=ratio)
    la_q, la_pos = press.source.queries(model, copy, logits)
    # the full prompt cache and its queries, by hand
    full = model.new_cache()
    rec = {}

    def grab(idx, q, q_pos, layer):  # noqa: ANN001
        rec[idx] = (q.clone(), q_pos.clone(), layer.dense()[0].clone())

    with torch.inference_mode():
        model(torch.tensor([prompt]), full, observer=grab)
    run, cache, _ = prefilled(model, press, [prompt])
    tail = 8 if source == "laqpp" else 0
    assert run.observed_queries == K + tail
    for i, layer in enumerate(cache.layers):
        q_prompt, pos_prompt, k = rec[i]
        q = torch.cat([q_prompt[:, :, n - tail :], la_q[i]], 2)
        q_pos = torch.cat([pos_prompt[:, n - tail :], la_pos], 1)
        assert positions(layer) == slow_snapkv_keep(q, k, q_pos, int(n * (1 - ratio))), i


def test_pseudo_tokens_leave_no_trace(model):
    prompt = tokens(130, seed=4)
    full_first = next(generate(model, prompt, max_new_tokens=1))
    press = make_press("laq-adakv-snapkv-obkv", compression_ratio=0.5)
    run, cache, logits = prefilled(model, press, [prompt])
    assert cache.seen.tolist() == [130]  # the counter: the prompt alone
    for layer in cache.layers:
        assert all(p and max(p) < 130 for p in positions(layer))
        assert sum(layer.length) == 2 * 65
    assert int(logits.argmax(-1)) == full_first  # decoding starts from the prefill's own logits
    assert run.lookahead_s > 0
    full = model.new_cache()
    with torch.inference_mode():
        model(torch.tensor([prompt]), full)
    assert (
        run.peak_bytes > full.nbytes() + cache.nbytes()
    )  # the full cache + the compressed copy (+ k tokens)
    # and generation continues at position 130
    stats = GenStats()
    out = list(generate(model, prompt, press=press, max_new_tokens=4, stats=stats))
    assert out[0] == full_first and stats.observed_queries == K


@pytest.mark.parametrize("name", ["laq-snapkv-obk", "laqpp-adakv-tova-obv", "laq-pyramid-adakv-snapkv-obkv"])
def test_fanout_equals_its_own_prefill(model, name):
    prompt = tokens(150, seed=5)
    press = make_press(name, compression_ratio=0.6)
    own = prefilled(model, press, [prompt])[1]
    fan = Fanout(model, prompt, [press, make_press("snapkv", compression_ratio=0.6)])
    shared = fan.compress(press)
    assert [positions(a) for a in own.layers] == [positions(b) for b in shared.layers]
    cache, scores = fan.compress(press, with_scores=True)
    assert scores.shape == (2, 2, 150)


def test_a_padded_batch_equals_its_rows(model):
    rows = [tokens(150, seed=6), tokens(100, seed=7)]
    press = make_press("laq-snapkv-obk", compression_ratio=0.5)
    cache = model.new_cache(2)
    batch = [t.tolist() for t in stream(model, rows, press=press, cache=cache, max_new_tokens=4)]
    for r, row in enumerate(rows):
        alone = model.new_cache()
        out = [int(t[0]) for t in stream(model, [row], press=press, cache=alone, max_new_tokens=4)]
        assert out == [b[r] for b in batch]
        assert [positions(a) for a in alone.layers] == [positions(b, r) for b in cache.layers]


def test_every_score_composes_and_nothing_to_evict_skips_the_lookahead(model):
    prompt = tokens(120, seed=8)
    for name in [n for n in press_names() if n.startswith(("laq-", "laqpp-")) and "epi" not in n]:
        press = make_press(name, compression_ratio=0.5)
        run, cache, _ = prefilled(model, press, [prompt])
        kept = [sum(layer.length) for layer in cache.layers]
        if "pyramid" in name:
            assert sum(kept) == 2 * 2 * 60, name
        else:
            assert kept == [2 * 60] * 2, name
        if "pyramid" in name:
            continue  # (a pyramid gives its last layer less than the mean budget)
        run, cache, _ = prefilled(model, make_press(name, budget=500), [prompt])
        assert run.lookahead_s == 0 and all(layer.length == [120, 120] for layer in cache.layers)


def test_names_and_errors(model):
    names = set(press_names())
    assert {
        "laq-snapkv-obk",
        "laqpp-snapkv",
        "laq-adakv-snapkv-obkv",
        "laq-tova-caote",
        "laq-pyramid-snapkv-obk",
    } <= names
    assert not any(n.startswith("laq-") and ("h2o" in n or "knorm" in n) for n in names)
    p = PressName.parse("laq-snapkv-obk")
    assert p.source == "laq" and p.base == "snapkv-obk" and str(p) == "laq-snapkv-obk"
    for bad in ("laq-h2o", "laq-knorm", "prompt-snapkv", "laq-laq-snapkv", "pyramid-laq-snapkv"):
        with pytest.raises(PressError, match="unknown press"):
            PressName.parse(bad)
    with pytest.raises(PressError, match="lookahead must be an integer >= 0"):
        make_press("laq-snapkv", compression_ratio=0.5, lookahead=-1)
    press = make_press("laq-snapkv", compression_ratio=0.5)
    with pytest.raises(PressError, match="compresses after the prefill"):
        press.start().prefill_observer()
    assert press.queries_needed(200) == 64 and make_press("laqpp-tova", budget=4).queries_needed(200) == 8


def test_the_report_compares_each_new_method_with_its_base_press():
    """`obinfer report`: laq-/pyramid- presses against the press without the prefix (PressName.base),
    and their OBCache scores against their attn family as before."""
    from obinfer.eval import report

    rows = []
    scores = {"snapkv-obk": 0.0, "laq-snapkv-obk": 1.0, "pyramid-snapkv-obk": 1.0, "laq-snapkv": 0.0}
    for press, s in scores.items():
        for i in range(6):
            rows.append(
                {
                    "task": "vt",
                    "index": i,
                    "length": 10,
                    "press": press,
                    "ratio": 0.5,
                    "mode": "aware",
                    "score": s,
                }
            )
    pairs = {(c["variant"], c["baseline"]): c for c in report.compare_variants(rows, n_boot=200)}
    assert set(pairs) == {
        ("laq-snapkv-obk", "laq-snapkv"),
        ("laq-snapkv-obk", "snapkv-obk"),
        ("pyramid-snapkv-obk", "snapkv-obk"),
    }
    assert pairs["laq-snapkv-obk", "snapkv-obk"]["verdict"] == "better"
