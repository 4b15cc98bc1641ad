"""Tests for obinfer.cache.allocators: spec Examples 2 and 4 (docs/scores.md section 6), loop references."""

import math

import pytest
import torch
from spec_vectors import EX2_K, EX2_Q, EX2_V

from obinfer.cache.allocators import adakv, keep_indices, n_kept_for, uniform
from obinfer.cache.scores import ScoreInputs, get_score, pool_scores

INF = math.inf


def kept(mask: torch.Tensor) -> list[list[list[int]]]:
    return [[idx.tolist() for idx in row] for row in keep_indices(mask)]


# ---------------------------------------------------------------- n_kept_for
def test_n_kept_for_kvpress_truncation():
    assert n_kept_for(100, 0.9) == 9  # int(100 * (1 - 0.9)) = int(9.999...) = 9
    assert n_kept_for(10, 0.4) == 6 and n_kept_for(10, 0.5) == 5
    assert n_kept_for(1, 0.99) == 1 and n_kept_for(0, 0.5) == 0 and n_kept_for(7, 1.0) == 1
    ns = torch.arange(0, 300)
    for cr in (0.0, 0.1, 0.25, 0.3, 0.7, 0.9, 0.95):
        expected = [max(1, int(n * (1 - cr))) if n >= 1 else 0 for n in range(300)]
        got = n_kept_for(ns, cr)
        assert got.dtype == torch.long and got.tolist() == expected
    with pytest.raises(ValueError, match="compression_ratio"):
        n_kept_for(10, 1.5)


# ---------------------------------------------------------------- Example 4
EX4 = torch.tensor(
    [[[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, INF, INF], [0.05, 0.04, 0.03, 0.02, 0.01, 0.3, INF, INF]]]
)


def test_example4():
    n_kept = n_kept_for(8, 0.5)
    assert n_kept == 4
    assert kept(adakv(EX4, n_kept, alpha=0.5)) == [[[0, 1, 2, 3, 6, 7], [6, 7]]]
    assert kept(adakv(EX4, n_kept, alpha=0.75)) == [[[0, 1, 2, 6, 7], [5, 6, 7]]]
    assert kept(uniform(EX4, n_kept)) == [[[0, 1, 6, 7], [0, 5, 6, 7]]]


# ---------------------------------------------------------------- Example 2 (SnapKV, window protected)


def snapkv_scores(name: str, pool: int | None) -> torch.Tensor:
    """Example 2 scores: context 0..7 scored (optionally avg-pooled), window 8, 9 protected with +inf."""
    inp = ScoreInputs(
        torch.tensor([EX2_Q]), torch.tensor([EX2_K]), torch.tensor([EX2_V]), torch.tensor([[8, 9]]),
        torch.arange(10).expand(1, 2, 10),
    )  # fmt: skip
    s = get_score(name)(inp)[..., :8]
    if pool:
        s = pool_scores(s, pool)
    return torch.cat([s, torch.full((1, 2, 2), INF)], -1)


def test_example2_snapkv_attn_pooled():
    s = snapkv_scores("attn", pool=3)
    expected = [[[1, 2, 4, 6, 8, 9], [1, 2, 5, 6, 8, 9]]]
    assert kept(uniform(s, n_kept_for(10, 0.4))) == expected
    assert kept(adakv(s, n_kept_for(10, 0.4), alpha=0.5)) == expected


@pytest.mark.parametrize("name", ["obv", "obk", "obkv"])
def test_example2_ob_scores_cr04(name):
    s = snapkv_scores(name, pool=None)
    expected = [[[1, 2, 3, 5, 8, 9], [1, 2, 6, 7, 8, 9]]]
    assert kept(uniform(s, n_kept_for(10, 0.4))) == expected
    assert kept(adakv(s, n_kept_for(10, 0.4), alpha=0.5)) == expected


def test_example2_cr05_budget_moves_between_heads():
    n_kept = n_kept_for(10, 0.5)
    obv_s, obkv_s = snapkv_scores("obv", None), snapkv_scores("obkv", None)
    assert kept(uniform(obv_s, n_kept)) == [[[2, 3, 5, 8, 9], [1, 2, 6, 8, 9]]]
    assert kept(adakv(obv_s, n_kept, alpha=0.2)) == [[[1, 2, 3, 5, 8, 9], [2, 6, 8, 9]]]
    assert kept(uniform(obkv_s, n_kept)) == [[[2, 3, 5, 8, 9], [1, 2, 6, 8, 9]]]
    assert kept(adakv(obkv_s, n_kept, alpha=0.2)) == [[[2, 3, 5, 8, 9], [1, 2, 6, 8, 9]]]


