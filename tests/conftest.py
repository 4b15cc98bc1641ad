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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and far faster when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_tokenizer(model_dir: Path, vocab_size: int = 320) -> None:
    """A byte-level BPE tokenizer (256 bytes + merges + 3 specials) that fits the tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["The quick brown fox jumps over the lazy dog. What is the capital of France? Paris."] * 50
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": CHATML,
                "eos_token": "<|im_end|>",
                "bos_token": None,
                "add_bos_token": False,
                "model_max_length": 512,
            }
        )
    )


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny llama checkpoint plus tokenizer files and a ChatML chat template."""
    import shutil

    out = tmp_path_factory.mktemp("tiny_chat") / "model"
    shutil.copytree(tiny_llama_dir, out)
    write_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct, converted from its GGUF once per test session.

    Reuses ./weights/smollm2-135m-instruct when it already exists (e.g. made by `obinfer generate`).
    """
    from obinfer.catalog import DEFAULT_MODEL, ensure_model
    from obinfer.storage import default_weights_dir

    existing = default_weights_dir() / DEFAULT_MODEL
    if (existing / "model.safetensors").is_file():
        return existing
    return ensure_model(DEFAULT_MODEL, tmp_path_factory.mktemp("weights"))


@pytest.fixture(autouse=True, scope="session")
def trimkv_gates_for_any_model(tmp_path_factory):
    """`trimkv` with no gates file takes the shipped gates of the loaded model and budget; the tiny test
    models have none. For the tests that run every press, stand in random gates made on first use for
    each (model, budget) that has no shipped gates (the default model at budget 128 keeps its real ones;
    tests/test_trimkv.py checks the real lookup with `find_gates` itself)."""
    from obinfer.cache import retention
    from obinfer.weights import weights_digest

    root = tmp_path_factory.mktemp("gates")
    made: dict = {}

    real_lookup = retention.find_gates

    def fake_lookup(model, budget):  # noqa: ANN001, ANN202
        try:
            return real_lookup(model, budget)
        except retention.GatesError:
            pass
        key = (weights_digest(model), budget)
        if key not in made:
            torch.manual_seed(len(made))
            g = retention.RetentionGates.for_model(model, width=4, init_bias=2.0)
            with torch.no_grad():
                g.w2.normal_(0, 1.0)
            meta = {"model": "test", "weights_digest": key[0]}
            if budget is not None:
                meta["budget"] = budget
            made[key] = g.save(root / f"{len(made)}.safetensors", meta)
        return made[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(retention, "find_gates", fake_lookup)
    yield
    mp.undo()
