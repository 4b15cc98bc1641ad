"""Convert llama.cpp GGUF checkpoints into Hugging Face-layout checkpoint directories.

Supports the ``llama`` and ``qwen2`` architectures with a byte-level BPE (``gpt2``) tokenizer. Every
tensor is dequantized to float32 with ``gguf.quants.dequantize`` (then written as float32, bfloat16 or
float16, see :func:`convert_gguf`); llama.cpp's per-head row permutation of ``q_proj``/``k_proj``
(applied to llama models only) is undone so that rotate-half RoPE is correct.

Llama-3.1-style RoPE scaling: llama.cpp's converter stores it as a ``rope_freqs.weight`` tensor (head_dim/2
float32 divisors of the RoPE frequencies) instead of the ``rope_scaling`` parameters. The import infers
the ``llama3`` parameters that reproduce the tensor (:func:`infer_llama3_rope_scaling`) and writes them
into ``config.json``; the tensor itself is not a weight of the checkpoint.

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
from obinfer.tokenizer import LLAMA3_PATTERN

__all__ = ["convert_gguf", "unpermute_rows", "infer_llama3_rope_scaling", "GGUFImportError", "DTYPES"]

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
_LLAMA3_REGEX = LLAMA3_PATTERN  # llama.cpp's "llama-bpe" pre-tokenizer is Llama 3's split
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
_ROW_CHUNK = 4096  # rows dequantized at once
# output dtype of convert_gguf -> (safetensors dtype code, bytes per element)
DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}
_ROPE_FREQS = "rope_freqs.weight"
# llama3 RoPE scaling settings of the published models, tried first: (factor, low, high, original length)
_PUBLISHED_LLAMA3 = ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192))  # Llama-3.1 / 3.3; Llama-3.2 1B, 3B
_HIGH_FREQ_FACTORS = (4.0, 2.0, 8.0, 16.0, 32.0)  # high_freq_factor tried (low_freq_factor is 1)
_ROPE_RTOL = 1e-5


class GGUFImportError(ObinferError, ValueError):
    """A GGUF file is missing, malformed or uses an unsupported architecture/tokenizer."""


@dataclass(frozen=True)
class _TensorSpec:
    """One output tensor: its HF name, shape (out, in) and the GGUF tensor it comes from."""

    hf_name: str
    shape: tuple[int, ...]
    source: Any  # gguf.ReaderTensor
    unpermute_heads: int  # 0 = no q/k un-permutation, else the number of heads
    dtype: str = "F32"  # safetensors dtype code it is written as (F32, BF16 or F16)


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


def _plan_tensors(reader: Any, config: dict[str, Any], code: str = "F32") -> list[_TensorSpec]:
    """List the output tensors (written as dtype ``code``), checking names and that every expected weight
    is present. ``rope_freqs.weight`` is not one of them (it becomes ``config["rope_scaling"]``)."""
    permuted = _ARCHITECTURES[config["model_type"]][2]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    specs = []
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            continue
        kind = t.name.split(".")[-2]
        n = heads.get(kind, 0) if permuted else 0
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        specs.append(_TensorSpec(_hf_name(t.name), shape, t, n, code))
    names = {s.hf_name for s in specs}
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(config["num_hidden_layers"]):
        expected |= {f"model.layers.{i}.{v}.weight" for v in _LAYER_MAP.values()}
    if missing := sorted(expected - names):
        raise GGUFImportError(f"GGUF file lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    return specs


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> Any:
    """obinfer's RoPE inverse frequencies (a float32 tensor) for these parameters; None if invalid."""
    from obinfer.config import ConfigError, ModelConfig
    from obinfer.models.llama import rope_inv_freq

    try:
        cfg = ModelConfig(head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)
    except ConfigError:
        return None
    return rope_inv_freq(cfg)


def _nice(v: float) -> float:
    """``v`` with float32 noise removed: 4.0 for 3.9999998, 1.5 for 1.5000001."""
    r = float(f"{v:.6g}")
    return float(round(r)) if abs(r - round(r)) <= 1e-6 * abs(r) else r


