"""TRIM-KV (issue 15): retention gates, the `trimkv` policy, gates files and their training.

Checked: the decayed-retention bookkeeping over a long generation equals a slow by-hand reference (its
own attention, its own per-head lists, its own eviction), tokens included; a gate with one constant beta
keeps exactly the most recent M tokens; no head ever holds more than M after a step; a padded batch
equals its rows; Fanout equals the press's own prefill; one chunk covering the prompt is the one-shot
prefill; gates round-trip through their file; files for another model or budget, missing or malformed
ones are refused with one line; the gated training forward is the model when beta = 1; a few training
steps lower the loss; an interrupted training resumes to the same gates.
"""

from __future__ import annotations

import math

import pytest
import torch

from obinfer.cache.fanout import Fanout
from obinfer.cache.presses import PressError, make_press, press_names
from obinfer.cache.retention import GatesError, RetentionGates, find_gates, weights_digest
from obinfer.generate import GenStats, stream
from obinfer.models.llama import apply_rope, rope_cos_sin
from obinfer.training import (
    TrainConfig,
    TrainingError,
    gated_forward,
    gates_loss,
    make_sequences,
    train_gates,
)
from obinfer.weights import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
M = 8


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def random_gates(model, seed: int = 0, bias: float = 2.0) -> RetentionGates:  # noqa: ANN001
    torch.manual_seed(seed)
    g = RetentionGates.for_model(model, width=8, init_bias=bias)
    with torch.no_grad():
        g.w2.normal_(0, 1.0)  # tokens differ: a real ranking
    return g


def save(g: RetentionGates, model, path, budget: int = M):  # noqa: ANN001, ANN201
    g.save(path, {"model": "tiny", "weights_digest": weights_digest(model), "budget": budget})
    return str(path)


def run_stream(model, prompts, press, n_new, check=None):  # noqa: ANN001, ANN201
    """Greedy tokens (n_new, B) and the cache; check(cache) after every step."""
    cache = model.new_cache(len(prompts))
    out = []
    for tok in stream(model, prompts, max_new_tokens=n_new, press=press, cache=cache, stats=GenStats()):
        out.append(tok.tolist())
        if check is not None:
            check(cache)
    return out, cache


# ------------------------------------------------------------------------------------------ reference
def reference(model, gates: RetentionGates, prompt: list[int], n_new: int, budget: int):  # noqa: ANN001, ANN201
    """A slow TRIM-KV: per (layer, KV head) a Python list of (position, k, v, log beta); attention by hand
    over the list; after each forward, while a head holds more than the budget, the entry of lowest
    (t - i) log beta_i goes (t: the next position; after a decode step the newest entry is kept)."""
    cfg = model.cfg
    H, G, D = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    store = [[[] for _ in range(H)] for _ in range(cfg.n_layers)]

    def forward(ids: list[int], start: int, decode: bool) -> torch.Tensor:
        T = len(ids)
        pos = torch.arange(start, start + T)[None]
        cos, sin = rope_cos_sin(model.inv_freq, pos, torch.float32)
        x = model.model.embed_tokens(torch.tensor([ids]))
        for li, block in enumerate(model.model.layers):
            att = block.self_attn
            h = block.input_layernorm(x)
            q = apply_rope(att.q_proj(h).view(1, T, -1, D).transpose(1, 2), cos, sin)[0]
            k = apply_rope(att.k_proj(h).view(1, T, -1, D).transpose(1, 2), cos, sin)[0]
            v = att.v_proj(h).view(1, T, -1, D).transpose(1, 2)[0]
            lb = gates.log_beta(li, h)[0]  # (H, T)
            y = torch.zeros(cfg.n_heads, T, D)
            for kh in range(H):
                entries = store[li][kh]
                entries += [(start + t, k[kh, t], v[kh, t], float(lb[kh, t])) for t in range(T)]
                for g in range(G):
                    for t in range(T):
                        seen = [e for e in entries if e[0] <= start + t]
                        K = torch.stack([e[1] for e in seen])
                        V = torch.stack([e[2] for e in seen])
                        w = torch.softmax(K @ q[kh * G + g, t] / math.sqrt(D), 0)
                        y[kh * G + g, t] = w @ V
                t_next = start + T
                while len(entries) > budget:
                    cand = [e for e in entries if not (decode and e[0] == t_next - 1)]
                    worst = min(cand, key=lambda e: (t_next - e[0]) * e[3])
                    entries.remove(worst)
            x = x + att.o_proj(y.transpose(0, 1).reshape(1, T, -1))
            x = x + block.mlp(block.post_attention_layernorm(x))
        return model.lm_head(model.model.norm(x))[0, -1]

    toks = []
    with torch.no_grad():
        logits = forward(prompt, 0, decode=False)
        n = len(prompt)
        for step in range(n_new):
            toks.append(int(logits.argmax()))
            if step < n_new - 1:
                logits = forward([toks[-1]], n + step, decode=True)
    kept = [[sorted(e[0] for e in heads) for heads in layer] for layer in store]
    return toks, kept


