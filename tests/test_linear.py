"""obinfer.models.linear: the split (inner-dimension blocks, one bmm) product against references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from obinfer.models.linear import SPLIT_MAX_ROWS, Linear, linear, split_blocks


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
