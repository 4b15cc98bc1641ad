"""Load a Hugging Face checkpoint directory (config.json + safetensors) into a `Transformer`.

The model is built on the `meta` device (no memory), the safetensors tensors are read (memory-mapped)
and cast once to the requested dtype/device, and `load_state_dict(..., assign=True)` adopts them:
nothing is allocated twice. Pickled `.bin` checkpoints are refused.

Order of the checks, so that a bad checkpoint fails fast and before any weight is read: the dtype and
device, then config.json (every key, see `obinfer/config.py`), then the safetensors headers (a truncated
or corrupt file, missing / unexpected / duplicated tensors, shapes that do not match the config, dtypes
that are not floating point); only then are the tensors read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from obinfer.config import ModelConfig
from obinfer.errors import ObinferError, UserError
from obinfer.models.llama import Transformer, rope_inv_freq

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors dtype codes obinfer casts to the model dtype (weights must be floating point)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class CheckpointError(ObinferError, ValueError):
    """A checkpoint that cannot be loaded: missing files, missing/unexpected/mis-shaped tensors."""


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory (single file or sharded index)."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, OSError) as e:
            raise CheckpointError(f"malformed {index}: {e}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"malformed {index}: weight_map must map tensor names to file names")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists missing shard(s): {', '.join(missing)}")
        return files
    if single.is_file():
        return [single]
    others = sorted(p.name for p in model_dir.glob("*.safetensors") if p.is_file())
    if others:
        return [model_dir / n for n in others]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir} has only pickled weights (.bin/.pt); obinfer loads safetensors only"
        )
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def read_headers(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """name -> (file, safetensors dtype code, shape) of every tensor, from the headers only (no data read).

    Raises:
        CheckpointError: an unreadable, truncated or corrupt file, or a tensor stored in two files.
    """
    out: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                entries = [(name, sf.get_slice(name)) for name in sf.keys()]  # noqa: SIM118
                entries = [(name, s.get_dtype(), tuple(s.get_shape())) for name, s in entries]
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot read {f} (truncated or corrupt safetensors file?): {e}") from None
        for name, code, shape in entries:
            if name in out:
                raise CheckpointError(f"tensor {name} is stored twice: in {out[name][0]} and in {f}")
            out[name] = (f, code, shape)
    return out


def read_state_dict(
    files: list[Path],
    dtype: torch.dtype,
    device: str | torch.device,
    only: set[str] | frozenset[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of the shards (those named in `only`, or all), floating ones cast to dtype on device."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        name = None
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if only is not None and name not in only:
                        continue
                    t = sf.get_tensor(name)
                    state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as e:
            what = f"tensor {name} of {f}" if name is not None else str(f)
            raise CheckpointError(f"cannot load {what} as {dtype} on {device}: {e}") from None
    return state


def _check_dtype_device(dtype: torch.dtype | str, device: str | torch.device) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    return dtype


def load_model(
    model_dir: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> Transformer:
    """Build the model from `model_dir/config.json` and load its safetensors weights.

    Raises:
        ConfigError: bad config.json (raised before any weight is read).
        CheckpointError: missing/unexpected/mis-shaped/non-float tensors, corrupt or missing files,
            an unknown dtype. UserError: a malformed device string.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    dtype = _check_dtype_device(dtype, device)
    cfg = ModelConfig.from_hf(model_dir)
    files = safetensors_files(model_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    headers = read_headers(files)
    if cfg.tie_word_embeddings:
        headers.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(headers))
    unexpected = sorted(set(headers) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint {model_dir} is missing tensor(s): {_short(missing)}")
    if unexpected:
        raise CheckpointError(f"checkpoint {model_dir} has unexpected tensor(s): {_short(unexpected)}")
    for name, shape in expected.items():
        f, code, got = headers[name]
        if got != shape:
            raise CheckpointError(f"tensor {name} in {f} has shape {got}, config.json expects {shape}")
        if code not in FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {name} in {f} has dtype {code}, which cannot be cast to {dtype}: "
                f"obinfer needs floating-point weights ({', '.join(FLOAT_DTYPES)})"
            )
    state = read_state_dict(files, dtype, device, only=set(expected))
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval().requires_grad_(False)


def _short(names: list[str], n: int = 4) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
