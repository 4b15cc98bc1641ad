"""Peak memory of `load_model`: a bfloat16 load of a float32 checkpoint holds less than a float32 load.

Each load runs in its own subprocess, which reports its peak resident memory after every weight has been
touched (a float32 load maps the file lazily: its pages count once they are read). The peak is the
kernel's high-water mark of the subprocess's own memory (`VmHWM` in /proc/self/status), not
`getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries ru_maxrss over `fork` + `exec`, so a subprocess of
pytest would report pytest's own peak. The checkpoint is synthetic (random weights, 107 M parameters at a realistic shape: hidden 1024, 8 layers),
written once per module in a temporary directory.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

C, F, V, H, KV, D, L = 1024, 2816, 16384, 16, 4, 64, 8

# Prints (peak RSS before the load, peak RSS after the load and a pass over every weight), in KiB.
PEAK = """
import sys
import torch
from obinfer.config import ModelConfig
from obinfer.models.llama import Transformer
from obinfer.weights import load_model

def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

with torch.device("meta"):  # the first meta build imports torch's reference ops: not the load's memory
    Transformer(ModelConfig.tiny())
before = peak_kib()
model = load_model(sys.argv[1], dtype=sys.argv[2])
assert model.dtype == getattr(torch, sys.argv[2])
with torch.no_grad():
    total = sum(float(p.sum()) for p in model.parameters())  # read every weight
print(before, peak_kib())
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": C,
           "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H,
           "num_key_value_heads": KV, "head_dim": D, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32"}  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                   p + "self_attn.q_proj.weight": (H * D, C), p + "self_attn.k_proj.weight": (KV * D, C),
                   p + "self_attn.v_proj.weight": (KV * D, C), p + "self_attn.o_proj.weight": (C, H * D),
                   p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
                   p + "mlp.down_proj.weight": (C, F)}  # fmt: skip
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    save_file(state, d / "model.safetensors")
    return d, sum(t.numel() for t in state.values())


def _peak_kib(model_dir, dtype: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(model_dir), dtype], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    before, after = map(int, out.stdout.split())
    return before, after


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_bfloat16_load_peaks_below_float32_load(checkpoint):
    model_dir, n_params = checkpoint
    base32, peak32 = _peak_kib(model_dir, "float32")
    base16, peak16 = _peak_kib(model_dir, "bfloat16")
    grew32, grew16 = peak32 - base32, peak16 - base16
    assert grew32 * 1024 >= 0.9 * 4 * n_params  # the float32 weights really became resident
    assert peak16 < peak32, (peak16, peak32)
    # bf16 weights (half the float32 ones) plus one read chunk; loading through a float32 copy of the
    # file (mapped while casting) would need 1.5 times the float32 load
    assert grew16 < 0.75 * grew32, (grew16, grew32)


def test_loading_a_model_imports_no_symbolic_math(tiny_llama_dir):
    """Building the model on the meta device must not run a meta op that imports sympy (torch's
    symbolic-shape machinery, ~1.2 s of every command's start-up); the loaded model still runs."""
    code = (
        "import sys, torch\n"
        "from obinfer.weights import load_model\n"
        f"m = load_model({str(tiny_llama_dir)!r})\n"
        "assert torch.isfinite(m.inv_freq).all() and m.inv_freq.device.type == 'cpu'\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
