"""Tests for obinfer.gguf_import: GGUF -> Hugging Face checkpoint conversion.

A tiny GGUF is written with ``gguf.GGUFWriter`` from known Hugging Face-layout weights (q/k rows permuted
the way llama.cpp's converter does it, some tensors quantized to Q8_0 or stored as F16), converted, and
compared with the weights it was built from. References: the original weights, an explicit-loop
permutation, tiktoken (for the byte-level BPE), transformers (loading, and logits with Llama-3.1 RoPE
scaling imported from a ``rope_freqs`` tensor written the way llama.cpp's converter writes it), torch's
casts (bfloat16 / float16 conversions). The real embedded model is
checked against llama.cpp and transformers' GGUF loader in test_gguf_reference.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import tiktoken
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from tokenizers import Tokenizer

from obinfer import gguf_import
from obinfer.gguf_import import (
    CHATML_TEMPLATE,
    GGUFImportError,
    convert_gguf,
    unpermute_rows,
)
from obinfer.storage import OutputExistsError

Q8_0 = gguf.GGMLQuantizationType.Q8_0
HIDDEN, N_LAYERS, N_HEAD, N_KV, HEAD_DIM, FFN, CTX = 64, 2, 4, 2, 16, 128, 256
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"),
          ("l", "d"), ("Ġwor", "ld"), ("Ġ", "Ġ"), ("1", "2"), ("Ġ", "t"), ("Ġt", "he")]  # fmt: skip
# SmolLM's pre-tokenizer ("smollm", as StarCoder) as one tiktoken pattern: single digits first.
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
CORPUS = ["hello world", "Hello World!", "12345 apples", "x=12;y=3.5", "the  hello\n\nworld\t",
          "<|im_start|>user\nhello<|im_end|>", "naïve café 😀", "  leading and trailing  ", "a  1 22 333",
          "don't we'll", "héllo wörld 2024"]  # fmt: skip


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiny_vocab() -> list[str]:
    """3 control tokens, the 256 byte tokens (byte order), then one token per merge (merge order)."""
    b2u = byte_to_unicode()
    return CONTROL + [b2u[b] for b in range(256)] + [a + b for a, b in MERGES]


def permute_loop(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order, written as an explicit loop: per head, GGUF row 2i+j = HF row j*d/2+i."""
    out = np.empty_like(w)
    d = w.shape[0] // n_heads
    for h in range(n_heads):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = w[h * d + j * (d // 2) + i]
    return out


def hf_weights(arch: str, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random Hugging Face-layout weights for the tiny model (biases for qwen2)."""
    rng = np.random.default_rng(seed)
    vocab = len(tiny_vocab())
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                   p + "self_attn.q_proj.weight": (N_HEAD * HEAD_DIM, HIDDEN),
                   p + "self_attn.k_proj.weight": (N_KV * HEAD_DIM, HIDDEN),
                   p + "self_attn.v_proj.weight": (N_KV * HEAD_DIM, HIDDEN),
                   p + "self_attn.o_proj.weight": (HIDDEN, N_HEAD * HEAD_DIM),
                   p + "mlp.gate_proj.weight": (FFN, HIDDEN), p + "mlp.up_proj.weight": (FFN, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, FFN)}  # fmt: skip
        if arch == "qwen2":
            for proj, n in (("q", N_HEAD), ("k", N_KV), ("v", N_KV)):
                shapes[p + f"self_attn.{proj}_proj.bias"] = (n * HEAD_DIM,)
    return {k: (rng.standard_normal(s) * 0.05).astype(np.float32) for k, s in shapes.items()}


GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}  # fmt: skip


def gguf_name(hf: str) -> str:
    stem, suffix = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, rest = stem.split(".", 3)
        return f"blk.{layer}.{GGUF_NAMES[rest]}.{suffix}"
    return f"{GGUF_NAMES[stem]}.{suffix}"


def storage_type(hf: str) -> str:
    """Mix of storage types: Q8_0 for embeddings, MLP and layer-0 q / layer-1 k; F16 for v; else F32."""
    if hf.endswith("bias") or hf.endswith("norm.weight"):
        return "F32"
    if "embed" in hf or "mlp" in hf or "layers.0.self_attn.q" in hf or "layers.1.self_attn.k" in hf:
        return "Q8_0"
    return "F16" if "v_proj" in hf else "F32"


def expected_after_storage(w: np.ndarray, kind: str) -> np.ndarray:
    """What an exact converter must recover from a tensor stored as ``kind`` (lossy for Q8_0/F16)."""
    if kind == "Q8_0":  # row-wise blocks: commutes with the q/k row permutation
        return gguf.quants.dequantize(gguf.quants.quantize(w, Q8_0), Q8_0)
    if kind == "F16":
        return w.astype(np.float16).astype(np.float32)
    return w


def write_tiny_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    arch: str = "llama",
    rope_freqs: np.ndarray | None = None,
    ctx: int = CTX,
) -> Path:
    """Write the tiny model as llama.cpp would: q/k rows permuted for llama, chosen storage types, and
    a ``rope_freqs.weight`` tensor if given (Llama-3.1-style RoPE scaling)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(N_LAYERS)
    w.add_context_length(ctx)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(HEAD_DIM)
    tokens = tiny_vocab()
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm" if arch == "llama" else "qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL)))
    w.add_token_merges([f"{a} {b}" for a, b in MERGES])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    for hf, arr in weights.items():
        if arch == "llama" and ("q_proj" in hf or "k_proj" in hf):
            arr = permute_loop(arr, N_HEAD if "q_proj" in hf else N_KV)
        kind = storage_type(hf)
        if kind == "Q8_0":
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(arr, Q8_0), raw_dtype=Q8_0)
        else:
            w.add_tensor(gguf_name(hf), arr.astype(np.float16 if kind == "F16" else np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    """Converted tiny checkpoints: llama untied, llama tied, qwen2 untied -> (out_dir, HF weights)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for key, arch, tied in (
        ("llama", "llama", False),
        ("llama_tied", "llama", True),
        ("qwen2", "qwen2", False),
    ):
        weights = hf_weights(arch, tied)
        src = write_tiny_gguf(root / f"{key}.gguf", weights, arch)
        out[key] = (convert_gguf(src, root / key), weights)
    return out


# ----------------------------------------------------------------------------------------------------
# Weights and config
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_heads, d", [(4, 16), (3, 8), (1, 2)])
def test_unpermute_rows_inverts_llama_cpp_permutation(n_heads: int, d: int) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((n_heads * d, 5)).astype(np.float32)
    assert not np.array_equal(permute_loop(w, n_heads), w) or d == 2
    np.testing.assert_array_equal(unpermute_rows(permute_loop(w, n_heads), n_heads), w)
    b = w[:, 0].copy()  # biases are permuted the same way
    np.testing.assert_array_equal(unpermute_rows(permute_loop(b, n_heads), n_heads), b)


@pytest.mark.parametrize("key", ["llama", "llama_tied", "qwen2"])
def test_safetensors_equal_original_hf_weights(tiny, key: str) -> None:
    out_dir, weights = tiny[key]
    got = load_file(out_dir / "model.safetensors")
    assert set(got) == set(weights)
    for name, w in weights.items():
        assert got[name].dtype == np.float32 and got[name].shape == w.shape, name
        np.testing.assert_array_equal(got[name], expected_after_storage(w, storage_type(name)), err_msg=name)
        np.testing.assert_allclose(got[name], w, atol=0.01, err_msg=name)  # quantization error only


def test_tiny_fixture_really_permutes_and_quantizes(tiny) -> None:
    """Guard against a vacuous test: the stored q/k differ from HF order and Q8_0 is really lossy."""
    _, weights = tiny["llama"]
    q = weights["model.layers.1.self_attn.q_proj.weight"]
    assert np.abs(permute_loop(q, N_HEAD) - q).max() > 0.01
    e = weights["model.embed_tokens.weight"]
    assert not np.array_equal(expected_after_storage(e, "Q8_0"), e)


@pytest.mark.parametrize("key, tied", [("llama", False), ("llama_tied", True), ("qwen2", False)])
def test_config_json(tiny, key: str, tied: bool) -> None:
    cfg = json.loads((tiny[key][0] / "config.json").read_text())
    assert cfg["model_type"] == key.split("_")[0]
    assert cfg["architectures"] == ["LlamaForCausalLM" if key.startswith("llama") else "Qwen2ForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (HIDDEN, FFN, N_LAYERS)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        N_HEAD,
        N_KV,
        HEAD_DIM,
    )
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 50000.0 and cfg["rope_scaling"] is None
    assert cfg["max_position_embeddings"] == CTX and cfg["vocab_size"] == len(tiny_vocab())
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["torch_dtype"]) == (1, 2, "float32")
    assert cfg["attention_bias"] is (key == "qwen2")


@pytest.mark.parametrize("key", ["llama", "llama_tied", "qwen2"])
def test_transformers_loads_checkpoint_without_missing_keys(tiny, key: str) -> None:
    from transformers import AutoModelForCausalLM

    out_dir, weights = tiny[key]
    model, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert type(model).__name__ == ("Qwen2ForCausalLM" if key == "qwen2" else "LlamaForCausalLM")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    params = model.state_dict()
    for name, w in weights.items():
        expected = torch.from_numpy(expected_after_storage(w, storage_type(name)))
        torch.testing.assert_close(params[name], expected, rtol=0, atol=0)
    if key == "llama_tied":
        assert torch.equal(params["lm_head.weight"], params["model.embed_tokens.weight"])
    rope = getattr(model.config, "rope_parameters", None) or {}
    assert rope.get("rope_theta", getattr(model.config, "rope_theta", None)) == 50000.0


# ----------------------------------------------------------------------------------------------------
# Output dtype
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("key", ["llama", "qwen2"])
def test_half_conversion_equals_float32_conversion_cast(tiny, tmp_path: Path, key: str, dtype: str) -> None:
    ref_dir, weights = tiny[key]
    src = write_tiny_gguf(tmp_path / "m.gguf", weights, key)
    out = convert_gguf(src, tmp_path / "out", dtype=dtype)
    got, ref = load_torch(out / "model.safetensors"), load_torch(ref_dir / "model.safetensors")
    assert set(got) == set(ref)
    for name, t in ref.items():  # every tensor, norms and biases included
        assert got[name].dtype == getattr(torch, dtype), name
        assert torch.equal(got[name], t.to(getattr(torch, dtype))), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == dtype
    assert cfg == {**json.loads((ref_dir / "config.json").read_text()), "torch_dtype": dtype}
    size, ref_size = (d.joinpath("model.safetensors").stat().st_size for d in (out, ref_dir))
    assert size < 0.55 * ref_size


def test_convert_gguf_cli_dtype(tiny, tmp_path: Path, capsys) -> None:
    from obinfer.cli import main

    _, weights = tiny["llama"]
    src = write_tiny_gguf(tmp_path / "m.gguf", weights)
    assert main(["convert-gguf", str(src), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    got = load_torch(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}


def test_bad_dtype_and_float16_overflow_are_refused(tmp_path: Path) -> None:
    weights = hf_weights("llama", tied=True)
    src = write_tiny_gguf(tmp_path / "m.gguf", weights)
    with pytest.raises(GGUFImportError, match="unknown dtype 'int8'"):
        convert_gguf(src, tmp_path / "o1", dtype="int8")
    weights["model.norm.weight"][3] = 1e5  # stored as F32: fine in float32 and bfloat16
    big = write_tiny_gguf(tmp_path / "big.gguf", weights)
    with pytest.raises(GGUFImportError, match=r"model.norm.weight: 100000 overflows float16"):
        convert_gguf(big, tmp_path / "o2", dtype="float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.gguf", "m.gguf"]
    convert_gguf(big, tmp_path / "o3", dtype=torch.bfloat16)  # a torch dtype works too
    assert load_torch(tmp_path / "o3" / "model.safetensors")["model.norm.weight"][3] == 99840.0  # bf16(1e5)


# ----------------------------------------------------------------------------------------------------
# Llama-3.1 RoPE scaling (rope_freqs)
# ----------------------------------------------------------------------------------------------------

THETA = 50000.0  # write_tiny_gguf's rope base: wavelengths 6, 24, 94, 364, 1405, 5437, 21038, 81409
ROPE_CASES = {
    # published Llama-3.1 setting: 5 unscaled frequencies, 1 blended, 2 slowed down
    "llama3.1": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192},
    # a short original context: 2 unscaled, 1 blended, 5 slowed (original length solved from the blend)
    "short": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 256},
    # a wide blend band: 2 unscaled, 3 blended, 3 slowed (high_freq_factor solved from the blend points)
    "wide": {"factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 32.0,
             "original_max_position_embeddings": 2048},
}  # fmt: skip


def llama_cpp_rope_factors(rope: dict, head_dim: int = HEAD_DIM, base: float = THETA) -> np.ndarray:
    """``rope_freqs.weight`` as llama.cpp's convert_hf_to_gguf.py (LlamaModel) computes it."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / lo, old_len / hi
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - lo) / (hi - lo)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


@pytest.fixture(scope="module")
def rope_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Converted tiny Llamas with rope_freqs, one per ROPE_CASES. Larger weights than `hf_weights`' (and
    norms near 1), so that attention is far from uniform and the positions matter to the logits."""
    root = tmp_path_factory.mktemp("rope")
    weights = {
        k: (1 + w if w.ndim == 1 else 4 * w) for k, w in hf_weights("llama", tied=False, seed=3).items()
    }
    out = {}
    for key, rope in ROPE_CASES.items():
        factors = llama_cpp_rope_factors(rope)
        src = write_tiny_gguf(root / f"{key}.gguf", weights, rope_freqs=factors, ctx=16 * 8192)
        out[key] = convert_gguf(src, root / key)
    return out


@pytest.mark.parametrize("key", list(ROPE_CASES))
def test_rope_freqs_become_the_known_llama3_config(rope_tiny, key: str) -> None:
    r = llama_cpp_rope_factors(ROPE_CASES[key])
    factor = ROPE_CASES[key]["factor"]
    assert (r == 1).any() and (r == factor).any() and ((r > 1) & (r < factor)).any()  # every band
    cfg = json.loads((rope_tiny[key] / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", **ROPE_CASES[key]}
    assert not any("rope" in name for name in load_file(rope_tiny[key] / "model.safetensors"))


@pytest.mark.parametrize("key", list(ROPE_CASES))
@torch.no_grad()
def test_rope_freqs_logits_match_transformers(rope_tiny, key: str) -> None:
    from transformers import LlamaForCausalLM

    from obinfer.config import ModelConfig
    from obinfer.models.llama import rope_inv_freq
    from obinfer.weights import load_model

    ids = torch.randint(3, len(tiny_vocab()), (1, 160), generator=torch.Generator().manual_seed(0))
    ref = LlamaForCausalLM.from_pretrained(rope_tiny[key], dtype=torch.float32).eval()(ids).logits
    model = load_model(rope_tiny[key])
    out = model(ids, model.new_cache())
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    base = rope_inv_freq(ModelConfig(head_dim=HEAD_DIM, rope_theta=THETA))
    expected = base / torch.from_numpy(llama_cpp_rope_factors(ROPE_CASES[key]))  # llama.cpp's frequencies
    torch.testing.assert_close(model.inv_freq, expected, rtol=1e-5, atol=0)
    model.inv_freq = base  # guard: without the scaling the logits really differ
    assert (model(ids, model.new_cache()) - ref).abs().max() > 1e-2


@pytest.mark.parametrize(
    "factors, arch, match",
    [
        ([1, 5, 1, 8, 1, 8, 8, 8], "llama", "matches no llama3 RoPE scaling"),  # not monotonic
        ([1, 1, 1, 1, 2, 3, 2, 8], "llama", "matches no llama3 RoPE scaling"),  # blend not a llama3 curve
        ([1, 1, 1, 1, 1, 1.5, 8, 8.5], "llama", "matches no llama3 RoPE scaling"),  # two slowed plateaus
        ([1, 1, 1, 8], "llama", r"has 4 values; head_dim 16 needs 8"),
        ([1, 1, 1, 1, 1, 0, 8, 8], "llama", "non-positive"),
        (list(llama_cpp_rope_factors(ROPE_CASES["short"])), "qwen2", "in a qwen2 GGUF file is not supported"),
    ],
)
def test_unexplained_rope_freqs_are_refused(tmp_path: Path, factors, arch: str, match: str) -> None:
    weights = hf_weights(arch, tied=True)
    src = write_tiny_gguf(tmp_path / "m.gguf", weights, arch, rope_freqs=np.array(factors, np.float32))
    with pytest.raises(GGUFImportError, match=match):
        convert_gguf(src, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_rope_freqs_of_ones_is_no_scaling() -> None:
    assert gguf_import.infer_llama3_rope_scaling(np.ones(8, np.float32), HEAD_DIM, THETA) is None


@pytest.mark.parametrize(
    "head_dim, theta, rope",
    [
        (128, 500000.0, (8.0, 1.0, 4.0, 8192)),  # Llama-3.1 8B / 70B / 405B, Llama-3.3
        (64, 500000.0, (32.0, 1.0, 4.0, 8192)),  # Llama-3.2 1B
        (128, 500000.0, (32.0, 1.0, 4.0, 8192)),  # Llama-3.2 3B
        (64, 10000.0, (4.0, 1.0, 8.0, 1000)),
        (32, 1e6, (6.0, 1.0, 3.0, 3000)),
        (64, 10000.0, (2.5, 1.0, 4.0, 333)),
    ],
)
def test_infer_llama3_rope_scaling_recovers_the_setting(head_dim: int, theta: float, rope: tuple) -> None:
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    known = dict(zip(keys, rope, strict=True))
    got = gguf_import.infer_llama3_rope_scaling(
        llama_cpp_rope_factors(known, head_dim, theta), head_dim, theta
    )
    assert got == {"rope_type": "llama3", **known}


def test_infer_llama3_rope_scaling_normalises_low_freq_factor_to_one() -> None:
    """Only original / low and original / high shape the tensor: (lo 2, hi 8, 512) is (1, 4, 256)."""
    r = llama_cpp_rope_factors({"factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                                "original_max_position_embeddings": 512})  # fmt: skip
    assert gguf_import.infer_llama3_rope_scaling(r, HEAD_DIM, THETA) == {
        "rope_type": "llama3",
        **ROPE_CASES["short"],
    }


# ----------------------------------------------------------------------------------------------------
# Tokenizer files
# ----------------------------------------------------------------------------------------------------


def tiny_tiktoken() -> tiktoken.Encoding:
    """Reference BPE: tiktoken with ranks = token ids (the vocab is in merge order)."""
    u2b = {u: b for b, u in byte_to_unicode().items()}
    ranks = {bytes(u2b[c] for c in tok): i for i, tok in enumerate(tiny_vocab()) if tok not in CONTROL}
    return tiktoken.Encoding("tiny", pat_str=SMOLLM_PATTERN, mergeable_ranks=ranks,
                             special_tokens={t: i for i, t in enumerate(CONTROL)})  # fmt: skip


def test_tokenizer_json_matches_tiktoken_reference(tiny) -> None:
    tok = Tokenizer.from_file(str(tiny["llama"][0] / "tokenizer.json"))
    ref = tiny_tiktoken()
    for text in CORPUS:
        ids = tok.encode(text).ids
        assert ids == ref.encode(text, allowed_special="all"), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("hello world").tokens == ["hello", "Ġworld"]
    assert tok.encode("12").tokens == ["1", "2"]  # digits split although the merge "1 2" exists
    assert tok.encode("<|im_start|>hello<|im_end|>").ids[0] == 1
    assert tok.encode("<|im_start|>hello<|im_end|>").ids[-1] == 2


def test_tokenizer_side_files(tiny) -> None:
    out_dir = tiny["llama"][0]
    cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is False
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert cfg["chat_template"] == CHATML_TEMPLATE  # the tiny GGUF has no template of its own
    special = json.loads((out_dir / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "<|im_end|>" and special["unk_token"] == "<|endoftext|>"
    gen = json.loads((out_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0]
    added = json.loads((out_dir / "tokenizer.json").read_text())["added_tokens"]
    assert [(a["id"], a["content"], a["special"]) for a in added] == [
        (i, t, True) for i, t in enumerate(CONTROL)
    ]


def test_transformers_tokenizer_and_chat_template(tiny) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["llama"][0])
    assert tok("hello world", add_special_tokens=True)["input_ids"] == tiny_tiktoken().encode("hello world")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen2_tokenizer_uses_split_regex(tiny) -> None:
    spec = json.loads((tiny["qwen2"][0] / "tokenizer.json").read_text())
    assert [p["type"] for p in spec["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]
    tok = Tokenizer.from_file(str(tiny["qwen2"][0] / "tokenizer.json"))
    assert tok.encode("hello world 12").tokens == ["hello", "Ġworld", "Ġ", "1", "2"]


# ----------------------------------------------------------------------------------------------------
# Atomicity and bad input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc_type", [OSError, KeyboardInterrupt])
def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch, exc_type: type) -> None:
    src = write_tiny_gguf(tmp_path / "m.gguf", hf_weights("llama", tied=True))
    out_root = tmp_path / "weights"

    def failing_writer(path: Path, specs, load) -> None:
        path.write_bytes(b"partial")
        load(specs[0])
        raise exc_type("disk full")

    monkeypatch.setattr(gguf_import, "_write_safetensors", failing_writer)
    with pytest.raises(exc_type):
        convert_gguf(src, out_root / "model")
    assert list(out_root.iterdir()) == []  # neither the output nor the temp dir


def test_existing_output_dir_is_refused_and_untouched(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "m.gguf", hf_weights("llama", tied=True))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert_gguf(src, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(GGUFImportError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "o1")
    (tmp_path / "x.gguf").write_text("definitely not a gguf file")
    with pytest.raises(GGUFImportError, match="not a GGUF file"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "o2")
    good = write_tiny_gguf(tmp_path / "m.gguf", hf_weights("llama", tied=True))
    (tmp_path / "trunc.gguf").write_bytes(good.read_bytes()[:200])
    with pytest.raises(GGUFImportError, match="cannot parse"):
        convert_gguf(tmp_path / "trunc.gguf", tmp_path / "o3")
    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFImportError, match="unsupported GGUF architecture 'falcon'"):
        convert_gguf(tmp_path / "falcon.gguf", tmp_path / "o4")
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------
# Default model location
# ----------------------------------------------------------------------------------------------------
