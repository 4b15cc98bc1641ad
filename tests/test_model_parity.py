"""Numerical parity of obinfer's decoder with transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from obinfer.weights import load_model


def _hf(model_dir, dtype=torch.float32):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def _ids(n: int, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=g)


@torch.no_grad()
def test_prefill_logits_match_float32(tiny_dir):
    ids = _ids(200)  # positions past original_max_position_embeddings=32
    ref = _hf(tiny_dir)(ids).logits
    model = load_model(tiny_dir)
    out = model(ids, model.new_cache())
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_greedy_20_tokens_match(tiny_dir):
    ids = _ids(40, seed=1)
    hf = _hf(tiny_dir)
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 40:]
    model = load_model(tiny_dir)
    cache = model.new_cache()
    logits = model(ids, cache, last_only=True)
    got = []
    for _ in range(20):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        got.append(int(tok))
        logits = model(tok, cache)
    assert got == ref.tolist()


@torch.no_grad()
def test_bfloat16_close_to_transformers(tiny_dir):
    """bf16 has ~3 significant digits; both implementations round differently. Tolerance: 5e-2 abs
    on logits of magnitude ~1-5 (checked against the fp32 spread), and the same argmax almost everywhere."""
    ids = _ids(64, seed=2)
    ref = _hf(tiny_dir, torch.bfloat16)(ids).logits.float()
    model = load_model(tiny_dir, dtype=torch.bfloat16)
    out = model(ids, model.new_cache()).float()
    assert (out - ref).abs().max() < 5e-2 * max(1.0, ref.abs().max().item())
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree > 0.95


@torch.no_grad()
def test_cached_decoding_equals_full_recompute(tiny_dir):
    model = load_model(tiny_dir)
    ids = _ids(30, seed=3)
    cache = model.new_cache()
    pieces = [model(ids[:, :10], cache), model(ids[:, 10:11], cache), model(ids[:, 11:17], cache)]
    for t in range(17, 30):
        pieces.append(model(ids[:, t : t + 1], cache))
    incremental = torch.cat(pieces, dim=1)
    full = model(ids, model.new_cache())
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padded_batch_equals_rows_alone(tiny_dir):
    model = load_model(tiny_dir)
    a, b = _ids(12, seed=4)[0], _ids(7, seed=5)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    cache = model.new_cache(batch=2)
    out = model(ids, cache, n_pad=torch.tensor([0, 5]))
    step = model(torch.tensor([[5], [6]]), cache)
    for row, seq, n_pad in ((0, a, 0), (1, b, 5)):
        c1 = model.new_cache()
        ref = model(seq[None], c1)
        torch.testing.assert_close(out[row, n_pad:], ref[0], atol=1e-5, rtol=1e-5)
        ref_step = model(torch.tensor([[5 + row]]), c1)
        torch.testing.assert_close(step[row], ref_step[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_load_and_run(tiny_llama_dir, dtype):
    model = load_model(tiny_llama_dir, dtype=dtype)
    assert model.dtype == dtype
    with torch.no_grad():
        out = model(_ids(8), model.new_cache())
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
