"""What the machine can do fast: native bfloat16 matrix multiplication (for ``--dtype auto`` and int8).

On the CPU, torch runs bfloat16 matmuls in hardware only where the CPU has AVX512_BF16 or AMX-BF16
(x86) or the BF16 extension (ARM); elsewhere they are emulated and slower than float32. CUDA devices of
compute capability 8.0 and later have it. The CPU flags are read from ``/proc/cpuinfo`` (Linux); where
that file does not exist (macOS, Windows) the CPU counts as having none, which picks float32: the safe
choice.
"""

from __future__ import annotations

import functools
from pathlib import Path

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags; ARM's "Features: ... bf16"


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor listed in `cpuinfo` (empty if unreadable)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: str = "cpu") -> bool:
    """True where bfloat16 matmuls run in hardware on `device` ("cpu", "cuda", "cuda:N", "mps")."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if dev.type == "cpu":
        return bool(cpu_flags() & BF16_CPU_FLAGS)
    return False


def auto_dtype(device: str = "cpu") -> str:
    """The dtype of ``--dtype auto``: "bfloat16" where `native_bf16(device)`, else "float32"."""
    return "bfloat16" if native_bf16(device) else "float32"
