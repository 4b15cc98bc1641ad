"""Tests for obinfer.cache.scores: spec test vectors (docs/scores.md section 6) and a slow loop reference."""

import itertools
import math

import pytest
import torch
from spec_vectors import EX2_K, EX2_Q, EX2_V

import obinfer.cache.scores as scores_module
from obinfer.cache.scores import (
    SCORES,
    ScoreInputs,
    Scratch,
    attn,
    caote,
    get_score,
    obk,
    obkv,
    obv,
    pool_scores,
    reduce_term,
    register_score,
    score_queries_chunked,
)

TOL = {"rtol": 1e-3, "atol": 1e-4}  # spec values are quoted to 4 decimals
SCORE_NAMES = ["attn", "obv", "obk", "obkv", "caote"]


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# ---------------------------------------------------------------- Example 1: one query, one head, n = 6
def example1() -> ScoreInputs:
    q = t([[[[1, 0.5]]]])
    k = t([[[[2, 1], [0.5, 0], [1, 1], [-1, 0.5], [1.5, -1], [0, 2]]]])
    v = t([[[[0.1, 0], [1, -1], [0.5, 0.5], [2, 1], [-1, 1.5], [0.8, 0.3]]]])
    return ScoreInputs(q, k, v, torch.tensor([[5]]), torch.arange(6).view(1, 1, 6))


def test_example1_intermediates():
    inp = example1()
    torch.testing.assert_close(inp.z[0, 0, 0], t([1.7678, 0.3536, 1.0607, -0.5303, 0.7071, 0.7071]), **TOL)
    torch.testing.assert_close(inp.A[0, 0, 0], t([0.3954, 0.0961, 0.1950, 0.0397, 0.1369, 0.1369]), **TOL)
    torch.testing.assert_close(inp.O[0, 0, 0], t([0.2852, 0.2875]), **TOL)
    assert inp.z.dtype == inp.A.dtype == inp.O.dtype == torch.float32


@pytest.mark.parametrize(
    "name, expected, top3",
    [
        ("obv", [0.0016, 0.0185, 0.0190, 0.0079, 0.0609, 0.0137], {1, 2, 4}),
        ("obk", [0.0571, 0.0025, 0.0039, 0.0015, 0.0293, 0.0025], {0, 2, 4}),
        ("obkv", [0.0485, 0.0341, 0.0401, 0.0025, 0.1724, 0.0272], {0, 2, 4}),
        ("caote", [0.2236, 0.1566, 0.0732, 0.0768, 0.2803, 0.0817], None),
    ],
)
def test_example1_scores(name, expected, top3):
    s = get_score(name)(example1())
    assert s.shape == (1, 1, 6) and s.dtype == torch.float32
    torch.testing.assert_close(s[0, 0], t(expected), **TOL)
    if top3 is not None:
        assert set(s[0, 0].topk(3).indices.tolist()) == top3


def exact_removal_error(q, K, V) -> list[float]:
    """||o without token p - o||^2 for each p, by recomputing the softmax without p (float64)."""
    q, K, V = q.double(), K.double(), V.double()

    def out(keep):
        a = torch.softmax(K[keep] @ q / math.sqrt(q.numel()), 0)
        return a @ V[keep]

    full = out(list(range(len(K))))
    return [float((out([j for j in range(len(K)) if j != p]) - full).square().sum()) for p in range(len(K))]


