"""The one way to load a model: a name, a directory or a hub id -> (model, tokenizer).

``load()`` is what ``obinfer.load``, every CLI command and the examples use::

    model, tok = load()                              # the default named model (built on first use)
    model, tok = load("smollm2-135m-instruct")       # a named model (obinfer.catalog)

A Hugging Face-layout directory (``load("path/to/checkpoint")``) or a hub id
(``load("Qwen/Qwen2.5-0.5B-Instruct")``, downloaded once, safetensors only) work the same way.

Resolution order for a string: an existing directory; a named model; a directory of that name under the
weights directory (an earlier download); a hub id ``owner/name``. A ``.gguf`` file is refused with the
command that converts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from obinfer.catalog import DEFAULT_MODEL, MODELS, ensure_model
from obinfer.errors import UserError
from obinfer.storage import default_weights_dir


def resolve_model(model: str | Path | None = None, weights_dir: str | Path | None = None) -> Path:
    """The checkpoint directory for a model argument (None: the default named model)."""
    wdir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    if model is None:
        return ensure_model(DEFAULT_MODEL, wdir)
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if text.lower() in MODELS:
        return ensure_model(text, wdir)
    local = wdir / text.split("/")[-1].lower()
    if (local / "config.json").is_file():
        return local
    if path.suffix == ".gguf":
        raise UserError(
            f"{text} is a GGUF file: convert it first with `obinfer convert-gguf {text} <out dir>`"
        )
    if path.exists():
        raise UserError(f"{text} is a file; --model takes a checkpoint directory, a model name or a hub id")
    if text.count("/") == 1:
        from obinfer.hub import download

        return download(text, wdir)
    raise UserError(
        f"model not found: {text} (give a checkpoint directory, a hub id like org/name, "
        f"or a named model: {', '.join(sorted(MODELS))})"
    )


def check_device(device: str) -> None:
    """A clear error for a malformed device or CUDA/MPS that this machine does not have."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(
            f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} requested but MPS is not available on this machine")


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """The dtype a --dtype value stands for: "auto" is bfloat16 where `device` has native bfloat16
    matmuls (AMX / AVX512_BF16 CPUs, CUDA), float32 elsewhere (see obinfer/hardware.py)."""
    from obinfer.hardware import auto_dtype

    if dtype not in DTYPE_CHOICES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPE_CHOICES)}")
    return auto_dtype(device) if dtype == "auto" else dtype


def load_dir(
    model_dir: str | Path, dtype: str = "float32", device: str = "cpu", quantize: str | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) from a checkpoint directory (dtype and quantize as in `load`)."""
    from obinfer.quantize import check_quantize, quantize_int4, quantize_int8
    from obinfer.tokenizer import load_tokenizer
    from obinfer.weights import load_model

    check_quantize(quantize, device)
    model = load_model(model_dir, dtype=resolve_dtype(dtype, device), device=device)
    if quantize == "int8":
        quantize_int8(model)
    elif quantize == "int4":
        quantize_int4(model)
    return model, load_tokenizer(model_dir)


def load(
    model: str | Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    weights_dir: str | Path | None = None,
    quantize: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a name, directory or hub id (None: the default model).

    Args:
        model: see the module docstring.
        dtype: "float32", "bfloat16", "float16" or "auto" (`resolve_dtype`).
        device: "cpu", "cuda", "cuda:N", "mps".
        weights_dir: where named models and downloads live (default :func:`obinfer.storage.default_weights_dir`).
        quantize: None, "int8" or "int4" (weight-only, obinfer/quantize.py; int4 on the CPU only).
    """
    check_device(device)
    resolve_dtype(dtype, device)
    from obinfer.quantize import check_quantize

    check_quantize(quantize, device)  # before anything is downloaded or converted
    return load_dir(resolve_model(model, weights_dir), dtype, device, quantize)
