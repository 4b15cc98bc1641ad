"""Weight-only int8 (obinfer/quantize.py) and the hardware probe behind --dtype auto (obinfer/hardware.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from obinfer import hardware
from obinfer.errors import UserError
from obinfer.generate import generate
from obinfer.loading import load_dir, resolve_dtype
from obinfer.quantize import PACKED_MAX_ROWS, Int8Embedding, Int8Linear, quantize_int8, quantize_rows
from obinfer.tokenizer import load_tokenizer
from obinfer.weights import load_model


def test_quantize_rows_rounds_each_weight_to_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(37, 53) * torch.rand(37, 1) * 5
    w[3] = 0.0  # an all-zero row gets a tiny scale, not a division by zero
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and q[3].abs().sum() == 0
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())
    # the largest weight of each nonzero row is represented exactly (it sets the scale)
    rows = torch.arange(37) != 3
    big = w.abs().argmax(1)
    torch.testing.assert_close((q.float() * scale[:, None])[rows, big[rows]], w[rows, big[rows]])


@pytest.mark.parametrize(
    "rows", [1, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 70]
)  # packed kernel and dequantized
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_the_dequantized_weight(rows, compute):
    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 40, bias=True)
    q8 = Int8Linear.from_linear(lin, compute)
    x = torch.randn(2, rows, 96)
    ref = F.linear(x.to(compute).float(), q8.dequantized().to(compute).float()) + lin.bias
    tol = dict(rtol=1e-5, atol=1e-5) if compute == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    got = q8(x)
    assert got.shape == (2, rows, 40) and got.dtype == x.dtype
    torch.testing.assert_close(got, ref.detach(), **tol)


def _dequantized_copy(model_dir):
    """The float32 model with every quantized weight replaced by its dequantized value: what int8 with a
    float32 compute dtype must reproduce."""
    ref = load_model(model_dir)
    q = quantize_int8(load_model(model_dir), torch.float32)
    with torch.no_grad():
        ref_modules = dict(ref.named_modules())
        for name, qmod in q.named_modules():
            if isinstance(qmod, Int8Linear):
                ref_modules[name].weight.copy_(qmod.dequantized())
    return ref, q


def test_quantized_model_matches_its_dequantized_weights(tiny_dir):
    ref, q = _dequantized_copy(tiny_dir)
    names = [n for n, m in q.named_modules() if isinstance(m, Int8Linear)]
    assert len(names) == 7 * q.cfg.n_layers + 1  # q, k, v, o, gate, up, down per layer; the LM head
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert q.dtype == torch.float32 and q.quantization == "int8"
    if q.cfg.tie_word_embeddings:  # the embedding reads the head's int8 rows, nothing else is kept
        assert isinstance(q.model.embed_tokens, Int8Embedding)
        assert q.model.embed_tokens.weight is q.lm_head.weight
        with torch.no_grad():
            ref.model.embed_tokens.weight.copy_(q.lm_head.dequantized())
    ids = torch.randint(0, q.cfg.vocab_size, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(q(ids, q.new_cache(2)), ref(ids, ref.new_cache(2)), rtol=1e-4, atol=1e-4)
        # decoding (the packed kernel's path) after a prefill (the dequantized path)
        cq, cr = q.new_cache(2), ref.new_cache(2)
        q(ids, cq), ref(ids, cr)
        nxt = ids[:, :1]
        torch.testing.assert_close(q(nxt, cq), ref(nxt, cr), rtol=1e-4, atol=1e-4)


def test_quantized_default_model_stays_close_and_answers(default_model_dir):
    """The real model: per-position KL to float32 small, top-1 mostly agrees, the greedy answer holds."""
    tok = load_tokenizer(default_model_dir)
    ref, _ = load_dir(default_model_dir)
    q, _ = load_dir(default_model_dir, quantize="int8")
    text = "The Eiffel Tower is in Paris. It was built for the 1889 World's Fair and is 330 metres tall. " * 6
    ids = torch.tensor([tok.encode(text)])
    with torch.inference_mode():
        lp_ref = ref(ids, ref.new_cache()).float().log_softmax(-1)
        lp_q = q(ids, q.new_cache()).float().log_softmax(-1)
    kl = (lp_ref.exp() * (lp_ref - lp_q)).sum(-1)
    agree = (lp_ref.argmax(-1) == lp_q.argmax(-1)).float().mean()
    assert float(kl.mean()) < 0.02 and float(agree) >= 0.85, (float(kl.mean()), float(agree))
    prompt = tok.encode(tok.apply_chat([{"role": "user", "content": "What is the capital of France?"}]))
    answers = [
        tok.decode(list(generate(m, prompt, max_new_tokens=20, stop_ids=tok.stop_ids))) for m in (ref, q)
    ]
    assert all("Paris" in a for a in answers), answers


def test_unknown_quantization_and_dtype_are_one_line_errors(tiny_llama_dir):
    with pytest.raises(UserError, match="unknown quantization 'int4'"):
        load_dir(tiny_llama_dir, quantize="int4")
    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    r = subprocess.run(
        [sys.executable, "-m", "obinfer", "generate", "--model", str(tiny_llama_dir), "--quantize", "int4",
         "--prompt", "hi"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "invalid choice: 'int4'" in r.stderr and "Traceback" not in r.stderr


def test_cpu_flags_and_auto_dtype(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert hardware.cpu_flags(str(info)) == {"fpu", "sse2", "avx2", "avx512f"}
    assert hardware.cpu_flags(str(tmp_path / "missing")) == frozenset()
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert "bf16" in hardware.cpu_flags(str(arm))
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert hardware.auto_dtype("cpu") == "float32" and resolve_dtype("auto") == "float32"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert hardware.auto_dtype("cpu") == "bfloat16" and resolve_dtype("auto") == "bfloat16"
    assert resolve_dtype("float16") == "float16"


def test_float32_cpu_weights_are_input_major_with_identical_outputs(tiny_dir):
    model = load_model(tiny_dir)
    fused = [m for b in model.model.layers for m in (b.self_attn.fused_qkv, b.mlp.fused_gate_up)]
    parts = {id(m) for b in model.model.layers for m in (b.self_attn.q_proj, b.self_attn.k_proj,
                                                         b.self_attn.v_proj, b.mlp.gate_proj, b.mlp.up_proj)}  # fmt: skip
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in parts]
    assert linears and all(m.weight.t().is_contiguous() for m in linears)
    assert all(f.op.keywords["weight"].t().is_contiguous() for f in fused)  # the fused products too
    if model.cfg.tie_word_embeddings:
        assert model.model.embed_tokens.weight is model.lm_head.weight
    plain = load_model(tiny_dir)
    for m in plain.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight = torch.nn.Parameter(m.weight.detach().contiguous(), requires_grad=False)
    if plain.cfg.tie_word_embeddings:
        plain.model.embed_tokens.weight = plain.lm_head.weight
    assert not plain.lm_head.weight.t().is_contiguous()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 7))
    with torch.inference_mode():
        ca, cb = model.new_cache(2), plain.new_cache(2)
        torch.testing.assert_close(model(ids, ca), plain(ids, cb), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids[:, :1], ca), plain(ids[:, :1], cb), rtol=1e-5, atol=1e-5)
    bf16 = load_model(tiny_dir, dtype="bfloat16")
    assert all(m.weight.is_contiguous() for m in bf16.modules() if isinstance(m, torch.nn.Linear))
