"""The embedded model's GGUF import checked against two independent implementations, with nothing compiled.

* transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``: its own dequantization and
  q/k handling) must give the same logits as obinfer running the checkpoint obinfer converted.
* llama.cpp (its tokenizer, its quantized forward pass) is recorded once in
  ``references/llama_cpp_smollm2.json`` by ``references/make_llama_cpp_reference.py`` where llama.cpp
  runs; the tests compare against that file, after checking it was made from this very GGUF (sha256).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from obinfer.assets import sha256_of
from obinfer.catalog import SMOLLM2_GGUF
from obinfer.tokenizer import load_tokenizer
from obinfer.weights import load_model

REFERENCE = Path(__file__).parent / "references" / "llama_cpp_smollm2.json"
PROMPT = "The Eiffel Tower is in Paris, the capital of France. It was built in 1889 for the World's Fair."


@pytest.fixture(scope="module")
def reference() -> dict:
    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    assert ref["gguf_file"] == SMOLLM2_GGUF.file_name
    assert ref["gguf_sha256"] == SMOLLM2_GGUF.sha256 == sha256_of(SMOLLM2_GGUF.fetch()), "another GGUF"
    return ref


@pytest.fixture(scope="module")
def ours(default_model_dir):
    return load_model(default_model_dir), load_tokenizer(default_model_dir)


def _logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]), model.new_cache())[0].double().numpy()


def test_logits_equal_transformers_gguf_loader(ours) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = ours
    gguf = SMOLLM2_GGUF.fetch()
    ref_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].double().numpy()
    got = _logits(model, ids)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)  # measured: identical (0.0)


def test_tokenizer_equals_llama_cpp(reference, ours) -> None:
    _, tok = ours
    corpus = reference["tokenization"]
    assert len(corpus) >= 60
    for text, ids in corpus.items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text, text


def test_config_equals_llama_cpp(reference, default_model_dir) -> None:
    cfg = json.loads((default_model_dir / "config.json").read_text())
    meta = reference["metadata"]
    assert cfg["num_hidden_layers"] == int(meta["llama.block_count"])
    assert cfg["hidden_size"] == int(meta["llama.embedding_length"])
    assert cfg["max_position_embeddings"] == int(meta["llama.context_length"])
    assert cfg["rope_theta"] == float(meta["llama.rope.freq_base"])
    assert cfg["vocab_size"] == reference["n_vocab"]
    tok_cfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == meta["tokenizer.chat_template"]


def test_logits_agree_with_llama_cpp(reference, ours) -> None:
    """obinfer on the float32 conversion vs llama.cpp on the Q4_1 file: same next-token ranking up to
    llama.cpp's quantized activations. Measured without the q/k un-permutation: top-1 agreement 44-69%,
    median correlation 0.63-0.89, logits off by up to 17, so each assertion below catches it."""
    model, tok = ours
    for prompt in reference["prompts"]:
        ids = prompt["ids"]
        assert tok.encode(prompt["text"]) == ids
        got = _logits(model, ids)
        top_ids, top_vals = np.asarray(prompt["top_ids"]), np.asarray(prompt["top_logits"])
        ours_at_theirs = np.take_along_axis(got, top_ids, -1)
        corr = [np.corrcoef(a, b)[0, 1] for a, b in zip(ours_at_theirs, top_vals, strict=True)]
        assert np.median(corr) > 0.95, corr
        assert (got.argmax(-1) == top_ids[:, 0]).mean() >= 0.85
        assert np.abs(ours_at_theirs - top_vals).max() < 2.5  # logits in the same units, not just ranks
