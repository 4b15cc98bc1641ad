"""obinfer.models.linear: the split (inner-dimension blocks, one bmm) product against references."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from obinfer.models.linear import SPLIT_MAX_ROWS, Linear, linear, one_row_bfloat16, split_blocks


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def input_major(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous().t()


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("rows", [1, 3, SPLIT_MAX_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_split_product_matches_float64(threads, P, rows, bias):
    threads(P)
    g = torch.Generator().manual_seed(rows + P)
    w = input_major(torch.randn(96, 512, generator=g))
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(2, rows, 512, generator=g)[:1]  # (1, rows, 512)
    assert split_blocks(x, w) == P
    got = linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == (1, rows, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=0, atol=1e-4)


def test_unsplit_cases_are_f_linear_bit_for_bit(threads):
    threads(2)
    w = input_major(torch.randn(64, 256))
    many = torch.randn(SPLIT_MAX_ROWS + 1, 256)
    assert split_blocks(many, w) == 1  # a prefill's rows
    assert torch.equal(linear(many, w), F.linear(many, w))
    one = torch.randn(1, 256)
    out_major = w.contiguous()
    assert split_blocks(one, out_major) == 1  # the blocks would not be views
    bf = input_major(w.bfloat16())
    assert split_blocks(one.bfloat16(), bf) == 1
    assert torch.equal(linear(one.bfloat16(), bf), F.linear(one.bfloat16(), bf))
    assert split_blocks(torch.randn(1, 100), input_major(torch.randn(8, 100))) == 1  # too narrow to split
    assert split_blocks(torch.randn(1, 258), input_major(torch.randn(8, 258))) == 2
    assert split_blocks(torch.randn(1, 257), input_major(torch.randn(8, 257))) == 1  # not divisible
    threads(1)
    assert split_blocks(one, w) == 1
    assert torch.equal(linear(one, w), F.linear(one, w))


@contextlib.contextmanager
def onednn(enabled: bool):  # torch.backends.mkldnn.flags() also sets TF32 flags, with a warning
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def test_one_bfloat16_row_skips_onednn_and_sets_the_flag_back(threads):
    """One bfloat16 row with a row-major weight is multiplied with oneDNN off (torch's MKL path): the same
    values as F.linear computed that way, bit for bit, within bfloat16 rounding of float64, and torch's
    oneDNN flag is as it was afterwards, also after an error and when the user had turned it off."""
    threads(2)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 256, generator=g).bfloat16()  # row-major (out, in), as a bfloat16 model loads
    b = torch.randn(300, generator=g).bfloat16()
    x = torch.randn(1, 1, 256, generator=g).bfloat16()
    mkl = torch.backends.mkl.is_available()
    assert one_row_bfloat16(x, w) == mkl
    assert not one_row_bfloat16(torch.randn(2, 256).bfloat16(), w)  # two rows: oneDNN
    assert not one_row_bfloat16(x.half(), w.half()) and not one_row_bfloat16(x.float(), w.float())
    assert not one_row_bfloat16(x, w.t().contiguous().t())  # input-major: the slow layout of that path
    got = linear(x, w, b)
    with onednn(not mkl):
        ref = F.linear(x, w, b)
    assert torch.equal(got, ref)
    exact = F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(got.double(), exact, rtol=1e-2, atol=0.1)  # bfloat16 outputs of size ~16
    assert torch.backends.mkldnn.enabled
    with pytest.raises(RuntimeError):  # a bias of the wrong size: F.linear raises inside the switch
        linear(x, w, b[:7])
    assert torch.backends.mkldnn.enabled
    with onednn(False):
        linear(x, w, b)
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled


def test_module_keeps_nn_linear_parameters_and_gradients(threads):
    threads(2)
    lin = Linear(256, 32)
    assert isinstance(lin, torch.nn.Linear)
    assert set(lin.state_dict()) == {"weight", "bias"}
    lin.weight = torch.nn.Parameter(input_major(lin.weight.detach()))
    x = torch.randn(4, 256, requires_grad=True)
    lin(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, lin.weight.detach(), lin.bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- fused projections
def _unfused_copy(model):
    other = copy.deepcopy(model)
    for b in other.model.layers:
        b.self_attn.fused_qkv, b.mlp.fused_gate_up = None, None
    return other


def _run(model, ids):
    with torch.inference_mode():
        cache = model.new_cache(ids.shape[0])
        return torch.cat([model(ids, cache), model(ids[:, :1], cache)], dim=1)  # a prefill, then a step


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_models_fuse_qkv_and_gate_up_without_a_second_copy(tiny_dir, dtype):
    from obinfer.weights import load_model, read_state_dict, safetensors_files

    model = load_model(tiny_dir, dtype=dtype)
    for b in model.model.layers:
        a, m = b.self_attn, b.mlp
        for f, parts in (
            (a.fused_qkv, (a.q_proj, a.k_proj, a.v_proj)),
            (m.fused_gate_up, (m.gate_proj, m.up_proj)),
        ):
            w = f.op.keywords["weight"]
            assert w.shape == (sum(p.out_features for p in parts), parts[0].in_features)
            for p in parts:  # views into the fused storage, not copies
                assert p.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
            assert (f.op.keywords["bias"] is None) == (parts[0].bias is None)
    # the state dict is the checkpoint's, name for name and value for value
    ref = read_state_dict(safetensors_files(tiny_dir), getattr(torch, dtype), "cpu")
    sd = model.state_dict()
    for name, t in ref.items():
        if name in sd:
            assert torch.equal(sd[name], t), name
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    tol = 1e-5 if dtype == "float32" else 2e-2
    torch.testing.assert_close(_run(model, ids), _run(_unfused_copy(model), ids), rtol=tol, atol=tol)


def test_int8_models_fuse_too(tiny_dir):
    from obinfer.quantize import Int8Linear, quantize_int8
    from obinfer.weights import load_model

    model = quantize_int8(load_model(tiny_dir), compute_dtype=torch.float32)
    a = model.model.layers[0].self_attn
    assert isinstance(a.fused_qkv.op, Int8Linear) and a.fused_qkv.op.out_features == sum(
        p.out_features for p in (a.q_proj, a.k_proj, a.v_proj)
    )
    assert a.k_proj.weight.data_ptr() == a.fused_qkv.op.weight[a.q_proj.out_features].data_ptr()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_run(model, ids), _run(_unfused_copy(model), ids), rtol=1e-5, atol=1e-5)


def test_a_replaced_weight_is_used_not_the_stale_fused_one(tiny_llama_dir):
    from obinfer.weights import load_model

    model = load_model(tiny_llama_dir)
    a = model.model.layers[0].self_attn
    a.q_proj.weight = torch.nn.Parameter(torch.randn_like(a.q_proj.weight), requires_grad=False)
    assert a.fused_qkv(torch.randn(1, 1, a.q_proj.in_features)) is None  # falls back to the parts
    ids = torch.randint(0, model.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_run(model, ids), _run(_unfused_copy(model), ids), rtol=1e-5, atol=1e-5)


def test_converting_a_fused_model_fuses_the_converted_weights(tiny_dir):
    from obinfer.weights import load_model

    model = load_model(tiny_dir)
    old = model.model.layers[0].self_attn.fused_qkv.op.keywords["weight"]
    assert model.to(torch.bfloat16) is model
    a = model.model.layers[0].self_attn
    w = a.fused_qkv.op.keywords["weight"]
    assert w.dtype == torch.bfloat16 and w.untyped_storage().data_ptr() != old.untyped_storage().data_ptr()
    assert a.q_proj.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()  # views again
    ids = torch.randint(0, model.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_run(model, ids), _run(_unfused_copy(model), ids), rtol=2e-2, atol=2e-2)
