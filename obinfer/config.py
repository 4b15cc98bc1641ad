"""Model configuration: one dataclass for Llama-3.x and Qwen-2.5 decoders.

The two families differ only by configuration: Qwen-2.5 has biases on q/k/v and (in the small sizes)
ties the LM head to the embeddings; Llama-3.1 scales its RoPE frequencies ("llama3" rope scaling).
`ModelConfig.from_hf` reads a Hugging Face `config.json` (both the transformers 4.x layout with
`rope_theta` / `rope_scaling` and the 5.x layout with `rope_parameters`).

Every value is checked before anything is built or read: types (integers must be JSON integers, not
strings, floats or booleans), signs, divisibility, RoPE scaling keys and token ids. A bad value raises
`ConfigError` naming the config.json key and the file, e.g.
``/m/config.json: num_attention_heads must be a positive integer, got -9``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from obinfer.errors import ObinferError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class ConfigError(ObinferError, ValueError):
    """A config.json that obinfer cannot run (unknown model type, missing or bad key)."""


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer.

    Shapes follow the glossary in `obinfer/__init__.py`: C = hidden_size, Hq = n_heads,
    Hkv = n_kv_heads, D = head_dim, V = vocab_size. Error messages name the config.json keys
    (n_layers is num_hidden_layers, n_heads num_attention_heads, n_kv_heads num_key_value_heads).
    """

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen-2.5)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; obinfer runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name, key in _INT_FIELDS.items():
            _positive_int(getattr(self, name), key)
        for name in ("rms_norm_eps", "rope_theta"):
            _positive_float(getattr(self, name), name)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            _bool(getattr(self, name), name)
        if self.head_dim % 2:
            raise ConfigError(
                f"head_dim must be even (RoPE rotates pairs of dimensions), got {self.head_dim}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.n_heads}) is not a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, "rope_scaling")
        _token_id(self.bos_token_id, "bos_token_id", self.vocab_size)
        if not isinstance(self.eos_token_id, list | tuple):
            raise ConfigError(f"eos_token_id must be a list of token ids, got {self.eos_token_id!r}")
        for t in self.eos_token_id:
            _token_id(t, "eos_token_id", self.vocab_size, allow_none=False)

    @property
    def group_size(self) -> int:
        """G = Hq / Hkv: query heads sharing one KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """K+V values stored per token over all layers and KV heads (multiply by the element size)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A small config for tests: `ModelConfig.tiny(model_type="qwen2", attention_bias=True)`."""
        return replace(cls(), **overrides)

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config: a dict, a `config.json` path, or a checkpoint directory.

        Raises:
            ConfigError: unreadable file or a bad value; the message names the key and the file.
        """
        if isinstance(source, dict):
            raw, where = source, "config"
        else:
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            raw, where = _read_json(path), str(path)
        try:
            return cls(**_translate(raw))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ModelConfig integer fields (all > 0) -> their config.json key
_INT_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "max_position_embeddings": "max_position_embeddings",
}


