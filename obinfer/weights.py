"""Load a Hugging Face checkpoint directory (config.json + safetensors) into a `Transformer`.

The model is built on the `meta` device (no memory), the safetensors tensors are read and
`load_state_dict(..., assign=True)` adopts them: nothing is allocated twice. A tensor already stored in
the requested dtype (on the CPU) is a zero-copy view of the memory-mapped file; any other (a float32 file
loaded as bfloat16, or a load onto a GPU) is read with plain file reads, chunk by chunk, and cast into
its final buffer, so the peak memory of a bfloat16 load is the bfloat16 model plus one chunk, not the
float32 file as well. Pickled `.bin` checkpoints are refused.

Order of the checks, so that a bad checkpoint fails fast and before any weight is read: the dtype and
device, then config.json (every key, see `obinfer/config.py`), then the safetensors headers (a truncated
or corrupt file, missing / unexpected / duplicated tensors, shapes that do not match the config, dtypes
that are not floating point); only then are the tensors read.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from obinfer.config import ModelConfig
from obinfer.errors import ObinferError, UserError
from obinfer.models.linear import fuse_projections
from obinfer.models.llama import Transformer, rope_inv_freq

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors dtype codes obinfer casts to the model dtype (weights must be floating point)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# safetensors dtype code -> torch dtype, for the tensors read by chunks (others go through safe_open)
_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_CHUNK_BYTES = 32 << 20  # bytes read (then cast) at once by a converting load


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


def _data_offsets(f: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype code, shape, first byte, end byte) in the file, from the safetensors header."""
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n).decode("utf-8"))
    header.pop("__metadata__", None)
    return {
        name: (e["dtype"], tuple(e["shape"]), 8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1])
        for name, e in header.items()
    }


def _read_cast(
    fh: BinaryIO,
    begin: int,
    end: int,
    src: torch.dtype,
    shape: tuple[int, ...],
    out_dtype: torch.dtype,
    device: str | torch.device,
    buf: torch.Tensor,
) -> torch.Tensor:
    """Read the bytes [begin, end) of `fh` (a tensor stored as `src`) by chunks of `buf` into a new
    tensor of `out_dtype` on `device`: the memory held is the result plus `buf`."""
    out = torch.empty(shape, dtype=out_dtype, device=device)
    flat = out.view(-1)
    size = torch.empty((), dtype=src).element_size()
    if (end - begin) != flat.numel() * size:
        raise ValueError(f"{end - begin} bytes for {flat.numel()} elements of {src}")
    per = len(buf) // size
    fh.seek(begin)
    for i in range(0, flat.numel(), per):
        k = min(per, flat.numel() - i)
        chunk = buf[: k * size]
        view, got = memoryview(chunk.numpy()), 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                raise ValueError(f"the file ends {len(view) - got} bytes early")
            got += n
        flat[i : i + k].copy_(chunk.view(src))
    return out


def read_state_dict(
    files: list[Path],
    dtype: torch.dtype,
    device: str | torch.device,
    only: set[str] | frozenset[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of the shards (those named in `only`, or all), floating ones cast to dtype on device.

    A tensor that needs no cast and goes to the CPU is a zero-copy view of the memory-mapped file. Any
    other is read by chunks (`_CHUNK_BYTES`) with plain file reads and cast into its final buffer, one
    tensor after the other: the memory held is the result plus one chunk, never the source file as well
    (pages of a mapped file count in the resident memory until it is unmapped).
    """
    state: dict[str, torch.Tensor] = {}
    on_cpu = torch.device(device).type == "cpu"
    buf: torch.Tensor | None = None
    for f in files:
        name = None
        try:
            layout = _data_offsets(f)
            names = [n for n in layout if only is None or n in only]
            with open(f, "rb", buffering=0) as fh, safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in names:
                    code, shape, begin, end = layout[name]
                    src = _TORCH_DTYPES.get(code)
                    if src is None:  # a dtype obinfer never casts: let safetensors read it
                        t = sf.get_tensor(name)
                        state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                        continue
                    target = dtype if src.is_floating_point else src
                    if target == src and on_cpu:
                        state[name] = sf.get_tensor(name)  # zero copy: a view of the mapped file
                        continue
                    if buf is None:
                        buf = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
                    state[name] = _read_cast(fh, begin, end, src, shape, target, device, buf)
        except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, KeyError, struct.error) as e:
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
    if dtype == torch.float32 and torch.device(device).type == "cpu":
        input_major(model)
    model.eval().requires_grad_(False)
    return fuse_projections(model)


def input_major(model: Transformer) -> Transformer:
    """Store every float32 linear weight (out, in) input-major: the same values and shape, as the
    transpose of a contiguous (in, out) tensor. F.linear then multiplies by a contiguous (in, out)
    matrix, which torch's CPU float32 kernels stream faster for the few rows of a decoding step:
    measured on 2 Zen 4 cores, one-row products of SmolLM2's matrices 1.44x faster (its LM head 1.55x),
    decoding 1.12x at batch 1 and 1.3x at batch 8, prefill within 2%; outputs differ only by summation order. Not for
    bfloat16, whose one-row kernel is faster on the usual layout (0.8x this way)."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and not mod.weight.t().is_contiguous():
            mod.weight = torch.nn.Parameter(mod.weight.detach().t().contiguous().t(), requires_grad=False)
    if model.cfg.tie_word_embeddings:
        model.model.embed_tokens.weight = model.lm_head.weight
    return model


def weights_digest(model: Transformer) -> str:
    """sha256 identifying a model's weights (TRIM-KV gates files record it): its shape, every RMSNorm
    weight, and the first and last rows of every other weight, all rounded to bfloat16 (so a float32 and
    a bfloat16 load of one checkpoint agree). Computed once per model, before int8 quantization replaces
    the linear weights (`obinfer.quantize.quantize_int8` calls it first)."""
    cached = getattr(model, "_weights_digest", None)
    if cached is not None:
        return cached
    cfg = model.cfg
    h = hashlib.sha256(
        json.dumps(
            [cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size]
        ).encode()
    )
    for name, w in model.named_parameters():
        w = w.detach()
        part = w if w.dim() == 1 else torch.stack([w[0], w[-1]])
        h.update(name.encode())
        h.update(part.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    model._weights_digest = h.hexdigest()
    return model._weights_digest


def _short(names: list[str], n: int = 4) -> str:
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
