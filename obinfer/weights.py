"""Load a Hugging Face checkpoint directory (config.json + safetensors) into a `Transformer`.

The model is built on the `meta` device (no memory), the safetensors tensors are read (memory-mapped)
and cast once to the requested dtype/device, and `load_state_dict(..., assign=True)` adopts them:
nothing is allocated twice. Pickled `.bin` checkpoints are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from obinfer.config import ModelConfig
from obinfer.models.llama import Transformer, rope_inv_freq

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing files, missing/unexpected/mis-shaped tensors."""


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory (single file or sharded index)."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"malformed {index}: {e}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists missing shard(s): {', '.join(missing)}")
        return files
    if single.is_file():
        return [single]
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if others:
        return [model_dir / n for n in others]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir} has only pickled weights (.bin/.pt); obinfer loads safetensors only"
        )
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def read_state_dict(
    files: list[Path], dtype: torch.dtype, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """All tensors of the shards, cast to dtype on device."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    t = sf.get_tensor(name)
                    state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {f}: {e}") from None
    return state


def load_model(
    model_dir: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Build the model from `model_dir/config.json` and load its safetensors weights.

    Raises:
        ConfigError: bad config.json. CheckpointError: missing/unexpected/mis-shaped tensors or files.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    cfg = ModelConfig.from_hf(model_dir)
    state = read_state_dict(safetensors_files(model_dir), dtype, device)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint {model_dir} is missing tensor(s): {_short(missing)}")
    if unexpected:
        raise CheckpointError(f"checkpoint {model_dir} has unexpected tensor(s): {_short(unexpected)}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(
                f"tensor {name} has shape {tuple(state[name].shape)}, config expects {tuple(shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval().requires_grad_(False)


def _short(names: list[str], n: int = 4) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
