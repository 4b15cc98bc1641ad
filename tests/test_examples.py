"""The Python API examples (examples/*.py) run on the tiny model and agree with independent references."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from test_inspect import DOC, with_tokenizer

from obinfer.cache.kv_cache import KVCache
from obinfer.cache.presses import PressName, make_press, press_names
from obinfer.cache.scores import SCORES, ScoreInputs, attn
from obinfer.generate import generate
from obinfer.tokenizer import load_tokenizer
from obinfer.weights import load_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QUESTIONS = ["What is the code?", "Who kept a diary?"]


def _example(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def tok_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    return with_tokenizer(tiny_llama_dir, tmp_path_factory.mktemp("examples") / "tiny", [DOC] * 3)


@pytest.fixture(scope="module")
def loaded(tok_dir):
    return load_model(tok_dir), load_tokenizer(tok_dir)


@pytest.fixture()
def doc_file(tmp_path) -> Path:
    p = tmp_path / "doc.txt"
    p.write_text(DOC)
    return p


@pytest.fixture()
def custom_score():
    """Import examples/custom_score.py (registers "avnorm"), and unregister it afterwards so the rest of
    the suite sees the built-in scores only."""
    assert "avnorm" not in SCORES
    mod = _example("custom_score")
    yield mod
    SCORES.pop("avnorm", None)
    sys.modules.pop("custom_score", None)


@pytest.fixture()
def custom_policy():
    """Import examples/custom_policy.py (registers the policy "sinkwindow" and the allocator "shared"), and
    unregister both afterwards."""
    from obinfer.cache.allocators import ALLOCATORS
    from obinfer.cache.policies import POLICIES

    assert "sinkwindow" not in POLICIES and "shared" not in ALLOCATORS
    mod = _example("custom_policy")
    yield mod
    POLICIES.pop("sinkwindow", None)
    ALLOCATORS.pop("shared", None)
    sys.modules.pop("custom_policy", None)


def _decode(tok, ids) -> str:  # noqa: ANN001
    return tok.decode([t for t in ids if t not in tok.stop_ids], skip_special=True).strip()


@torch.inference_mode()
def test_generate_text_equals_a_no_cache_greedy_loop(tok_dir, loaded, capsys):
    model, tok = loaded
    text = _example("generate_text").main(
        ["--model", str(tok_dir), "--prompt", "The code", "--max-new-tokens", "6"]
    )
    ids = tok.encode_chat([{"role": "user", "content": "The code"}])
    out: list[int] = []
    for _ in range(6):  # reference: recompute the whole sequence from scratch at every step
        nxt = int(model(torch.tensor([ids + out]), model.new_cache())[0, -1].argmax())
        out.append(nxt)
        if nxt in tok.stop_ids:
            break
    assert text == _decode(tok, out)
    assert "prompt tokens" in capsys.readouterr().out


@pytest.mark.parametrize("press", ["snapkv-obk", "adakv-snapkv-obk"])
def test_ask_many_reuses_one_compressed_document(tok_dir, loaded, doc_file, press):
    model, tok = loaded
    argv = [
        "--model",
        str(tok_dir),
        "--context-file",
        str(doc_file),
        "--press",
        press,
        "--max-new-tokens",
        "5",
    ]
    asked = QUESTIONS + QUESTIONS[:1]  # the repeated question must get the same answer
    answers = _example("ask_many_questions").main(argv + [a for q in asked for a in ("--question", q)])
    assert list(answers) == QUESTIONS
    prefix, suffix = tok.chat_parts()
    doc_ids = tok.encode(prefix + DOC)
    for q in QUESTIONS:  # reference: compress the document afresh for every question
        q_ids = tok.encode("\n\n" + q + suffix, add_bos=False)
        fresh = make_press(press, compression_ratio=0.5)
        ref = generate(model, doc_ids, press=fresh, question=q_ids, max_new_tokens=5, stop_ids=tok.stop_ids)
        assert answers[q] == _decode(tok, list(ref)), q


def test_custom_score_matches_a_loop_and_runs_through_presses(custom_score, tok_dir, doc_file):
    assert {"snapkv-avnorm", "adakv-snapkv-avnorm", "h2o-avnorm"} <= set(press_names())
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, W, n, D = 1, 4, 2, 3, 7, 5
    q, k, v = (
        torch.randn(B, Hq, W, D, generator=g),
        torch.randn(B, Hkv, n, D, generator=g),
        torch.randn(B, Hkv, n, D, generator=g),
    )
    q_pos, k_pos = torch.tensor([[4, 5, 6]]), torch.arange(n).expand(B, Hkv, n).clone()
    k_pos[0, 1, 2] = -1  # one invalid slot
    got = custom_score.attention_times_value_norm(ScoreInputs(q, k, v, q_pos, k_pos))
    ref = torch.zeros(B, Hkv, n)
    for h in range(Hq):  # slow reference: per query head, per query, softmax over visible keys
        g_ = h // (Hq // Hkv)
        for i in range(W):
            vis = [p for p in range(n) if 0 <= k_pos[0, g_, p] <= q_pos[0, i]]
            z = torch.stack([q[0, h, i] @ k[0, g_, p] / D**0.5 for p in vis])
            for a, p in zip(z.softmax(0), vis, strict=True):
                ref[0, g_, p] += a * v[0, g_, p].norm()
    ref[0, 1, 2] = float("-inf")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)

    argv = ["--model", str(tok_dir), "--context-file", str(doc_file), "--compression-ratio", "0.5"]
    results = custom_score.main(argv + ["--question", QUESTIONS[0], "--max-new-tokens", "4"])
    assert list(results) == ["snapkv", "snapkv-avnorm", "adakv-snapkv-avnorm"]
    for name, (per_layer, _) in results.items():
        if name.startswith("adakv"):  # heads share the layer's budget: ragged heads, same mean everywhere
            assert any(lo < hi for lo, _, hi in per_layer)
            assert all(mean == per_layer[0][1] for _, mean, _ in per_layer)
        else:
            assert all(lo == hi for lo, _, hi in per_layer)


def test_compare_presses_overlaps_match_real_compression(tok_dir, loaded, doc_file, tmp_path):
    model, tok = loaded
    out = tmp_path / "cmp.png"
    argv = ["--model", str(tok_dir), "--context-file", str(doc_file), "--compression-ratio", "0.5"]
    overlaps = _example("compare_presses").main(
        argv + ["--presses", "snapkv,adakv-snapkv-obk", "--out", str(out)]
    )
    assert out.read_bytes()[:4] == b"\x89PNG"
    ids = tok.encode(DOC)
    kept = []
    with torch.inference_mode():
        for name in ("snapkv", "adakv-snapkv-obk"):
            cache = model.new_cache()
            press = make_press(name, compression_ratio=0.5)
            model(torch.tensor([ids]), cache, observer=press.prefill_observer(), last_only=True)
            kept.append(
                [{(h, p) for h, ps in enumerate(layer[0]) for p in ps} for layer in cache.kept_positions()]
            )
    ref = [len(a & b) / len(a | b) for a, b in zip(*kept, strict=True)]
    assert overlaps == pytest.approx(ref)
    assert all(0 < x <= 1 for x in overlaps)


def test_custom_policy_and_allocator_run_through_presses(custom_policy, tok_dir, loaded, doc_file):
    model, tok = loaded
    names = set(press_names())
    assert {
        "sinkwindow",
        "sinkwindow-obk",
        "adakv-sinkwindow",
        "shared-sinkwindow-obkv",
        "shared-h2o",
    } <= names
    assert PressName.parse("shared-sinkwindow-obk") == PressName("shared", "sinkwindow", "obk")
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        make_press("sinkwindow", compression_ratio=0.5, window=0)

    argv = ["--model", str(tok_dir), "--context-file", str(doc_file), "--compression-ratio", "0.5"]
    results = custom_policy.main(argv + ["--question", QUESTIONS[0], "--max-new-tokens", "4"])
    assert list(results) == list(custom_policy.PRESSES)
    prefix, _ = tok.chat_parts()
    ids = tok.encode(prefix + DOC)  # what main() prefilled
    n_kept = int(len(ids) * 0.5)
    for name, (_, heads) in results.items():
        assert all(len(h) == n_kept for h in heads), name
        if name.startswith("shared-"):  # the allocator gives every KV head the same slots
            assert all(h == heads[0] for h in heads), name
        if "sinkwindow" in name:  # the policy keeps the sinks
            assert all(h[:4] == [0, 1, 2, 3] for h in heads), name
    # reference: the press compressing inside the model's own prefill keeps the same positions
    with torch.inference_mode():
        for name, (_, heads) in results.items():
            cache = model.new_cache()
            press = make_press(name, compression_ratio=0.5)
            model(torch.tensor([ids]), cache, observer=press.prefill_observer(), last_only=True)
            assert cache.kept_positions()[0][0] == heads, name
    # the policy's scores: the last `window` queries' attention, sinks +inf (a direct loop reference)
    pol = custom_policy.SinkWindow(window=3, sinks=1)
    g, n = torch.Generator().manual_seed(0), 7
    q, k, v = (
        torch.randn(1, 4, n, 5, generator=g),
        torch.randn(1, 2, n, 5, generator=g),
        torch.randn(1, 2, n, 5),
    )
    cache = KVCache.empty(1, 1, 2, 5)
    cache.layers[0].append(k, v, cache.next_positions(n))
    s = pol.score(q, torch.arange(n)[None], cache.layers[0], attn, "sum")
    ref = torch.zeros(2, n)
    for h in range(4):
        for i in range(n - 3, n):
            ref[h // 2, : i + 1] += torch.softmax(k[0, h // 2, : i + 1] @ q[0, h, i] / 5**0.5, 0)
    assert s[0, :, 0].eq(float("inf")).all()
    torch.testing.assert_close(s[0, :, 1:], ref[:, 1:], rtol=1e-5, atol=1e-6)
