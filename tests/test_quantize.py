"""Weight-only int8 and int4 (obinfer/quantize.py) and the hardware probe behind --dtype auto
(obinfer/hardware.py)."""

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
from obinfer.quantize import (
    INT4_GROUP,
    INT4_PACK_ROWS,
    PACKED_MAX_ROWS,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    check_quantize,
    dequantize_groups,
    int4_fits,
    quantize_groups,
    quantize_int4,
    quantize_int8,
    quantize_rows,
)
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


EIFFEL = "The Eiffel Tower is in Paris. It was built for the 1889 World's Fair and is 330 metres tall. " * 6


def _closeness(model_dir, ref, tok, quantize: str):  # noqa: ANN001, ANN202
    """(quantized model, mean per-position KL to the float32 `ref`, top-1 agreement) on EIFFEL."""
    q, _ = load_dir(model_dir, quantize=quantize)
    ids = torch.tensor([tok.encode(EIFFEL)])
    with torch.inference_mode():
        lp_ref = ref(ids, ref.new_cache()).float().log_softmax(-1)
        lp_q = q(ids, q.new_cache()).float().log_softmax(-1)
    kl = (lp_ref.exp() * (lp_ref - lp_q)).sum(-1)
    return q, float(kl.mean()), float((lp_ref.argmax(-1) == lp_q.argmax(-1)).float().mean())


def test_quantized_default_model_stays_close_and_answers(default_model_dir):
    """The real model: per-position KL to float32 small, top-1 mostly agrees, the greedy answer holds."""
    tok = load_tokenizer(default_model_dir)
    ref, _ = load_dir(default_model_dir)
    q, kl, agree = _closeness(default_model_dir, ref, tok, "int8")
    assert kl < 0.02 and agree >= 0.85, (kl, agree)
    prompt = tok.encode(tok.apply_chat([{"role": "user", "content": "What is the capital of France?"}]))
    answers = [
        tok.decode(list(generate(m, prompt, max_new_tokens=20, stop_ids=tok.stop_ids))) for m in (ref, q)
    ]
    assert all("Paris" in a for a in answers), answers