def test_caote_squared_is_exact_removal_error():
    inp = example1()
    exact = t(exact_removal_error(inp.q[0, 0, 0], inp.k[0, 0], inp.v[0, 0]))
    torch.testing.assert_close(exact, t([0.0500, 0.0245, 0.0054, 0.0059, 0.0785, 0.0067]), **TOL)
    torch.testing.assert_close(caote(inp)[0, 0].square(), exact, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- Example 2: SnapKV prefill, GQA


def example2(gqa: str = "sum", last_only: bool = False) -> ScoreInputs:
    q, q_pos = t([EX2_Q]), torch.tensor([[8, 9]])
    if last_only:
        q, q_pos = q[:, :, 1:], q_pos[:, 1:]
    return ScoreInputs(q, t([EX2_K]), t([EX2_V]), q_pos, torch.arange(10).expand(1, 2, 10), gqa=gqa)


def test_example2_snapkv_attn_pooled():
    W, G = 2, 2
    s = pool_scores(attn(example2())[..., :8] / (W * G), 3)  # mean over window and group, pool 3
    torch.testing.assert_close(
        s[0, 0], t([0.0844, 0.1192, 0.1185, 0.0891, 0.1043, 0.0905, 0.1038, 0.0538]), **TOL
    )
    torch.testing.assert_close(
        s[0, 1], t([0.0761, 0.1111, 0.1060, 0.0920, 0.0898, 0.1016, 0.1194, 0.0867]), **TOL
    )


@pytest.mark.parametrize(
    "name, gqa, kv0, kv1",
    [
        ("obv", "sum", [0.0011, 0.0905, 0.2098, 0.1165, 0.0071, 0.3743, 0.0040, 0.0655],
         [0.0021, 0.0862, 0.2080, 0.0052, 0.0467, 0.0410, 0.3259, 0.0732]),
        ("obk", "sum", [0.0036, 0.0170, 0.0354, 0.0645, 0.0023, 0.1145, 0.0001, 0.0028],
         [0.0032, 0.0402, 0.0217, 0.0000, 0.0090, 0.0005, 0.1420, 0.0217]),
        ("obkv", "sum", [0.0017, 0.1572, 0.3804, 0.3169, 0.0077, 0.8635, 0.0037, 0.0860],
         [0.0056, 0.2150, 0.3174, 0.0052, 0.0621, 0.0488, 0.8195, 0.1502]),
        ("obk", "pre", [0.0003, 0.0047, 0.0013, 0.0012, 0.0013, 0.0383, 0.0000, 0.0006],
         [0.0006, 0.0011, 0.0079, 0.0000, 0.0004, 0.0000, 0.0513, 0.0052]),
    ],
)  # fmt: skip
def test_example2_ob_scores(name, gqa, kv0, kv1):
    s = get_score(name)(example2(gqa))[0, :, :8]
    torch.testing.assert_close(s, t([kv0, kv1]), **TOL)


def test_example2_tova_last_query_mean_over_all_heads():
    inp = example2(last_only=True)
    expected = t([0.1071, 0.1232, 0.1073, 0.0912, 0.0624, 0.1082, 0.1032, 0.1230, 0.0799])
    torch.testing.assert_close(inp.A[0, :, 0].mean(0)[:9], expected, **TOL)
    torch.testing.assert_close((attn(inp).sum(1) / 4)[0, :9], expected, **TOL)


# ---------------------------------------------------------------- Example 3: H2O, all causal queries
def example3() -> tuple[torch.Tensor, ...]:
    q = t([(1, 0), (0.5, 0.5), (0, 1), (1, 1), (-0.5, 1)]).view(1, 1, 5, 2)
    k = t([(1, 0.5), (0, 1), (1, -1), (0.5, 0.5), (-1, 0)]).view(1, 1, 5, 2)
    v = t([(1, 0), (0, 1), (1, 1), (-1, 0.5), (0.5, -0.5)]).view(1, 1, 5, 2)
    return q, torch.arange(5).view(1, 5), k, v, torch.arange(5).view(1, 1, 5)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("attn", [2.4355, 1.5637, 0.3086, 0.4545, 0.2377]),
        ("obv", [1.5863, 0.6519, 0.0696, 0.1310, 0.0282]),
        ("obk", [0.1713, 0.0969, 0.0073, 0.0513, 0.0063]),
        ("obkv", [2.1629, 1.1098, 0.0471, 0.3126, 0.0592]),
    ],
)
def test_example3_h2o(name, expected):
    q, q_pos, k, v, k_pos = example3()
    full = get_score(name)(ScoreInputs(q, k, v, q_pos, k_pos))
    torch.testing.assert_close(full[0, 0], t(expected), **TOL)
    for chunk in (1, 2, 3, 256):
        torch.testing.assert_close(score_queries_chunked(name, q, q_pos, k, v, k_pos, chunk=chunk), full)


def test_example3_h2o_normalize_visible():
    q, q_pos, k, v, k_pos = example3()
    inp = ScoreInputs(q, k, v, q_pos, k_pos)
    n_seeing = inp.visible.sum(2)  # queries that see each key: n - p
    assert n_seeing[0, 0].tolist() == [5, 4, 3, 2, 1]
    torch.testing.assert_close(
        (attn(inp) / n_seeing)[0, 0], t([0.4871, 0.3909, 0.1029, 0.2272, 0.2377]), **TOL
    )