def _original_lengths(
    wavelen: np.ndarray, r: np.ndarray, factor: float, high: float, tol: float = 1e-6
) -> list[int]:
    """``original_max_position_embeddings`` values that fit the divisors ``r`` with ``low_freq_factor``
    1 and ``high_freq_factor`` ``high``: solved from the blend points if there are any, else chosen in
    the gap between the two plateaus (8192 if it fits, else powers of two, else an integer)."""
    ones, full = r <= 1 + tol, r >= factor * (1 - tol)
    blend = ~ones & ~full
    if blend.any():
        s = (1 / r[blend] - 1 / factor) / (1 - 1 / factor)  # 0 on the slowed plateau, 1 unscaled
        return [round(float(np.median(wavelen[blend] * (1 + s * (high - 1)))))]
    lo_end = high * float(wavelen[ones].max()) if ones.any() else 0.0  # L / high above every unscaled one
    hi_end = float(wavelen[full].min()) if full.any() else float("inf")  # L below every slowed one
    fits = [L for L in [8192] + [2**k for k in range(1, 40)] if lo_end < L < hi_end]
    if not fits and np.floor(lo_end) + 1 < hi_end:
        fits = [int(np.floor(lo_end)) + 1]
    return fits[:3]


def _llama3_candidates(wavelen: np.ndarray, r: np.ndarray) -> list[dict[str, Any]]:
    """llama3 ``rope_scaling`` settings to try for the divisors ``r``, most plausible first."""
    out = [(f, lo, hi, L) for f, lo, hi, L in _PUBLISHED_LLAMA3]
    factor = _nice(float(r.max()))  # the plateau of the slowest frequencies
    if factor > 1:
        highs = list(_HIGH_FREQ_FACTORS)
        blend = (r > 1 + 1e-6) & (r < factor * (1 - 1e-6))
        if blend.sum() >= 2:
            # the blend position s = (L / wavelen - low) / (high - low) is linear in 1 / wavelen: a line
            # through the blend points gives L / low and L / high; low = 1 as in every published config
            s = (1 / r[blend] - 1 / factor) / (1 - 1 / factor)
            slope, icpt = np.polyfit(1 / wavelen[blend], s, 1)
            if icpt < 0 and slope > 0:
                highs.insert(0, _nice(1 - 1 / icpt))
        for hi in highs:
            out += [(factor, 1.0, hi, L) for L in _original_lengths(wavelen, r, factor, hi)]
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    unique = list(dict.fromkeys(out))
    return [{"rope_type": "llama3", **dict(zip(keys, c, strict=True))} for c in unique]


def infer_llama3_rope_scaling(
    freq_factors: np.ndarray, head_dim: int, rope_theta: float
) -> dict[str, Any] | None:
    """The ``llama3`` ``rope_scaling`` whose frequencies reproduce llama.cpp's ``rope_freqs`` tensor.

    llama.cpp divides the RoPE frequency i by ``freq_factors[i]``: 1 for short wavelengths, ``factor``
    for wavelengths above ``original_max_position_embeddings / low_freq_factor``, a blend in between.
    Only ``L / low_freq_factor`` and ``L / high_freq_factor`` shape the tensor, so ``low_freq_factor`` is
    taken as 1, as in every published config. Tried in order: the published Llama-3.1 / 3.2 settings;
    then ``factor`` = the top plateau with ``high_freq_factor`` fitted by a line through the blend points
    (two or more), 4, or a few powers of two, and ``original_max_position_embeddings`` solved from the
    blend points (or picked in the gap between the plateaus when there are none). A candidate is accepted
    only if ``obinfer.models.llama.rope_inv_freq`` gives frequencies equal, within rtol 1e-5, to
    llama.cpp's (unscaled frequency / factor).

    Args:
        freq_factors: the ``rope_freqs`` values, (head_dim / 2,).
        head_dim: D; rope_theta: the RoPE base.

    Returns:
        The ``rope_scaling`` dict for ``config.json``, or None when every divisor is 1 (no scaling).

    Raises:
        GGUFImportError: a tensor of the wrong size, non-positive values, or one no setting reproduces.
    """
    import torch

    r = np.array(freq_factors, dtype=np.float32).reshape(-1)  # a writable copy
    if r.size != head_dim // 2:
        raise GGUFImportError(f"{_ROPE_FREQS} has {r.size} values; head_dim {head_dim} needs {head_dim // 2}")
    if not np.isfinite(r).all() or (r <= 0).any():
        raise GGUFImportError(f"{_ROPE_FREQS} holds non-positive or non-finite values")
    base = _inv_freq(head_dim, rope_theta, None)
    target = base / torch.from_numpy(r)  # llama.cpp's frequencies
    if torch.allclose(base, target, rtol=_ROPE_RTOL, atol=0):
        return None
    wavelen = (2 * np.pi / base.double()).numpy()
    r64 = r.astype(np.float64)
    for cand in _llama3_candidates(wavelen, r64):
        got = _inv_freq(head_dim, rope_theta, cand)
        if got is not None and torch.allclose(got, target, rtol=_ROPE_RTOL, atol=0):
            return cand
    shown = ", ".join(f"{v:.6g}" for v in r[:8]) + (", ..." if r.size > 8 else "")
    raise GGUFImportError(
        f"{_ROPE_FREQS} ({shown}) matches no llama3 RoPE scaling (factor, low_freq_factor, "
        f"high_freq_factor, original_max_position_embeddings) within rtol {_ROPE_RTOL}: cannot import it"
    )


