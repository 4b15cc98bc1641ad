"""Model configuration: one dataclass for Llama-3.x and Qwen-2.5 decoders.

The two families differ only by configuration: Qwen-2.5 has biases on q/k/v and (in the small sizes)
ties the LM head to the embeddings; Llama-3.1 scales its RoPE frequencies ("llama3" rope scaling).
`ModelConfig.from_hf` reads a Hugging Face `config.json` (both the transformers 4.x layout with
`rope_theta` / `rope_scaling` and the 5.x layout with `rope_parameters`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class ConfigError(ValueError):
    """A config.json that obinfer cannot run (unknown model type, missing or bad key)."""


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer.

    Shapes follow the glossary in `obinfer/__init__.py`: C = hidden_size, Hq = n_heads,
    Hkv = n_kv_heads, D = head_dim, V = vocab_size.
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
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.n_heads}) is not a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ConfigError(f"unsupported rope scaling type {kind!r} (supported: llama3)")

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
        """Build from a Hugging Face config: a dict, a `config.json` path, or a checkpoint directory."""
        raw = source if isinstance(source, dict) else _read_json(Path(source))
        return cls(**_translate(raw))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"malformed config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"malformed config {path}: expected a JSON object")
    return data


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _translate(raw: dict[str, Any]) -> dict[str, Any]:
    """Map Hugging Face config keys to ModelConfig fields, with clear errors."""
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
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {raw['hidden_act']!r} (obinfer implements silu)")
    if raw.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported")
    n_heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    rope = dict(raw.get("rope_parameters") or {})
    if raw.get("rope_scaling"):
        rope.update(raw["rope_scaling"])
    theta = float(raw.get("rope_theta", rope.pop("rope_theta", 10000.0)))
    rope.pop("rope_theta", None)
    kind = rope.get("rope_type", rope.get("type", "default"))
    eos = raw.get("eos_token_id")
    return dict(
        model_type=model_type,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        n_layers=int(raw["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
        head_dim=int(raw.get("head_dim") or hidden // n_heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=rope if kind not in ("default", None) else None,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
    )