# ---------------------------------------------------------------- explicit-loop reference (float64)
def reference(name: str, inp: ScoreInputs) -> torch.Tensor:
    """Each score computed literally from its definition with Python loops over b, g, h, i, p."""
    q, k, v = inp.q.double().tolist(), inp.k.double().tolist(), inp.v.double().tolist()
    q_pos, k_pos = inp.q_pos.tolist(), inp.k_pos.tolist()
    B, Hq, W, D = inp.q.shape
    Hkv, n, G = inp.k.shape[1], inp.k.shape[2], inp.group
    out = torch.zeros(B, Hkv, n, dtype=torch.float64)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))
    for b in range(B):
        for g in range(Hkv):
            vis = [[0 <= k_pos[b][g][p] <= q_pos[b][i] for p in range(n)] for i in range(W)]
            Az = []  # per query head: (A[i][p], z[i][p])
            for h in range(g * G, g * G + G):
                z = [[dot(q[b][h][i], k[b][g][p]) / math.sqrt(D) if vis[i][p] else 0.0 for p in range(n)]
                     for i in range(W)]  # fmt: skip
                A = []
                for i in range(W):
                    e = [math.exp(z[i][p]) if vis[i][p] else 0.0 for p in range(n)]
                    A.append([x / sum(e) if sum(e) > 0 else 0.0 for x in e])
                Az.append((A, z))
            if inp.gqa == "pre":
                A = [[sum(a[i][p] for a, _ in Az) / G for p in range(n)] for i in range(W)]
                z = [[sum(zz[i][p] for _, zz in Az) / G for p in range(n)] for i in range(W)]
                Az = [(A, z)]
            for A, z in Az:
                for i in range(W):
                    o = [
                        sum(A[i][p] * v[b][g][p][d] for p in range(n) if vis[i][p])
                        for d in range(len(v[b][g][0]))
                    ]
                    for p in range(n):
                        if vis[i][p]:
                            out[b, g, p] += term(name, A[i][p], z[i][p], v[b][g][p], o)
            for p in range(n):
                if k_pos[b][g][p] < 0:
                    out[b, g, p] = -math.inf
    return out


def term(name: str, a: float, z: float, vp: list[float], o: list[float]) -> float:
    sq = lambda x: sum(c * c for c in x)
    if name == "attn":
        return a
    if name == "obv":
        return a * a * sq(vp)
    if name == "obk":
        return (a * z) ** 2 * sq([x - y for x, y in zip(vp, o, strict=True)])
    if name == "obkv":
        return a * a * sq([(1 + z) * x - z * y for x, y in zip(vp, o, strict=True)])
    if name == "caote":
        return a / (1 - a) * math.sqrt(sq([y - x for x, y in zip(vp, o, strict=True)])) if a < 1 else 0.0
    raise AssertionError(name)