def test_long_generation_equals_slow_reference(model, tmp_path):
    gates = random_gates(model)
    press = make_press("trimkv", budget=M, gates=save(gates, model, tmp_path / "g.safetensors"))
    prompt = tokens(30, 1)
    sizes = []
    out, cache = run_stream(model, [prompt], press, 40, check=lambda c: sizes.append(max(c.layers[0].length)))
    ref_toks, ref_kept = reference(model, gates, prompt, 40, M)
    assert [t[0] for t in out] == ref_toks
    # the last token was generated but not fed: the cache holds the prompt and the first 39 tokens
    assert [layer[0] for layer in cache.kept_positions()] == ref_kept
    assert max(sizes) == M  # every step ends within the budget


def test_constant_beta_keeps_the_most_recent(model, tmp_path):
    g = RetentionGates.for_model(model, width=4, init_bias=math.log(0.9 / 0.1))  # w2 = 0: beta = 0.9
    press = make_press("trimkv", budget=M, gates=save(g, model, tmp_path / "c.safetensors"))
    prompt = tokens(25, 2)

    def check(cache):  # noqa: ANN001, ANN202
        for layer in cache.layers:
            assert max(layer.length) <= M

    out, cache = run_stream(model, [prompt], press, 12, check=check)
    n = len(prompt) + len(out) - 1  # tokens fed
    for layer in cache.kept_positions():
        for heads in layer:
            assert heads == [list(range(n - M, n))] * model.cfg.n_kv_heads


def test_padded_batch_equals_rows(model, tmp_path):
    press = make_press(
        "trimkv", budget=M, gates=save(random_gates(model, 3), model, tmp_path / "b.safetensors")
    )
    a, b = tokens(22, 4), tokens(15, 5)
    both, cache = run_stream(model, [a, b], press, 10)
    for row, p in enumerate((a, b)):
        alone, c1 = run_stream(model, [p], press, 10)
        assert [t[row] for t in both] == [t[0] for t in alone]
        assert [layer[row] for layer in cache.kept_positions()] == [layer[0] for layer in c1.kept_positions()]


def test_fanout_and_one_chunk_equal_the_own_prefill(model, tmp_path):
    gates = save(random_gates(model, 6), model, tmp_path / "f.safetensors")
    ids = tokens(40, 7)
    for kw in ({"budget": M}, {"compression_ratio": 0.5}):
        press = make_press("trimkv", gates=gates, **kw)
        own = model.new_cache(1)
        press.start(model=model).prefill(model, torch.tensor([ids]), own)
        fan = Fanout(model, ids, [press]).compress(press)
        chunked = model.new_cache(1)
        press.start(model=model).prefill(model, torch.tensor([ids]), chunked, chunk=64)
        assert fan.kept_positions() == own.kept_positions() == chunked.kept_positions()
        n_kept = M if "budget" in kw else 20
        assert all(len(h) == n_kept for layer in own.kept_positions() for h in layer[0])


def test_chunked_prefill_stays_within_budget_plus_chunk(model, tmp_path):
    press = make_press(
        "trimkv", budget=M, gates=save(random_gates(model, 8), model, tmp_path / "k.safetensors")
    )
    run = press.start(model=model)
    cache = model.new_cache(1)
    run.prefill(model, torch.tensor([tokens(50, 9)]), cache, chunk=6)
    assert run.max_slots <= M + 6
    assert all(max(layer.length) == M for layer in cache.layers)