def _rope_scaling(reader: Any, config: dict[str, Any]) -> dict[str, Any] | None:
    """``config["rope_scaling"]`` from the GGUF's ``rope_freqs.weight`` (None without one)."""
    import gguf

    found = [t for t in reader.tensors if t.name == _ROPE_FREQS]
    if not found:
        return None
    if config["model_type"] != "llama":
        raise GGUFImportError(f"{_ROPE_FREQS} in a {config['model_type']} GGUF file is not supported")
    t = found[0]
    try:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as exc:
        raise GGUFImportError(f"tensor {t.name}: unsupported type {t.tensor_type.name}") from exc
    return infer_llama3_rope_scaling(values, config["head_dim"], config["rope_theta"])


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


_ITEMSIZE = {code: size for code, size in DTYPES.values()}


def _encode(arr: np.ndarray, code: str, name: str) -> np.ndarray:
    """The float32 array ``arr`` as little-endian ``code`` (F32, BF16, F16) values, rounded to nearest even
    as torch's cast does. A value that overflows float16 is an error, not an infinity."""
    arr = np.ascontiguousarray(arr, dtype="<f4")
    if code == "F32":
        return arr
    import torch

    out = torch.from_numpy(arr).to(torch.bfloat16 if code == "BF16" else torch.float16)
    if code == "F16" and not torch.isfinite(out).all() and np.isfinite(arr).all():
        big = float(np.abs(arr).max())
        raise GGUFImportError(f"tensor {name}: {big:g} overflows float16; convert to bfloat16 or float32")
    return out.view(torch.int16).numpy()


def _write_safetensors(
    path: Path, specs: list[_TensorSpec], load: Callable[[_TensorSpec], np.ndarray]
) -> None:
    """Stream tensors into a safetensors file, holding only one tensor in memory at a time. ``load`` gives
    float32 arrays; each is written as its spec's dtype (F32, BF16 or F16)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        end = offset + _ITEMSIZE[s.dtype] * int(np.prod(s.shape, dtype=np.int64))
        header[s.hf_name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            arr = load(s)
            if arr.shape != s.shape:
                raise GGUFImportError(f"tensor {s.hf_name}: got shape {arr.shape}, expected {s.shape}")
            f.write(memoryview(_encode(arr, s.dtype, s.hf_name)).cast("B"))


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


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert a llama/qwen2 GGUF file into a Hugging Face checkpoint directory.

    Every tensor is dequantized to float32, then written as ``dtype``: all of them, norms and biases
    included (``config.json``'s ``torch_dtype`` says which). bfloat16 or float16 halve the file and the
    memory of the conversion's output; each weight is rounded once, to nearest even, exactly as casting
    the float32 conversion with torch would. float16 refuses a weight beyond its range (65504).

    Args:
        gguf_path: path to the ``.gguf`` file.
        out_dir: directory to create; must not exist yet. Written atomically.
        dtype: ``"float32"`` (default, exact), ``"bfloat16"`` or ``"float16"`` (a torch dtype works too).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        GGUFImportError: missing/non-GGUF file, unsupported architecture, tokenizer or tensor, a
            ``rope_freqs`` tensor no llama3 RoPE scaling reproduces, an unknown dtype, or an existing
            ``out_dir``.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise GGUFImportError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if out_dir.exists():
        raise OutputExistsError(f"output directory already exists: {out_dir}")
    check_creatable(out_dir)
    reader = _open_reader(gguf_path)
    config = _read_config(reader)
    config["rope_scaling"] = _rope_scaling(reader, config)
    config["torch_dtype"] = dtype
    specs = _plan_tensors(reader, config, DTYPES[dtype][0])
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