def random_inputs(gqa: str, seed: int = 0) -> ScoreInputs:
    """B=2, Hq=6, Hkv=2, W=5, n=12, D=8; slots are not positions; invalid slots hold NaN garbage."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, W, n, D = 2, 6, 2, 5, 12, 8
    q = torch.randn(B, Hq, W, D, generator=g)
    k = torch.randn(B, Hkv, n, D, generator=g)
    v = torch.randn(B, Hkv, n, D, generator=g)
    k_pos = torch.stack([torch.stack([torch.randperm(n, generator=g) for _ in range(Hkv)]) for _ in range(B)])
    k_pos[0, 0, [2, 7]] = -1
    k_pos[1, 1, [0, 1, 2]] = -1
    k[k_pos < 0] = float("nan")
    v[k_pos < 0] = float("nan")
    q_pos = torch.arange(n - W, n).expand(B, W).clone()
    q_pos[1, 0] = -1  # a padding query: sees nothing, contributes nothing, even with garbage contents
    q[1, :, 0] = float("nan")
    return ScoreInputs(q, k, v, q_pos, k_pos, gqa=gqa)


@pytest.mark.parametrize("gqa", ["sum", "pre"])
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_vectorised_matches_loop_reference(name, gqa):
    inp = random_inputs(gqa)
    got = get_score(name)(inp)
    ref = reference(name, inp).float()
    assert got.shape == (2, 2, 12) and got.dtype == torch.float32
    assert torch.equal(torch.isneginf(got), inp.k_pos < 0)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gqa", ["sum", "pre"])
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_chunked_equals_unchunked(name, gqa):
    inp = random_inputs(gqa, seed=1)
    full = get_score(name)(inp)
    for chunk in (1, 2, 4):
        got = score_queries_chunked(
            get_score(name), inp.q, inp.q_pos, inp.k, inp.v, inp.k_pos, gqa, chunk=chunk
        )
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gqa", ["sum", "pre"])
def test_several_scores_from_one_chunked_pass_equal_one_pass_each(gqa):
    """A list of scores shares each chunk's logits, attention and outputs: a tuple of totals, each equal
    bit for bit to that score's own chunked pass (what lets H2O score sibling presses once)."""
    inp = random_inputs(gqa, seed=5)
    args = (inp.q, inp.q_pos, inp.k, inp.v, inp.k_pos, gqa)
    for chunk in (1, 3, None):
        many = score_queries_chunked(list(SCORE_NAMES), *args, chunk=chunk)
        assert isinstance(many, tuple) and len(many) == len(SCORE_NAMES)
        for name, got in zip(SCORE_NAMES, many, strict=True):
            assert torch.equal(got, score_queries_chunked(name, *args, chunk=chunk)), (name, chunk)


@pytest.mark.parametrize("gqa", ["sum", "pre"])
def test_obkv_is_obv_plus_obk_plus_cross_term(gqa):
    inp = random_inputs(gqa, seed=2)
    tm = inp.terms
    cross = (2 * tm.A.square() * tm.z * (tm.v2 - tm.vo)).sum((2, 3))
    valid = inp.valid
    torch.testing.assert_close(obkv(inp)[valid], (obv(inp) + obk(inp) + cross)[valid], rtol=1e-4, atol=1e-5)


def per_term(name: str, inp: ScoreInputs) -> torch.Tensor:
    """The spec's per-(h, i, p) expansion, clamped per term (docs/scores.md section 2), then summed."""
    t = inp.terms
    if name == "obv":
        term = t.A.square() * t.v2
    elif name == "obk":
        term = (t.A * t.z).square() * (t.v2 + t.o2 - 2 * t.vo).clamp_min(0)
    else:
        z1 = 1 + t.z
        term = t.A.square() * (z1.square() * t.v2 + t.z.square() * t.o2 - 2 * t.z * z1 * t.vo).clamp_min(0)
    return reduce_term(inp, term)


@pytest.mark.parametrize("gqa", ["sum", "pre"])
@pytest.mark.parametrize("name", ["obv", "obk", "obkv"])
def test_factored_scores_equal_the_per_term_expansion(name, gqa):
    """The OBCache scores reduce over the queries before the slots (three matmul-shaped sums instead of a
    (W, n) tensor of <v_p, o_i>): equal in exact arithmetic to summing the clamped per-term expansion."""
    for seed in range(3):
        inp = random_inputs(gqa, seed=seed)
        torch.testing.assert_close(get_score(name)(inp), per_term(name, inp), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["obv", "obk", "obkv"])
def test_factored_scores_on_peaked_attention(name):
    """Large logits (nearly one-hot attention, so o_i is close to one v_p) and values sharing an offset:
    the cancellation in the expanded ||v - o||^2 stays at float32 level, relative to the largest score."""
    for seed in (5, 6, 7):
        base = random_inputs("sum", seed=seed)
        inp = ScoreInputs(base.q * 6, base.k, base.v * 2 + 1, base.q_pos, base.k_pos)
        ref, got = reference(name, inp), get_score(name)(inp).double()
        valid = inp.valid
        assert float((got - ref)[valid].abs().max() / ref[valid].abs().max()) < 1e-4