def _read_json(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory, not a JSON file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"malformed config {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"malformed config {path}: not valid JSON ({e})") from None
    except (OSError, RecursionError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"malformed config {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _show(v: Any) -> str:
    """A value and, unless obvious, its type: `'576px' (str)`, `True (bool)`, `-9`."""
    r = repr(v)
    if len(r) > 60:
        r = r[:57] + "..."
    return r if type(v) in (int, float) or v is None else f"{r} ({type(v).__name__})"


def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _positive_int(v: Any, key: str) -> int:
    if not _is_int(v) or v < 1:
        raise ConfigError(f"{key} must be a positive integer, got {_show(v)}")
    return int(v)


def _positive_float(v: Any, key: str) -> float:
    if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{key} must be a positive number, got {_show(v)}")
    return float(v)


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key} must be true or false, got {_show(v)}")
    return v


def _token_id(v: Any, key: str, vocab: int, allow_none: bool = True) -> int | None:
    if v is None and allow_none:
        return None
    if not _is_int(v):
        raise ConfigError(
            f"{key} must be a token id (an integer{' or null' if allow_none else ''}), got {_show(v)}"
        )
    if not 0 <= v < vocab:
        raise ConfigError(f"{key} {v} is outside the vocabulary (vocab_size {vocab})")
    return int(v)


def _check_rope_scaling(rope: dict[str, Any], where: str) -> None:
    """A supported rope-scaling type with sane required keys (`where`: the config key holding it)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope scaling type {kind!r} in {where} (supported: {', '.join(ROPE_TYPES)})"
        )
    if kind == "default":
        return
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in rope]
    if missing:
        raise ConfigError(f"{where} of type llama3 is missing key(s): {', '.join(missing)}")
    factor = _positive_float(rope["factor"], f"{where}.factor")
    if factor < 1:
        raise ConfigError(f"{where}.factor must be >= 1, got {factor}")
    lo = _positive_float(rope["low_freq_factor"], f"{where}.low_freq_factor")
    hi = _positive_float(rope["high_freq_factor"], f"{where}.high_freq_factor")
    if hi <= lo:
        raise ConfigError(f"{where}.high_freq_factor ({hi}) must be greater than low_freq_factor ({lo})")
    _positive_int(rope["original_max_position_embeddings"], f"{where}.original_max_position_embeddings")


def _optional(raw: dict[str, Any], key: str, default: Any) -> Any:
    """raw[key], or default when the key is absent or null."""
    v = raw.get(key)
    return default if v is None else v


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _translate(raw: dict[str, Any]) -> dict[str, Any]:
    """Map Hugging Face config keys to ModelConfig fields, checking each value (errors name the key)."""
    model_type = raw.get("model_type")
    if model_type is None:
        raise ConfigError("config has no 'model_type' key")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unsupported model_type {model_type!r}; obinfer runs {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"config is missing required key(s): {', '.join(missing)}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"unsupported hidden_act {act!r} (obinfer implements silu)")
    sliding = raw.get("use_sliding_window")
    if sliding is not None and not isinstance(sliding, bool):
        raise ConfigError(f"use_sliding_window must be true or false, got {_show(sliding)}")
    if sliding:
        raise ConfigError("use_sliding_window=true is not supported")
    layer_types = raw.get("layer_types")
    if isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types):
        other = sorted({str(t) for t in layer_types} - {"full_attention"})
        raise ConfigError(f"layer_types {', '.join(other)} not supported (obinfer runs full_attention only)")

    ints = {key: _positive_int(raw[key], key) for key in _REQUIRED}
    n_heads, hidden = ints["num_attention_heads"], ints["hidden_size"]
    n_kv = _positive_int(_optional(raw, "num_key_value_heads", n_heads), "num_key_value_heads")
    if raw.get("head_dim") is not None:
        head_dim = _positive_int(raw["head_dim"], "head_dim")
    elif hidden % n_heads:
        raise ConfigError(
            f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({n_heads}) and no head_dim is given"
        )
    else:
        head_dim = hidden // n_heads

    rope: dict[str, Any] = {}
    for key in ("rope_parameters", "rope_scaling"):  # rope_scaling (4.x) wins over rope_parameters (5.x)
        part = raw.get(key)
        if part is not None and not isinstance(part, dict):
            raise ConfigError(f"{key} must be an object or null, got {_show(part)}")
        rope.update(part or {})
    rope_where = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    if "rope_theta" in raw:
        theta = _positive_float(raw["rope_theta"], "rope_theta")
    else:
        theta = _positive_float(rope.get("rope_theta", 10000.0), f"{rope_where}.rope_theta")
    rope.pop("rope_theta", None)
    _check_rope_scaling(rope, rope_where)
    kind = rope.get("rope_type", rope.get("type", "default"))

    eos = raw.get("eos_token_id")
    if eos is None:
        eos = []
    elif isinstance(eos, list | tuple):
        eos = list(eos)
    else:
        eos = [eos]
    return dict(
        model_type=model_type,
        vocab_size=ints["vocab_size"],
        hidden_size=hidden,
        intermediate_size=ints["intermediate_size"],
        n_layers=ints["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=_positive_float(_optional(raw, "rms_norm_eps", 1e-6), "rms_norm_eps"),
        rope_theta=theta,
        rope_scaling=rope if kind != "default" else None,
        max_position_embeddings=_positive_int(
            _optional(raw, "max_position_embeddings", 2048), "max_position_embeddings"
        ),
        tie_word_embeddings=_bool(_optional(raw, "tie_word_embeddings", False), "tie_word_embeddings"),
        attention_bias=_bool(_optional(raw, "attention_bias", model_type == "qwen2"), "attention_bias"),
        mlp_bias=_bool(_optional(raw, "mlp_bias", False), "mlp_bias"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos,
    )
