"""Convert llama.cpp GGUF checkpoints into Hugging Face-layout checkpoint directories.

Supports the ``llama`` and ``qwen2`` architectures with a byte-level BPE (``gpt2``) tokenizer. Every
tensor is dequantized to float32 with ``gguf.quants.dequantize``; llama.cpp's per-head row permutation
of ``q_proj``/``k_proj`` (applied to llama models only) is undone so that rotate-half RoPE is correct.

The output directory holds ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json`` and ``generation_config.json``. It is built in a
temporary sibling directory and renamed into place, so a failed or interrupted conversion leaves nothing.

Named models built from GGUF files (the default SmolLM2-135M-Instruct among them) are in
:mod:`obinfer.catalog`.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from obinfer.errors import ObinferError
from obinfer.storage import OutputExistsError, atomic_dir, check_creatable

__all__ = ["convert_gguf", "unpermute_rows", "GGUFImportError"]

logger = logging.getLogger(__name__)

SMOLLM_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM_SYSTEM_PROMPT + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# general.architecture -> (model_type, HF class, q/k rows permuted by llama.cpp)
_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}
_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTE_LEVEL_NO_REGEX = {**_BYTE_LEVEL, "use_regex": False}
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
_ROW_CHUNK = 4096  # rows dequantized at once


class GGUFImportError(ObinferError, ValueError):
    """A GGUF file is missing, malformed or uses an unsupported architecture/tokenizer."""


@dataclass(frozen=True)
class _TensorSpec:
    """One output tensor: its HF name, shape (out, in) and the GGUF tensor it comes from."""

    hf_name: str
    shape: tuple[int, ...]
    source: Any  # gguf.ReaderTensor
    unpermute_heads: int  # 0 = no q/k un-permutation, else the number of heads


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def _open_reader(path: Path) -> Any:
    """Open ``path`` with ``gguf.GGUFReader`` after checking it exists and starts with the GGUF magic."""
    if not path.is_file():
        raise GGUFImportError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise GGUFImportError(f"cannot read {path}: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise GGUFImportError(f"not a GGUF file (bad magic {magic!r}): {path}")
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # malformed files raise assorted numpy/struct errors
        raise GGUFImportError(f"cannot parse GGUF file {path}: {exc}") from exc


def _field(reader: Any, key: str, default: Any = ...) -> Any:
    """Return the decoded value of metadata ``key`` (``default`` if absent, error if no default)."""
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise GGUFImportError(f"GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _f32(x: float) -> float:
    """Shortest decimal that round-trips the float32 ``x`` (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _read_config(reader: Any) -> dict[str, Any]:
    """Build the Hugging Face ``config.json`` dict from GGUF metadata (tie/bias fields set later)."""
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise GGUFImportError(f"unsupported GGUF architecture {arch!r} (supported: {sorted(_ARCHITECTURES)})")
    model_type, hf_class, _ = _ARCHITECTURES[arch]
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise GGUFImportError(f"unsupported RoPE scaling {scaling!r} in GGUF file")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    n_head = _field(reader, f"{arch}.attention.head_count")
    n_kv = _field(reader, f"{arch}.attention.head_count_kv", n_head)
    if not isinstance(n_head, int) or not isinstance(n_kv, int):
        raise GGUFImportError("per-layer head counts are not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size", len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise GGUFImportError("GGUF file has neither a vocab_size nor a token list")
    return {
        "model_type": model_type,
        "architectures": [hf_class],
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // n_head)),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length")),
        "vocab_size": int(vocab),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", None),
        "torch_dtype": "float32",
    }


def _hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.weight``) to its HF name (``model.layers.3...``)."""
    if m := _LAYER_RE.match(gguf_name):
        layer, kind, suffix = m.groups()
        if kind in _LAYER_MAP:
            return f"model.layers.{layer}.{_LAYER_MAP[kind]}.{suffix}"
    elif (m := _GLOBAL_RE.match(gguf_name)) and m.group(1) in _GLOBAL_MAP:
        return f"{_GLOBAL_MAP[m.group(1)]}.{m.group(2)}"
    hint = " (Llama-3.1-style RoPE scaling)" if gguf_name.startswith("rope_freqs") else ""
    raise GGUFImportError(f"unsupported GGUF tensor {gguf_name!r}{hint}")


def _plan_tensors(reader: Any, config: dict[str, Any]) -> list[_TensorSpec]:
    """List the output tensors, checking names and that every expected weight is present."""
    permuted = _ARCHITECTURES[config["model_type"]][2]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    specs = []
    for t in reader.tensors:
        kind = t.name.split(".")[-2]
        n = heads.get(kind, 0) if permuted else 0
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        specs.append(_TensorSpec(_hf_name(t.name), shape, t, n))
    names = {s.hf_name for s in specs}
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(config["num_hidden_layers"]):
        expected |= {f"model.layers.{i}.{v}.weight" for v in _LAYER_MAP.values()}
    if missing := sorted(expected - names):
        raise GGUFImportError(f"GGUF file lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    return specs


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half pairs).

    Per head, llama.cpp stores row ``2i + j`` where Hugging Face has row ``j * d/2 + i``.

    Args:
        w: GGUF-order rows, shape (n_heads * d, in) or (n_heads * d,) for a bias.
        n_heads: number of heads the rows are split into.

    Returns:
        Hugging Face-order array with the same shape as ``w``.
    """
    d = w.shape[0] // n_heads
    if d * n_heads != w.shape[0] or d % 2:
        raise GGUFImportError(f"cannot split {w.shape[0]} rows into {n_heads} heads of even size")
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_tensor(spec: _TensorSpec) -> np.ndarray:
    """Dequantize one tensor to a fresh, writable, C-contiguous float32 array of shape ``spec.shape``."""
    import gguf

    t = spec.source
    data = t.data if t.data.ndim > 1 else t.data.reshape(1, -1)
    out = np.empty((data.shape[0], int(np.prod(spec.shape)) // data.shape[0]), dtype=np.float32)
    for start in range(0, data.shape[0], _ROW_CHUNK):  # chunked: bounds dequantization temporaries
        try:
            rows = gguf.quants.dequantize(data[start : start + _ROW_CHUNK], t.tensor_type)
        except NotImplementedError as exc:
            raise GGUFImportError(f"tensor {t.name}: unsupported type {t.tensor_type.name}") from exc
        out[start : start + _ROW_CHUNK] = rows  # copies out of the read-only memory map
    out = out.reshape(spec.shape)
    return unpermute_rows(out, spec.unpermute_heads) if spec.unpermute_heads else out


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _write_safetensors(
    path: Path, specs: list[_TensorSpec], load: Callable[[_TensorSpec], np.ndarray]
) -> None:
    """Stream float32 tensors into a safetensors file, holding only one tensor in memory at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        end = offset + 4 * int(np.prod(s.shape, dtype=np.int64))
        header[s.hf_name] = {"dtype": "F32", "shape": list(s.shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            arr = np.ascontiguousarray(load(s), dtype="<f4")
            if arr.shape != s.shape:
                raise GGUFImportError(f"tensor {s.hf_name}: got shape {arr.shape}, expected {s.shape}")
            f.write(memoryview(arr).cast("B"))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------


def _split_regex(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _pre_tokenizer(pre: str) -> dict[str, Any]:
    """HF ``pre_tokenizer`` for a llama.cpp ``tokenizer.ggml.pre`` name."""
    if pre in ("gpt2", "default"):
        return dict(_BYTE_LEVEL)
    if pre == "smollm":
        digits = {"type": "Digits", "individual_digits": True}
        return {"type": "Sequence", "pretokenizers": [digits, dict(_BYTE_LEVEL)]}
    if pre in ("qwen2", "llama-bpe"):
        regex = _QWEN2_REGEX if pre == "qwen2" else _LLAMA3_REGEX
        return {"type": "Sequence", "pretokenizers": [_split_regex(regex), dict(_BYTE_LEVEL_NO_REGEX)]}
    raise GGUFImportError(
        f"unsupported tokenizer pre-tokenizer {pre!r} (known: smollm, gpt2, default, qwen2, llama-bpe)"
    )


def _bos_post_processor(bos: str, bos_id: int) -> dict[str, Any]:
    """``TemplateProcessing`` that prepends ``bos`` to every sequence (for ``add_bos_token`` models)."""
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    seq_a = {"Sequence": {"id": "A", "type_id": 0}}
    seq_b = {"Sequence": {"id": "B", "type_id": 1}}
    return {
        "type": "TemplateProcessing",
        "single": [special, seq_a],
        "pair": [special, seq_a, {"SpecialToken": {"id": bos, "type_id": 1}}, seq_b],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def _token_info(reader: Any) -> tuple[list[str], list[int], list[list[str]]]:
    """Return (tokens, token types, merges as pairs) after checking the tokenizer model is BPE."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFImportError(f"unsupported tokenizer model {model!r} (only byte-level BPE 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = []
    for m in _field(reader, "tokenizer.ggml.merges"):
        pair = m.split(" ")
        if len(pair) != 2:
            raise GGUFImportError(f"malformed BPE merge {m!r}")
        merges.append(pair)
    return tokens, types, merges


def _tokenizer_json(reader: Any, add_bos: bool) -> dict[str, Any]:
    """Build a Hugging Face ``tokenizer.json`` (byte-level BPE) from GGUF tokenizer metadata."""
    tokens, types, merges = _token_info(reader)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    added = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": ty == _TOKEN_CONTROL,
        }
        for i, (tok, ty) in enumerate(zip(tokens, types, strict=True))
        if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id", None)
    post = _bos_post_processor(tokens[bos_id], bos_id) if add_bos and bos_id is not None else None
    model = {
        "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
        "ignore_merges": pre == "llama-bpe", "vocab": vocab, "merges": merges,
    }  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"} if pre == "qwen2" else None,
        "pre_tokenizer": _pre_tokenizer(pre),
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": model,
    }


def _special_tokens(reader: Any) -> dict[str, str]:
    """Map HF special-token roles (bos/eos/pad/unk) to token strings, for ids present in the GGUF."""
    tokens = reader.fields["tokenizer.ggml.tokens"]
    out = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        tid = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        if tid is not None and 0 <= tid < len(tokens.data):
            out[f"{role}_token"] = tokens.contents(tid)
    return out


def _tokenizer_files(reader: Any, config: dict[str, Any]) -> dict[str, Any]:
    """All tokenizer-related JSON files, keyed by file name."""
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    special = _special_tokens(reader)
    tok_json = _tokenizer_json(reader, add_bos)
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        **special,
        "chat_template": _field(reader, "tokenizer.chat_template", CHATML_TEMPLATE),
    }
    return {
        "tokenizer.json": tok_json,
        "tokenizer_config.json": tok_config,
        "special_tokens_map.json": special,
    }


def _generation_config(reader: Any, config: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json``: stop on the GGUF eos plus ``<|im_end|>``/``<|endoftext|>`` if present."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    eos = [config["eos_token_id"]] if config["eos_token_id"] is not None else []
    for name in ("<|im_end|>", "<|endoftext|>"):
        if name in tokens and tokens.index(name) not in eos:
            eos.append(tokens.index(name))
    gen: dict[str, Any] = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos}
    pad = _field(reader, "tokenizer.ggml.padding_token_id", None)
    if pad is not None:
        gen["pad_token_id"] = pad
    return gen


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama/qwen2 GGUF file into a float32 Hugging Face checkpoint directory.

    Args:
        gguf_path: path to the ``.gguf`` file.
        out_dir: directory to create; must not exist yet. Written atomically.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        GGUFImportError: missing/non-GGUF file, unsupported architecture, tokenizer or tensor, or an
            existing ``out_dir``.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise OutputExistsError(f"output directory already exists: {out_dir}")
    check_creatable(out_dir)
    reader = _open_reader(gguf_path)
    config = _read_config(reader)
    specs = _plan_tensors(reader, config)
    names = {s.hf_name for s in specs}
    config["tie_word_embeddings"] = "lm_head.weight" not in names
    config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in names
    if config["model_type"] == "llama":
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    files = _tokenizer_files(reader, config)
    files["config.json"] = config
    files["generation_config.json"] = _generation_config(reader, config)
    logger.debug("converting %s -> %s (%d tensors)", gguf_path, out_dir, len(specs))
    with atomic_dir(out_dir) as tmp:
        for name, obj in files.items():
            _write_json(tmp / name, obj)
        _write_safetensors(tmp / "model.safetensors", specs, _load_tensor)
    return out_dir