def ordered_inputs(q_pos: list[list[int]], n: int, first: int = 0, seed: int = 4) -> ScoreInputs:
    """Slots in position order (first, first + 1, ...), as after a prefill; queries at the given positions."""
    g = torch.Generator().manual_seed(seed)
    B, W, Hq, Hkv, D = len(q_pos), len(q_pos[0]), 4, 2, 8
    q = torch.randn(B, Hq, W, D, generator=g)
    k, v = torch.randn(B, Hkv, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g)
    qp = torch.tensor(q_pos)
    q[(qp < 0)[:, None, :].expand(B, Hq, W)] = float("nan")  # padding queries hold garbage
    return ScoreInputs(q, k, v, qp, torch.arange(first, first + n).expand(B, Hkv, n))


@pytest.mark.parametrize(
    "q_pos, first",
    [
        ([[6, 7, 8, 9], [-1, 7, 8, 9]], 0),  # a window at the end; a padding query in row 1
        ([[9], [9]], 0),  # one last query that sees every slot: nothing is masked
        ([[1, 7, 8, 9], [6, 7, 8, 9]], 3),  # query 0 of row 0 precedes every slot
    ],
)
def test_visibility_of_ordered_slots(q_pos, first):
    """Only slots that some real query cannot see are masked (the tail of the window); queries that see
    nothing get rows of zeros; the logits are left as they were; every score matches the loop reference."""
    inp = ordered_inputs(q_pos, 10, first)
    A = inp.A.view(2, 2, 2, len(q_pos[0]), 10)
    sees = inp.visible.any(-1)[:, :, None].expand(A.shape[:4])
    assert torch.isfinite(A).all() and (A * ~inp.visible[:, :, None]).eq(0).all()
    torch.testing.assert_close(A.sum(-1)[sees], torch.ones(int(sees.sum())))
    assert (A.sum(-1)[~sees] == 0).all()
    qs = inp.q.float().nan_to_num(0.0).view(2, 2, -1, 8) / math.sqrt(8)
    logits = (qs @ inp.k.transpose(-1, -2)).view(A.shape)
    torch.testing.assert_close(inp._zraw, logits)  # restored after the masked softmax
    for name in SCORE_NAMES:
        torch.testing.assert_close(get_score(name)(inp), reference(name, inp).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_attention_equals_masked_softmax_for_any_slot_order(seed):
    """A from positions alone (which slots some query cannot see, which queries see nothing) equals the
    softmax over the `visible` mask, for shuffled slots, invalid slots and padding queries."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, W, n, D = 2, 4, 2, 5, 12, 8
    k_pos = torch.stack([torch.randperm(n, generator=g) + 3 for _ in range(B * Hkv)]).view(B, Hkv, n)
    k_pos[torch.rand(B, Hkv, n, generator=g) < 0.2] = -1
    if seed == 0:
        k_pos[1, 0] = -1  # a head with no valid slot
    q_pos = torch.randint(0, n + 6, (B, W), generator=g)
    q_pos[torch.rand(B, W, generator=g) < 0.2] = -1
    inp = ScoreInputs(torch.randn(B, Hq, W, D, generator=g), torch.randn(B, Hkv, n, D, generator=g),
                      torch.randn(B, Hkv, n, D, generator=g), q_pos, k_pos)  # fmt: skip
    vis = inp.visible[:, :, None]  # (B, Hkv, 1, W, n)
    ref = torch.softmax(inp._zraw.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(inp._Ag, ref.expand_as(inp._Ag))


@pytest.mark.parametrize("name", SCORE_NAMES)
def test_chunked_causal_prefix_equals_unchunked(name, monkeypatch):
    """H2O's layout (every query of a prefill, the slots its positions): chunks of any size, fixed or
    automatic (as many queries as keep Hq x queries x n within CHUNK_ELEMENTS), give the unchunked
    scores, each chunk scoring only the slots its queries can see."""
    n = 23
    inp = ordered_inputs([list(range(n))], n)
    q, q_pos, k, v, k_pos = inp.q, inp.q_pos, inp.k, inp.v, inp.k_pos
    full = get_score(name)(inp)
    seen: list[tuple[int, int]] = []

    class Recording(ScoreInputs):
        def __post_init__(self) -> None:
            super().__post_init__()
            seen.append((self.q.shape[2], self.k.shape[2]))

    monkeypatch.setattr(scores_module, "ScoreInputs", Recording)
    monkeypatch.setattr(scores_module, "CHUNK_ELEMENTS", 4 * n * 6 + 3)  # Hq = 4: 6 queries x n slots
    for chunk, widths in ((1, [1] * n), (5, [5] * 4 + [3]), (None, [6] * 3 + [5])):
        seen.clear()
        got = score_queries_chunked(name, q, q_pos, k, v, k_pos, chunk=chunk, causal_prefix=True)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
        assert [w for w, _ in seen] == widths
        assert [s for _, s in seen] == list(itertools.accumulate(widths))  # each chunk's causal prefix


def test_attention_rows_and_padding_query():
    inp = random_inputs("sum")
    A = inp.A
    assert torch.isfinite(A).all() and torch.isfinite(inp.O).all()
    row_sums = A.sum(-1)
    torch.testing.assert_close(row_sums[0], torch.ones_like(row_sums[0]))
    assert (row_sums[1, :, 0] == 0).all()  # padding query q_pos = -1 sees no key
    assert (A.view(2, 2, 3, 5, 12) * ~inp.visible[:, :, None]).eq(0).all()
    torch.testing.assert_close(inp.vnorm2[inp.valid], inp.v[inp.valid].square().sum(-1))


def test_low_precision_inputs_give_float32():
    inp = random_inputs("sum")
    half = ScoreInputs(inp.q.bfloat16(), inp.k.bfloat16(), inp.v.bfloat16(), inp.q_pos, inp.k_pos)
    for name in SCORE_NAMES:
        s = get_score(name)(half)
        assert s.dtype == torch.float32
        assert torch.equal(torch.isneginf(s), inp.k_pos < 0)


def test_caote_single_visible_key_is_finite():
    q, _, k, v, k_pos = example3()  # query 0 sees only key 0, so A = 1 there
    s = caote(ScoreInputs(q[:, :, :1], k, v, torch.tensor([[0]]), k_pos))
    assert torch.isfinite(s).all() and s[0, 0, 0] == 0


# ---------------------------------------------------------------- pooling
def test_pool_scores_matches_loops():
    g = torch.Generator().manual_seed(3)
    s = torch.rand(2, 3, 9, generator=g)
    for kernel in (1, 3, 5):
        r = kernel // 2
        avg, mx = pool_scores(s, kernel, "avg"), pool_scores(s, kernel, "max")
        for p in range(9):
            window = s[..., max(0, p - r) : p + r + 1]
            torch.testing.assert_close(avg[..., p], window.sum(-1) / kernel)  # zero padding counted
            torch.testing.assert_close(mx[..., p], window.amax(-1))


def test_pool_scores_keeps_non_finite_slots():
    s = t([[[-math.inf, 1.0, 2.0, math.inf, 3.0]]])
    avg = pool_scores(s, 3)
    assert avg[0, 0, 0] == -math.inf and avg[0, 0, 3] == math.inf
    torch.testing.assert_close(avg[0, 0, [1, 2, 4]], t([1.0, 1.0, 1.0]))
    mx = pool_scores(s, 3, "max")
    torch.testing.assert_close(mx[0, 0], t([-math.inf, 2.0, 2.0, math.inf, 3.0]))


# ---------------------------------------------------------------- registry and bad input
def test_registry():
    assert set(SCORE_NAMES) <= set(SCORES)
    with pytest.raises(ValueError, match="valid scores: .*obkv"):
        get_score("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_score("obk")(lambda inp: inp.A)
    name = "_test_neg_attn"
    try:
        register_score(name)(lambda inp: -attn(inp))
        torch.testing.assert_close(get_score(name)(example1()), -attn(example1()))
    finally:
        SCORES.pop(name, None)
    for bad in ("my-score", "", "full"):  # a score name is the suffix of press names: no "-"
        with pytest.raises(ValueError, match="without '-'"):
            register_score(bad)


def test_reduce_term_sums_group_and_queries():
    inp = example1()
    torch.testing.assert_close(reduce_term(inp, inp.attention), attn(inp))
    t = inp.terms
    torch.testing.assert_close(reduce_term(inp, t.A.square() * t.v2), get_score("obv")(inp))


def test_bad_inputs_raise_value_error():
    inp = example1()
    with pytest.raises(ValueError, match="gqa"):
        ScoreInputs(inp.q, inp.k, inp.v, inp.q_pos, inp.k_pos, gqa="mean")
    with pytest.raises(ValueError, match="k_pos"):
        ScoreInputs(inp.q, inp.k, inp.v, inp.q_pos, inp.k_pos[..., :3])
    with pytest.raises(ValueError, match="multiple"):
        ScoreInputs(
            inp.q, inp.k.expand(1, 2, 6, 2), inp.v.expand(1, 2, 6, 2), inp.q_pos, inp.k_pos.expand(1, 2, 6)
        )
    with pytest.raises(ValueError, match="kernel"):
        pool_scores(torch.zeros(1, 1, 4), 4)


def test_chunks_reuse_one_scratch_for_their_big_temporaries(monkeypatch):
    """Every chunk of a chunked pass writes its logits, attention and obk's weights into the same
    buffers (no fresh pages per chunk), and the scores are those of bundles without scratch."""
    n = 23
    inp = ordered_inputs([list(range(n))], n)
    args = (inp.q, inp.q_pos, inp.k, inp.v, inp.k_pos)
    ptrs: list[tuple[int, int]] = []

    class Recording(ScoreInputs):
        def __post_init__(self) -> None:
            super().__post_init__()
            assert isinstance(self.scratch, Scratch)
            ptrs.append((self._zraw.data_ptr(), self._Ag.data_ptr()))

    monkeypatch.setattr(scores_module, "ScoreInputs", Recording)
    got = score_queries_chunked(["attn", "obk"], *args, chunk=4, causal_prefix=True)
    monkeypatch.undo()
    assert len(ptrs) == 6 and len(set(ptrs)) == 1 and ptrs[0][0] != ptrs[0][1]
    for name, total in zip(["attn", "obk"], got, strict=True):
        fresh = torch.zeros(total.shape)
        for s in range(0, n, 4):
            e = min(n, s + 4)
            q, qp = inp.q[:, :, s:e], inp.q_pos[:, s:e]
            part = ScoreInputs(q, inp.k[:, :, :e], inp.v[:, :, :e], qp, inp.k_pos[:, :, :e])
            assert part.scratch is None
            fresh[..., :e] += get_score(name)(part)
        assert torch.equal(total, fresh), name


def test_scratch_grows_a_buffer_and_keeps_names_apart():
    sc = Scratch(reserve=6)
    a = sc.take("a", (2, 3), torch.device("cpu"))
    b = sc.take("b", (1, 2), torch.device("cpu"))
    assert a.data_ptr() != b.data_ptr() and a.shape == (2, 3) and b.shape == (1, 2)
    assert sc.take("a", (5,), torch.device("cpu")).data_ptr() == a.data_ptr()  # fits: same storage
    big = sc.take("a", (4, 4), torch.device("cpu"))
    assert big.shape == (4, 4) and big.is_contiguous() and big.data_ptr() != a.data_ptr()


@pytest.mark.parametrize("gqa", ["sum", "pre"])
@pytest.mark.parametrize("name", SCORE_NAMES)
def test_given_outputs_score_as_computed_ones(name, gqa):
    """`ScoreInputs.outputs` (a layer's own attention outputs) stand in for A V: the same scores; rows of
    queries that see nothing are ignored even when they hold garbage (SDPA's padding rows)."""
    inp = random_inputs(gqa, seed=2)
    given = inp.O.clone()
    given[1, :, 0] = float("nan")  # row 1's query 0 is padding
    other = ScoreInputs(inp.q, inp.k, inp.v, inp.q_pos, inp.k_pos, gqa=gqa, outputs=given)
    torch.testing.assert_close(other.O, inp.O, rtol=0, atol=0)
    torch.testing.assert_close(get_score(name)(other), get_score(name)(inp), rtol=1e-6, atol=1e-7)
    # and they are used, not recomputed: other outputs give other O-dependent scores
    moved = ScoreInputs(inp.q, inp.k, inp.v, inp.q_pos, inp.k_pos, gqa=gqa, outputs=given + 1.0)
    if name in ("obk", "obkv", "caote") and gqa == "sum":
        assert not torch.allclose(get_score(name)(moved), get_score(name)(inp))
    with pytest.raises(ValueError, match="outputs must be"):
        ScoreInputs(inp.q, inp.k, inp.v, inp.q_pos, inp.k_pos, gqa=gqa, outputs=given[:, :, 1:])