# ---------------------------------------------------------------- loop references
def ref_uniform_head(s: list[float], k: int) -> set[int]:
    """Top k valid slots of one head, ties -> lower index."""
    order = sorted((p for p in range(len(s)) if s[p] > -INF), key=lambda p: (-s[p], p))
    return set(order[:k])


def ref_adakv_row(s: list[list[float]], n_kept: int, n_safe: int) -> list[set[int]]:
    """Safeguard each head's top n_safe, then the row's top Hkv * n_kept (ties -> lower slot, then head)."""
    H, n = len(s), len(s[0])
    safe = [ref_uniform_head(s[h], n_safe) for h in range(H)]
    cand = [(h, p) for h in range(H) for p in range(n) if s[h][p] > -INF]
    cand.sort(key=lambda hp: (-(INF if hp[1] in safe[hp[0]] else s[hp[0]][hp[1]]), hp[1], hp[0]))
    out: list[set[int]] = [set() for _ in range(H)]
    for h, p in cand[: H * n_kept]:
        out[h].add(p)
    return out


def random_scores(seed: int, B: int = 2, H: int = 3, n: int = 16) -> torch.Tensor:
    """Distinct random scores with a few +inf (protected) and -inf (invalid) slots."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(B, H, n, generator=g)
    s[torch.rand(B, H, n, generator=g) < 0.15] = INF
    s[torch.rand(B, H, n, generator=g) < 0.2] = -INF
    return s


@pytest.mark.parametrize("seed", range(6))
def test_uniform_matches_reference(seed):
    s = random_scores(seed)
    n_kept = torch.tensor([5, 9])
    mask = uniform(s, n_kept)
    for b in range(2):
        for h in range(3):
            assert set(torch.nonzero(mask[b, h]).flatten().tolist()) == ref_uniform_head(
                s[b, h].tolist(), 5 + 4 * b
            )
    valid = s > -INF
    assert torch.equal(mask.sum(-1), torch.minimum(valid.sum(-1), n_kept[:, None]))
    assert not (mask & ~valid).any()


@pytest.mark.parametrize("min_safe", [0, 1])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_adakv_matches_reference(seed, alpha, min_safe):
    s = random_scores(seed + 10)
    n_kept = torch.tensor([4, 7])
    mask = adakv(s, n_kept, alpha=alpha, min_safe=min_safe)
    valid = s > -INF
    for b, k in enumerate(n_kept.tolist()):
        n_safe = max(min_safe, int(k * alpha))
        ref = ref_adakv_row(s[b].tolist(), k, n_safe)
        assert [set(torch.nonzero(m).flatten().tolist()) for m in mask[b]] == ref
        assert int(mask[b].sum()) == min(3 * k, int(valid[b].sum()))  # layer total H_kv * n_kept
        assert (mask[b].sum(-1) >= torch.clamp(valid[b].sum(-1), max=n_safe)).all()  # safeguard per head
    assert not (mask & ~valid).any()


def test_protected_always_survive_and_invalid_never_kept():
    s = torch.rand(2, 4, 20, generator=torch.Generator().manual_seed(42))
    s[..., -3:] = INF  # a protected window
    s[:, :, 0] = -INF
    s[1, 2, 5:9] = -INF
    for mask in (uniform(s, 5), adakv(s, 5), adakv(s, 5, alpha=0.0)):
        assert mask[..., -3:].all()
        assert not mask[..., 0].any()


def test_rows_are_independent():
    s = random_scores(7, B=2, H=3, n=16)
    n_kept = torch.tensor([3, 8])
    for fn in (uniform, lambda x, k: adakv(x, k, alpha=0.5)):
        both = fn(s, n_kept)
        for b in range(2):
            assert torch.equal(both[b : b + 1], fn(s[b : b + 1], n_kept[b : b + 1]))
            assert torch.equal(both[b : b + 1], fn(s[b : b + 1], int(n_kept[b])))


def test_fewer_valid_than_budget_keeps_all_valid():
    s = torch.tensor([[[0.3, -INF, 0.1, -INF], [-INF, -INF, -INF, -INF]]])
    assert kept(uniform(s, 3)) == [[[0, 2], []]]
    assert kept(adakv(s, 3)) == [[[0, 2], []]]


def test_ties_lower_index_wins():
    s = torch.zeros(1, 2, 6)
    assert kept(uniform(s, 2)) == [[[0, 1], [0, 1]]]
    assert kept(adakv(s, 2, alpha=0.0)) == [[[0, 1], [0, 1]]]  # lower slot first, then lower head
    s2 = torch.tensor([[[0.5, 0.2, 0.5, 0.2, 0.5]]])
    assert kept(uniform(s2, 2)) == [[[0, 2]]]
    assert kept(uniform(s2, 4)) == [[[0, 1, 2, 4]]]


def test_more_protected_than_budget_keeps_lowest_protected():
    s = torch.tensor([[[0.9, INF, INF, 0.8, INF]]])
    assert kept(uniform(s, 2)) == [[[1, 2]]]
    assert kept(adakv(s, 2)) == [[[1, 2]]]


def test_min_safe_one_matches_kvpress_safeguard():
    # n_kept = 4, alpha = 0.2: the spec's n_safe = int(0.8) = 0, kvpress's max(1, int(0.8)) = 1.
    s = torch.tensor(
        [[[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], [0.01, 0.05, 0.04, 0.03, 0.02] + [0.0] * 4]]
    )
    assert kept(adakv(s, 4, alpha=0.2)) == [[list(range(8)), []]]  # head 1 loses everything
    assert kept(adakv(s, 4, alpha=0.2, min_safe=1)) == [[list(range(7)), [1]]]  # its best slot is safe


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        uniform(torch.tensor([[[0.1, math.nan]]]), 1)
    with pytest.raises(ValueError, match="B, Hkv, n"):
        uniform(torch.zeros(3, 4), 1)
    with pytest.raises(ValueError, match="n_kept"):
        uniform(torch.zeros(2, 1, 4), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="alpha"):
        adakv(torch.zeros(1, 1, 4), 1, alpha=2.0)


def test_uniform_per_head_budget():
    s = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]])
    assert kept(uniform(s, torch.tensor([[1, 3]]))) == [[[0], [0, 1, 2]]]


def test_keep_indices_sorted():
    mask = torch.tensor([[[True, False, True], [False, False, False]]])
    out = keep_indices(mask)
    assert out[0][0].tolist() == [0, 2] and out[0][1].numel() == 0


# ---------------------------------------------------------------- option checks
def test_allocator_options_are_checked():
    from obinfer.cache.policies import PressError
    from obinfer.errors import ObinferError

    s = torch.zeros(1, 2, 4)
    for bad in (-0.1, 1.5, float("nan"), "0.2", True):
        with pytest.raises(PressError, match="alpha must be a number in"):
            adakv(s, 2, alpha=bad)
    for bad in (-1, 1.5, "1"):
        with pytest.raises(PressError, match="min_safe must be an integer >= 0"):
            adakv(s, 2, min_safe=bad)
    for bad in (-0.5, float("inf"), "0.5", None):
        with pytest.raises(PressError, match="compression_ratio must be a number in"):
            n_kept_for(10, bad)
    assert issubclass(PressError, ObinferError) and issubclass(PressError, ValueError)


# ---------------------------------------------------------------- registry
def test_allocator_registry():
    from obinfer.cache.allocators import (
        ALLOCATORS,
        AdaKV,
        allocator_options,
        make_allocator,
        register_allocator,
    )
    from obinfer.cache.policies import PressError

    assert list(ALLOCATORS)[:2] == ["uniform", "adakv"]
    assert allocator_options("adakv") == ["alpha", "min_safe"] and allocator_options("uniform") == []
    s = torch.tensor(
        [[[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], [0.01, 0.05, 0.04, 0.03, 0.02] + [0.0] * 4]]
    )
    n = torch.tensor([4])
    assert kept(make_allocator("uniform")(s, n)) == kept(uniform(s, n))
    assert kept(make_allocator("adakv", min_safe=1)(s, n)) == kept(adakv(s, n, alpha=0.2, min_safe=1))
    assert make_allocator("adakv") == AdaKV(alpha=0.2, min_safe=0) and ALLOCATORS["adakv"].name == "adakv"
    with pytest.raises(PressError, match="alpha must be a number in"):
        AdaKV(alpha=2.0)  # options are checked when the allocator is made
    with pytest.raises(
        PressError, match=r"unknown option alpha for allocator uniform; uniform takes no options"
    ):
        make_allocator("uniform", alpha=0.3)
    with pytest.raises(PressError, match="unknown allocator 'greedy'"):
        make_allocator("greedy")
    for bad in ("my-alloc", "full", "adakv", "uniform"):
        with pytest.raises(ValueError):
            register_allocator(bad)