def test_gates_round_trip(model, tmp_path):
    g = random_gates(model, 10)
    path = save(g, model, tmp_path / "r.safetensors", budget=32)
    back = RetentionGates.load(path)
    for (n, p), (_, q) in zip(g.named_parameters(), back.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert back.meta["budget"] == "32" and back.meta["weights_digest"] == weights_digest(model)
    back.check(model, 32)


def test_gates_for_another_model_or_budget_are_refused(model, tiny_qwen_dir, tmp_path):
    path = save(random_gates(model), model, tmp_path / "g.safetensors")
    with pytest.raises(GatesError, match=f"trained for a cache budget of {M} tokens per head, not 16"):
        RetentionGates.load(path).check(model, 16)
    qwen = load_model(tiny_qwen_dir)  # same shapes, other weights
    with pytest.raises(GatesError, match="trained for tiny .* not this model"):
        run_stream(qwen, [tokens(20, 1)], make_press("trimkv", budget=M, gates=path), 2)
    with pytest.raises(GatesError, match="not found"):
        run_stream(model, [tokens(20, 1)], make_press("trimkv", budget=M, gates=str(tmp_path / "no")), 2)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(GatesError, match="not a gates file"):
        RetentionGates.load(bad)
    with pytest.raises(GatesError, match="no trained TRIM-KV gates ship for this model at a budget of 8"):
        find_gates(model, M)
    with pytest.raises(PressError, match="gates must be a file path"):
        make_press("trimkv", budget=M, gates=3)
    assert "trimkv" in press_names()


def test_weights_digest_is_the_same_for_float32_bfloat16_and_int8(tiny_llama_dir, tiny_qwen_dir):
    from obinfer.quantize import quantize_int8

    f32 = weights_digest(load_model(tiny_llama_dir))
    assert weights_digest(load_model(tiny_llama_dir, dtype=torch.bfloat16)) == f32
    assert weights_digest(quantize_int8(load_model(tiny_llama_dir))) == f32
    assert weights_digest(load_model(tiny_qwen_dir)) != f32


def test_gated_forward_is_the_model_when_beta_is_one(model):
    ids = torch.tensor([tokens(24, 11)])
    ref = model(ids, model.new_cache(1)).float()
    plain, _ = gated_forward(model, ids)
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)
    g = RetentionGates.for_model(model, init_bias=60.0)  # log beta = -8.8e-27: no decay at all
    gated, cap = gated_forward(model, ids, g, budget=4)
    torch.testing.assert_close(gated, ref, rtol=1e-5, atol=1e-5)
    # C_t = t + 1 retained tokens: the mean of relu(t + 1 - 4) / 4 over t = 0..23
    assert float(cap.detach()) == pytest.approx(sum(max(t + 1 - 4, 0) for t in range(24)) / 24 / 4, rel=1e-5)


def test_training_lowers_the_loss(model, tmp_path):
    seqs = make_sequences(tokens(64 * 12, 12), 64)
    cfg = TrainConfig(budget=M, steps=24, seq_len=64, lr=3e-2, ckpt_every=100)
    batch = seqs[:1]
    before = gates_loss(model, RetentionGates.for_model(model, cfg.width, cfg.init_bias), batch, cfg)[1][
        "loss"
    ]
    gates, summary = train_gates(model, seqs, cfg, tmp_path / "t.safetensors", valid=seqs[-3:])
    after = gates_loss(model, gates, batch, cfg)[1]["loss"]
    assert after < before
    assert summary["valid_after"]["loss"] < summary["valid_before"]["loss"]
    back = RetentionGates.load(tmp_path / "t.safetensors")
    back.check(model, M)
    assert torch.equal(back.w1, gates.w1.detach())


def test_interrupted_training_resumes_to_the_same_gates(model, tmp_path):
    seqs = make_sequences(tokens(64 * 6, 13), 64)
    cfg = TrainConfig(budget=M, steps=6, seq_len=64, ckpt_every=2)
    whole, _ = train_gates(model, seqs, cfg, tmp_path / "a.safetensors")

    def stop_at_5(step, steps, losses):  # noqa: ANN001, ANN202
        if step == 5:
            raise KeyboardInterrupt

    out = tmp_path / "b.safetensors"
    with pytest.raises(KeyboardInterrupt):
        train_gates(model, seqs, cfg, out, progress=stop_at_5)
    assert not out.exists() and out.with_name(out.name + ".ckpt").exists()
    resumed, summary = train_gates(model, seqs, cfg, out)
    assert summary["resumed_from"] == 4
    assert not out.with_name(out.name + ".ckpt").exists()
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    other = TrainConfig(budget=M, steps=6, seq_len=64, ckpt_every=2, lr=0.5)
    with pytest.raises(KeyboardInterrupt):
        train_gates(model, seqs, cfg, out, progress=stop_at_5)
    with pytest.raises(TrainingError, match="checkpoint of another training"):
        train_gates(model, seqs, other, out)


