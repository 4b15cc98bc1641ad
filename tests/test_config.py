"""config.json checks: every bad value is refused with one line naming the key and the file, before any
weight is read; the real layouts (transformers 4.x / 5.x, Llama-3.1 / Qwen-2.5) still load."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import read_config

from obinfer import weights
from obinfer.config import ConfigError, ModelConfig
from obinfer.errors import ObinferError
from obinfer.weights import load_model

LLAMA31_4X = {  # the transformers 4.x layout of Llama-3.1-8B-Instruct's config.json
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}

QWEN25_4X = {  # Qwen2.5-0.5B-Instruct
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def test_real_layouts_load(tiny_llama_dir, tiny_qwen_dir):
    llama = ModelConfig.from_hf(LLAMA31_4X)
    assert (llama.head_dim, llama.group_size, llama.eos_token_id) == (128, 4, [128001, 128008, 128009])
    assert llama.rope_scaling["rope_type"] == "llama3" and llama.rope_theta == 500000.0
    qwen = ModelConfig.from_hf(QWEN25_4X)
    assert (
        qwen.head_dim == 64 and qwen.attention_bias and qwen.tie_word_embeddings and qwen.rope_scaling is None
    )
    for d in (tiny_llama_dir, tiny_qwen_dir):  # transformers 5.x layout (rope_parameters)
        assert ModelConfig.from_hf(d) == ModelConfig.from_hf(d / "config.json")
    assert ModelConfig.from_hf(tiny_llama_dir).rope_scaling["factor"] == 8.0


def _with(base: dict, **patch) -> dict:
    cfg = json.loads(json.dumps(base))
    for k, v in patch.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


_DROP = object()
RS = LLAMA31_4X["rope_scaling"]


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"num_attention_heads": -9}, r"num_attention_heads must be a positive integer, got -9$"),
        ({"hidden_size": "576px"}, r"hidden_size must be a positive integer, got '576px' \(str\)$"),
        ({"hidden_size": 4096.0}, r"hidden_size must be a positive integer, got 4096.0$"),
        ({"num_hidden_layers": True}, r"num_hidden_layers must be a positive integer, got True \(bool\)$"),
        ({"num_hidden_layers": 0}, r"num_hidden_layers must be a positive integer, got 0$"),
        ({"intermediate_size": None}, r"intermediate_size must be a positive integer, got None$"),
        ({"vocab_size": 0}, r"vocab_size must be a positive integer, got 0$"),
        ({"num_key_value_heads": 0}, r"num_key_value_heads must be a positive integer, got 0$"),
        (
            {"num_key_value_heads": 5},
            r"num_attention_heads \(32\) is not a multiple of num_key_value_heads \(5\)",
        ),
        (
            {"num_key_value_heads": 64},
            r"num_attention_heads \(32\) is not a multiple of num_key_value_heads \(64\)",
        ),
        (
            {"num_attention_heads": 30},
            r"hidden_size \(4096\) is not a multiple of num_attention_heads \(30\)",
        ),
        ({"head_dim": -1}, r"head_dim must be a positive integer, got -1$"),
        ({"head_dim": 63}, r"head_dim must be even"),
        ({"max_position_embeddings": -1}, r"max_position_embeddings must be a positive integer"),
        ({"rope_theta": 0}, r"rope_theta must be a positive number, got 0$"),
        ({"rope_theta": -10000.0}, r"rope_theta must be a positive number"),
        ({"rope_theta": "1e4"}, r"rope_theta must be a positive number, got '1e4' \(str\)$"),
        ({"rope_theta": float("nan")}, r"rope_theta must be a positive number"),
        ({"rms_norm_eps": 0.0}, r"rms_norm_eps must be a positive number, got 0.0$"),
        ({"rms_norm_eps": -1e-5}, r"rms_norm_eps must be a positive number"),
        (
            {"tie_word_embeddings": "false"},
            r"tie_word_embeddings must be true or false, got 'false' \(str\)$",
        ),
        ({"attention_bias": 1}, r"attention_bias must be true or false, got 1$"),
        ({"mlp_bias": "no"}, r"mlp_bias must be true or false"),
        ({"bos_token_id": 128256}, r"bos_token_id 128256 is outside the vocabulary \(vocab_size 128256\)$"),
        ({"bos_token_id": -1}, r"bos_token_id -1 is outside the vocabulary"),
        (
            {"bos_token_id": "<s>"},
            r"bos_token_id must be a token id \(an integer or null\), got '<s>' \(str\)$",
        ),
        ({"eos_token_id": [128001, 999999]}, r"eos_token_id 999999 is outside the vocabulary"),
        ({"eos_token_id": [128001, None]}, r"eos_token_id must be a token id \(an integer\), got None$"),
        ({"eos_token_id": "</s>"}, r"eos_token_id must be a token id"),
        (
            {"rope_scaling": {**RS, "rope_type": "yarn"}},
            r"unsupported rope scaling type 'yarn' in rope_scaling",
        ),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"unsupported rope scaling type 'linear'"),
        ({"rope_scaling": {**RS, "factor": 0.5}}, r"rope_scaling.factor must be >= 1, got 0.5$"),
        (
            {"rope_scaling": {**RS, "factor": "8"}},
            r"rope_scaling.factor must be a positive number, got '8' \(str\)",
        ),
        (
            {"rope_scaling": {**RS, "low_freq_factor": 4.0}},
            r"rope_scaling.high_freq_factor \(4.0\) must be greater than low_freq_factor \(4.0\)",
        ),
        (
            {"rope_scaling": {**RS, "original_max_position_embeddings": 0}},
            r"rope_scaling.original_max_position_embeddings must be a positive integer",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            r"rope_scaling of type llama3 is missing key\(s\): low_freq_factor, high_freq_factor, original_max_position_embeddings$",
        ),
        ({"rope_scaling": "llama3"}, r"rope_scaling must be an object or null, got 'llama3' \(str\)$"),
        ({"model_type": "gpt2"}, r"unsupported model_type 'gpt2'; obinfer runs llama, qwen2$"),
        ({"model_type": _DROP}, r"config has no 'model_type' key$"),
        ({"vocab_size": _DROP}, r"config is missing required key\(s\): vocab_size$"),
        ({"hidden_act": "gelu"}, r"unsupported hidden_act 'gelu' \(obinfer implements silu\)$"),
        ({"use_sliding_window": True}, r"use_sliding_window=true is not supported$"),
        ({"use_sliding_window": "false"}, r"use_sliding_window must be true or false"),
        (
            {"layer_types": ["full_attention", "sliding_attention"]},
            r"layer_types sliding_attention not supported",
        ),
    ],
)
def test_each_bad_value_names_its_key(patch, match):
    with pytest.raises(ConfigError, match=r"^config: " + match):
        ModelConfig.from_hf(_with(LLAMA31_4X, **patch))


def test_nulls_mean_defaults():
    cfg = ModelConfig.from_hf(
        _with(QWEN25_4X, num_key_value_heads=None, head_dim=None, bos_token_id=None, eos_token_id=None)
    )
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.bos_token_id, cfg.eos_token_id) == (14, 64, None, [])


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigError, match=r"num_attention_heads must be a positive integer, got -1"):
        ModelConfig.tiny(n_heads=-1)
    with pytest.raises(ConfigError, match=r"rope_scaling of type llama3 is missing"):
        ModelConfig.tiny(rope_scaling={"rope_type": "llama3"})
    with pytest.raises(ConfigError, match=r"eos_token_id 300 is outside the vocabulary"):
        ModelConfig.tiny(eos_token_id=[300])
    assert issubclass(ConfigError, ObinferError)


@pytest.fixture
def bad_dir(tiny_llama_dir, tmp_path, monkeypatch):
    """A copy of the tiny Llama whose weights must never be opened (config errors come first)."""
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)

    def no_read(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a weight file was opened before the config was checked")

    monkeypatch.setattr(weights, "safe_open", no_read)
    return d


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"num_attention_heads": -9}, r"num_attention_heads must be a positive integer, got -9$"),
        ({"hidden_size": "576px"}, r"hidden_size must be a positive integer, got '576px' \(str\)$"),
        (
            {"rope_parameters": {"rope_theta": -1.0, "rope_type": "llama3"}},
            r"rope_parameters.rope_theta must be a positive number",
        ),
        (
            {"rope_parameters": {"rope_theta": 1e4, "rope_type": "longrope"}},
            r"unsupported rope scaling type 'longrope' in rope_parameters",
        ),
    ],
)
def test_load_model_names_the_file_before_reading_weights(bad_dir, patch, match):
    f = bad_dir / "config.json"
    cfg = {**read_config(bad_dir), **patch}
    f.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(f))}: {match}"):
        load_model(bad_dir)


def test_a_valid_config_reaches_the_weights(bad_dir):
    """The guard of `bad_dir` works: with a good config the weights are opened (and fail there)."""
    with pytest.raises(AssertionError, match="weight file was opened"):
        load_model(bad_dir)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"{not json", r"malformed config .*: not valid JSON"),
        (b"", r"malformed config .*: not valid JSON"),
        (b"[1, 2]", r"malformed config .*: expected a JSON object, got list$"),
        (b'"llama"', r"expected a JSON object, got str$"),
        (b'{"model_type": "llama", "x": "\xff\xfe"}', r"malformed config .*: not UTF-8 text"),
    ],
)
def test_unreadable_config_file(bad_dir, content, match):
    (bad_dir / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_model(bad_dir)


def test_config_path_that_is_a_directory_or_missing(bad_dir):
    f = bad_dir / "config.json"
    f.unlink()
    with pytest.raises(ConfigError, match=rf"^config file not found: {re.escape(str(f))}$"):
        load_model(bad_dir)
    f.mkdir()
    with pytest.raises(
        ConfigError, match=rf"^config file {re.escape(str(f))} is a directory, not a JSON file$"
    ):
        load_model(bad_dir)