def test_unknown_quantization_and_dtype_are_one_line_errors(tiny_llama_dir):
    with pytest.raises(UserError, match="unknown quantization 'int3'"):
        load_dir(tiny_llama_dir, quantize="int3")
    with pytest.raises(UserError, match="int4 runs on the CPU only.*cuda"):
        check_quantize("int4", "cuda")
    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    r = subprocess.run(
        [sys.executable, "-m", "obinfer", "generate", "--model", str(tiny_llama_dir), "--quantize", "int3",
         "--prompt", "hi"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "invalid choice: 'int3'" in r.stderr and "Traceback" not in r.stderr


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


# ------------------------------------------------------------------------------------------------ int4
def test_quantize_groups_rounds_each_weight_to_half_a_step():
    torch.manual_seed(2)
    w = torch.randn(48, 4 * INT4_GROUP) * torch.rand(48, 1) * 3
    w[5, :INT4_GROUP] = 0.7  # a constant group: its range is 0
    q, so = quantize_groups(w)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) == 15
    assert so.shape == (4, 48, 2) and so.dtype == torch.bfloat16
    step = so[..., 0].float().t().repeat_interleave(INT4_GROUP, 1)  # (out, in)
    err = (dequantize_groups(q, so) - w).abs()
    lo = so[..., 1].float().t().repeat_interleave(INT4_GROUP, 1)
    bf16_offset = (lo - w.view(48, 4, INT4_GROUP).amin(-1).repeat_interleave(INT4_GROUP, 1)).abs()
    assert bool((err <= step / 2 + bf16_offset + 1e-6).all())
    assert float(err[5, :INT4_GROUP].max()) < 0.7 / 128  # only the offset's bfloat16 rounding


def test_a_weight_on_a_4_bit_grid_per_group_comes_back_exactly():
    """A model shipped in 4-bit blocks of 32 (llama.cpp's Q4_1) is kept as it is, not rounded again."""
    torch.manual_seed(3)
    steps = torch.rand(16, 2, 1).mul(0.1).to(torch.bfloat16).float()
    offs = torch.randn(16, 2, 1).to(torch.bfloat16).float()
    codes = torch.randint(0, 16, (16, 2, INT4_GROUP)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # each group spans its whole grid
    w = (codes * steps + offs).view(16, 2 * INT4_GROUP)
    q, so = quantize_groups(w)
    assert torch.equal(q.view(16, 2, -1).float(), codes)
    torch.testing.assert_close(dequantize_groups(q, so), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 5, 70])
def test_int4_linear_equals_its_dequantized_weight(rows):
    torch.manual_seed(4)
    lin = torch.nn.Linear(3 * INT4_GROUP, 48, bias=True)
    q4 = Int4Linear.from_linear(lin)
    assert q4.weight.dtype == torch.uint8 and q4.weight.shape == (48, 3 * INT4_GROUP // 2)
    deq = dequantize_groups(*quantize_groups(lin.weight))
    x = torch.randn(2, rows, 3 * INT4_GROUP)
    ref = F.linear(x.to(torch.bfloat16).float(), deq) + lin.bias
    got = q4(x)
    assert got.shape == (2, rows, 48) and got.dtype == x.dtype
    torch.testing.assert_close(got, ref.detach(), rtol=2e-2, atol=2e-2)


def test_the_int4_kernel_packs_each_block_of_rows_on_its_own():
    """What `Int4Linear.fuse` relies on: packing stacked rows equals stacking the packed rows when every
    part but the last fills whole blocks of INT4_PACK_ROWS rows, and not otherwise. (The kernel's own
    block is 64 rows with AVX-512 and 32 with AVX2 or none: 64 suits both; CI runs on either.)"""
    pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu

    def stacked_equal(*rows: int) -> bool:
        qs = [torch.randint(0, 16, (n, 2 * INT4_GROUP), dtype=torch.int32) for n in rows]
        return torch.equal(pack(torch.cat(qs), 1), torch.cat([pack(q, 1) for q in qs]))

    assert stacked_equal(INT4_PACK_ROWS, 2 * INT4_PACK_ROWS, 48) and stacked_equal(3 * INT4_PACK_ROWS, 16)
    assert not stacked_equal(16, INT4_PACK_ROWS)


def _int4_parts(*outs: int, bias: bool = False) -> list[Int4Linear]:
    torch.manual_seed(6)
    return [Int4Linear.from_linear(torch.nn.Linear(2 * INT4_GROUP, n, bias=bias)) for n in outs]


@pytest.mark.parametrize("bias", [False, True])
def test_int4_fusion_stacks_whole_blocks_and_refuses_the_rest(bias):
    parts = _int4_parts(INT4_PACK_ROWS, 2 * INT4_PACK_ROWS, 48, bias=bias)
    x = torch.randn(3, 2 * INT4_GROUP)
    separate = torch.cat([p(x) for p in parts], -1)
    fused = Int4Linear.fuse(parts)
    assert fused is not None and fused.out_features == 3 * INT4_PACK_ROWS + 48
    assert torch.equal(fused(x), separate) and torch.equal(torch.cat([p(x) for p in parts], -1), separate)
    assert parts[1].weight.data_ptr() == fused.weight[INT4_PACK_ROWS].data_ptr()  # views, not copies
    assert Int4Linear.fuse(_int4_parts(32, INT4_PACK_ROWS)) is None  # a part ends inside a block


def test_int4_fits_the_kernels_shapes():
    def lin(i: int, o: int) -> torch.nn.Linear:
        return torch.nn.Linear(i, o, bias=False)

    assert int4_fits(lin(3 * INT4_GROUP, 48), "cpu")
    assert not int4_fits(lin(3 * INT4_GROUP + 8, 48), "cpu")  # inputs: whole groups
    assert not int4_fits(lin(3 * INT4_GROUP, 40), "cpu")  # outputs: a multiple of 16
    assert not int4_fits(lin(3 * INT4_GROUP, 48), "cuda")


def test_int4_model_layers_head_and_fusion(tiny_dir):
    """The decoder's layers int4, the LM head (and a tied embedding) int8; the whole model equal to the
    float32 model holding the same quantized values, to bfloat16 rounding; prefill then a decoding step
    equal to the one-shot forward."""
    q = quantize_int4(load_model(tiny_dir))
    assert q.quantization == "int4"
    for block in q.model.layers:
        assert all(isinstance(m, Int4Linear) for p in (block.self_attn, block.mlp) for m in p.children())
    assert isinstance(q.lm_head, Int8Linear)
    ref = load_model(tiny_dir)
    with torch.no_grad():
        refm = dict(ref.named_modules())
        for name, mod in q.named_modules():
            if isinstance(mod, Int4Linear):
                refm[name].weight.copy_(dequantize_groups(*quantize_groups(refm[name].weight)))
            elif isinstance(mod, Int8Linear):
                refm[name].weight.copy_(mod.dequantized())
        if q.cfg.tie_word_embeddings:
            assert isinstance(q.model.embed_tokens, Int8Embedding)
            ref.model.embed_tokens.weight.copy_(q.lm_head.dequantized())
    ids = torch.randint(0, q.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))

    def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:  # bfloat16 activations: ~1e-2 relative
        return float((a - b).norm() / b.norm())

    with torch.inference_mode():
        got = q(ids, q.new_cache(2))
        assert rel_err(got, ref(ids, ref.new_cache(2))) < 2e-2  # measured 0.008-0.010
        c = q.new_cache(2)
        q(ids[:, :-1], c)
        assert rel_err(q(ids[:, -1:], c), got[:, -1:]) < 1e-2


def test_int4_default_model_stays_close_and_answers(default_model_dir):
    """The real model (shipped as a GGUF in 4-bit blocks of 32): int4 in groups of 32 keeps it almost
    exactly, closer to float32 than int8's one scale per row."""
    tok = load_tokenizer(default_model_dir)
    ref, _ = load_dir(default_model_dir)
    q4, kl, agree = _closeness(default_model_dir, ref, tok, "int4")
    _, kl8, _ = _closeness(default_model_dir, ref, tok, "int8")
    assert kl < 0.02 and agree >= 0.9 and kl < kl8, (kl, agree, kl8)
    # (the chat question of the int8 test is a near tie for the first token in float32 itself: "The"
    # 0.15 against "L" 0.14; int4 picks "L'...". A completion the model is sure of:)
    prompt = tok.encode(EIFFEL + "The Eiffel Tower is in the city of")
    answer = tok.decode(list(generate(q4, prompt, max_new_tokens=4, stop_ids=tok.stop_ids)))
    assert answer.startswith(" Paris"), answer