def test_bad_training_settings(model, tmp_path):
    seqs = make_sequences(tokens(200, 14), 64)
    with pytest.raises(TrainingError, match="longer than the budget"):
        train_gates(model, seqs, TrainConfig(budget=64, seq_len=64), tmp_path / "x.safetensors")
    with pytest.raises(TrainingError, match="steps must be an integer >= 1"):
        train_gates(model, seqs, TrainConfig(budget=M, steps=0, seq_len=64), tmp_path / "x.safetensors")
    with pytest.raises(TrainingError, match="fewer than one sequence"):
        make_sequences([1, 2, 3], 64)
    with pytest.raises(TrainingError, match="is a directory"):
        train_gates(model, seqs, TrainConfig(budget=M, steps=1, seq_len=64), tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(TrainingError, match="is a file, not a directory"):
        train_gates(model, seqs, TrainConfig(budget=M, steps=1, seq_len=64), tmp_path / "f" / "g.safetensors")


def test_training_creates_the_output_directory_and_checkpoints_there(model, tmp_path):
    """--out in a directory that does not exist yet: made before the first step, so the checkpoints
    (every ckpt_every steps) and the gates land there."""
    seqs = make_sequences(tokens(256, 15), 64)
    out = tmp_path / "new" / "dir" / "g.safetensors"
    train_gates(model, seqs, TrainConfig(budget=M, steps=2, seq_len=64, width=4, ckpt_every=1), out)
    assert out.is_file() and RetentionGates.load(out).w1.shape[1] == 4
    assert not out.with_name(out.name + ".ckpt").exists()  # removed once the gates are written


# ------------------------------------------------------------------------------------ the shipped gates
def test_shipped_default_gates_are_found_trained_and_used_by_generate(default_model_dir, capsys):
    """`obinfer generate --press trimkv --cache-budget 128` on the default model takes the gates shipped in
    obinfer/data/gates; they were trained: on held-out essay text their expected retained tokens sit near
    the budget where untrained gates keep nearly everything, while the gated model stays near the frozen
    one; and every head holds at most 128 slots after each step."""
    from obinfer.cache import retention
    from obinfer.cli import main
    from obinfer.eval.haystack import default_essays_dir, load_essays
    from obinfer.tokenizer import load_tokenizer

    model, tok = load_model(default_model_dir), load_tokenizer(default_model_dir)
    path = retention.find_gates(model, 128)  # conftest's stand-in tries the real lookup first
    assert path.parent == retention.SHIPPED_DIR and path.is_file()
    meta = retention.read_meta(path)
    assert meta["weights_digest"] == weights_digest(model) and meta["budget"] == "128"

    load_essays()
    held_out = sorted(default_essays_dir().glob("*.txt"), key=lambda p: p.name)[-1].read_text(
        encoding="utf-8"
    )
    ids = make_sequences(tok.encode(held_out), 512)[:1]
    cfg = TrainConfig(budget=128)
    shipped = retention.load_gates(path)
    with torch.no_grad():
        _, trained = gates_loss(model, shipped, ids, cfg)
        _, init = gates_loss(
            model, RetentionGates.for_model(model, shipped.w1.shape[1], cfg.init_bias), ids, cfg
        )
    assert init["cap"] > 0.5 and trained["cap"] < 0.25 * init["cap"]
    assert trained["kl"] < 0.5 and trained["ntp"] < init["ntp"] + 0.5

    press = make_press("trimkv", budget=128)
    prompt = tok.encode(held_out)[:300]

    def at_most_budget(cache):  # noqa: ANN001, ANN202
        assert max(max(layer.length) for layer in cache.layers) <= 128

    toks, _ = run_stream(model, [prompt], press, 6, check=at_most_budget)
    assert len(toks) == 6
    assert main(["generate", "--model", str(default_model_dir), "--press", "trimkv", "--cache-budget", "128",
                 "--prompt", "Tell me about the sea.", "--max-new-tokens", "4"]) in (0, None)  # fmt: skip
    assert capsys.readouterr().out.strip()
