"""Sharded checkpoints load like single files; the sampler's top-k / top-p / seed behave as specified."""

from __future__ import annotations

import json

import pytest
import torch

from obinfer.generate import Sampling, sample_next
from obinfer.weights import load_model


@torch.no_grad()
def test_sharded_index_loads_like_the_single_file(tiny_llama_dir, tmp_path):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    ids = torch.randint(3, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    a, b = load_model(tiny_llama_dir), load_model(tmp_path)
    torch.testing.assert_close(a(ids, a.new_cache()), b(ids, b.new_cache()), rtol=0, atol=0)


def test_greedy_is_argmax():
    logits = torch.randn(3, 50)
    assert torch.equal(sample_next(logits, Sampling(), None), logits.argmax(-1))


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 100)
    g = torch.Generator().manual_seed(0)
    for s in (Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=1e-6)):
        assert torch.equal(sample_next(logits, s, g), logits.argmax(-1))


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    g = torch.Generator().manual_seed(1)
    seen_k = {int(sample_next(logits, Sampling(temperature=1.0, top_k=2), g)) for _ in range(300)}
    assert seen_k == {0, 1}
    p = float(probs[:2].sum()) + 1e-3  # the smallest prefix reaching p is the top 3 tokens
    seen_p = {int(sample_next(logits, Sampling(temperature=1.0, top_p=p), g)) for _ in range(600)}
    assert seen_p == {0, 1, 2}


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    s = Sampling(temperature=1.0, seed=5)
    draws = [sample_next(logits.expand(4000, 3), s, s.generator()) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    freq = torch.bincount(draws[0], minlength=3).float() / 4000
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.03, rtol=0)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_scales_logits(temperature):
    logits = torch.tensor([[1.0, 0.0]])
    s = Sampling(temperature=temperature, seed=0)
    draws = sample_next(logits.expand(6000, 2), s, s.generator())
    expected = (logits / temperature).softmax(-1)[0, 1]
    assert abs(draws.float().mean() - expected) < 0.03
