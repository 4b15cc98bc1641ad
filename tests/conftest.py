"""Shared fixtures: tiny random-weight Hugging Face checkpoints saved as safetensors.

transformers is a test-only reference; obinfer itself never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_LLAMA = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    # llama3 scaling with a small original context so both scaled and blended bands are exercised
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    bos_token_id=1,
    eos_token_id=2,
)

TINY_QWEN = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    bos_token_id=None,
    eos_token_id=2,
)


def _save_tiny(kind: str, out: Path, seed: int = 0) -> Path:
    import transformers

    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY_QWEN))
        # random biases (HF initialises them to zero, which would hide a missing bias)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    with torch.no_grad():  # larger weights than HF's 0.02 init, so attention is far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    return _save_tiny("qwen2", tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture(params=["llama", "qwen2"])
def tiny_dir(request, tiny_llama_dir, tiny_qwen_dir) -> Path:
    return tiny_llama_dir if request.param == "llama" else tiny_qwen_dir


def read_config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())
