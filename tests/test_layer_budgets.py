"""Layer budgets (issue 12, part 3): PyramidKV's pyramid and EpiCache's sensitivity profile.

Checked: the split keeps the total exactly and its bounds, against a slow float reference; a flat
profile is today's press, token for token; each layer keeps (and holds in memory) exactly its budget,
with the uniform and the AdaKV head split inside it; each layer's kept set is the one the base press
keeps with that layer's budget; decode-time eviction keeps every layer within its own budget; the
sensitivity profile (layer 0's keys do not depend on attention: s_0 = 1); the grammar and the errors.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from obinfer.cache.fanout import Fanout
from obinfer.cache.layer_budgets import (
    LAYER_BUDGETS,
    Epi,
    Pyramid,
    measure_sensitivity,
    split_budget,
)
from obinfer.cache.presses import PressError, PressName, make_press, press_names
from obinfer.config import ModelConfig
from obinfer.generate import stream
from obinfer.models.llama import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")
N_LAYERS = 6


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    """Measured profiles go to a temporary data dir, not the user's ~/.cache/obinfer."""
    monkeypatch.setenv("OBINFER_DATA", str(tmp_path / "data"))


@pytest.fixture(scope="module")
def model() -> Transformer:
    """A random 6-layer Llama (more layers than the shared tiny checkpoints, so the pyramid has a shape)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2,
        head_dim=16, max_position_embeddings=1024,
    )  # fmt: skip
    m = Transformer(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return m.eval()


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def positions(layer, row: int = 0) -> list[list[int]]:  # noqa: ANN001
    H = layer.n_kv_heads
    return [sorted(layer.segment(row * H + h)[2].tolist()) for h in range(H)]


# ------------------------------------------------------------------------------------------ the split
def reference_split(w, m, r, cap, floor):  # noqa: ANN001, ANN201
    """Slow reference: bisection on lambda for sum clip(lambda w, lo, hi) = L (m - r), in floats."""
    L, free = len(w), m - r
    lo = max(floor * free, 1.0 if (r == 0 and m >= 1) else 0.0)
    hi = math.inf if cap is None else cap - r
    total = L * free
    if sum(w) == 0:
        w = [1.0] * L
    f = lambda lam: sum(min(max(lam * x, lo), hi) for x in w)  # noqa: E731
    zero = [i for i, x in enumerate(w) if x == 0]
    saturated = sum(hi if x > 0 else lo for x in w)
    if saturated < total and zero:  # the weighted layers are all capped: the rest share what is left
        share = lo + (total - saturated) / len(zero)
        return [r + (min(share, hi) if x == 0 else hi) for x in w]
    a, b = 0.0, 1.0
    while f(b) < total and b < 1e12:
        b *= 2
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if f(mid) < total else (a, mid)
    return [r + min(max(b * x, lo), hi) for x in w]


def test_split_keeps_the_total_and_follows_the_reference():
    rng = random.Random(0)
    for _ in range(300):
        L = rng.randint(1, 12)
        w = [rng.choice([0.0, rng.random() * 3]) for _ in range(L)]
        m = rng.randint(1, 300)
        r = rng.randint(0, m)
        cap = rng.choice([None, rng.randint(m, 2 * m + 5)])
        floor = rng.choice([0.0, 0.25, 0.5])
        got = split_budget(
            w, torch.tensor([m]), torch.tensor([r]), None if cap is None else torch.tensor([cap]), floor
        )
        got = got[0].tolist()
        assert sum(got) == L * m, (w, m, r, cap, floor, got)  # exactly the flat total
        ref = reference_split(w, m, r, cap, floor)
        assert all(abs(g - x) < 1 + 1e-6 for g, x in zip(got, ref, strict=True)), (got, ref)
        assert all(g >= r for g in got) and (cap is None or all(g <= cap for g in got))


def test_a_flat_profile_gives_every_layer_the_mean():
    for m, r in ((97, 64), (5, 0), (1, 0), (300, 1)):
        assert (
            split_budget([2.0] * 7, torch.tensor([m]), torch.tensor([r]), None, 0.25)[0].tolist() == [m] * 7
        )
    rows = split_budget([1.0] * 3, torch.tensor([10, 20]), None, torch.tensor([30, 40]))
    assert rows.tolist() == [[10] * 3, [20] * 3]


def test_pyramid_profile_and_split():
    assert Pyramid().profile(1) == [1.0]
    w = Pyramid(beta=20).profile(4)
    assert w == pytest.approx([1.95, 1.95 - 1.9 / 3, 0.05 + 1.9 / 3, 0.05])  # (2 - 1/beta) ... 1/beta, mean 1
    got = Pyramid(beta=20).split(torch.tensor([100]), 4)[0].tolist()
    assert got == [195, 132, 68, 5] and sum(got) == 400
    # SnapKV's window is reserved in every layer; only the rest is spread
    got = Pyramid(beta=20).split(torch.tensor([164]), 4, reserve=torch.tensor([64]))[0].tolist()
    assert got == [259, 196, 132, 69] and sum(got) == 4 * 164
    assert Pyramid(beta=1).split(torch.tensor([50]), 5)[0].tolist() == [50] * 5  # beta 1: flat


def test_epi_profile_follows_the_sensitivity_with_a_floor():
    s = (1.0, 0.9, 0.5, 0.0)
    assert Epi(sensitivity=s).profile(4) == pytest.approx([0.0, 0.1, 0.5, 1.0])
    got = Epi(sensitivity=s, floor=0.25).split(torch.tensor([100]), 4)[0].tolist()
    # layers 0 and 1 are raised to the floor (25), the other 350 split 0.5 : 1.0 (116.7, 233.3)
    assert got == [25, 25, 117, 233]
    assert Epi(sensitivity=s, exponent=2.0).profile(4) == pytest.approx([0.0, 0.01, 0.25, 1.0])
    flat = Epi(sensitivity=(0.3,) * 4).split(torch.tensor([77]), 4)[0].tolist()
    assert flat == [77] * 4


# ------------------------------------------------------------------------------------------ presses
@pytest.mark.parametrize("name", ["snapkv-obk", "adakv-snapkv", "tova-obv", "h2o-obkv", "knorm"])
def test_a_flat_profile_is_todays_press(model, name):
    """pyramid with beta = 1 and epi with one sensitivity everywhere are the plain press, token for token."""
    prompt = tokens(150, seed=1)
    runs = []
    for full_name, opts in (
        (name, {}),
        (f"pyramid-{name}", {"beta": 1}),
        (f"epi-{name}", {"sensitivity": (0.4,) * N_LAYERS}),
    ):
        cache = model.new_cache()
        press = make_press(full_name, compression_ratio=0.6, **opts)
        out = [int(t[0]) for t in stream(model, [prompt], press=press, cache=cache, max_new_tokens=6)]
        runs.append((out, [positions(layer) for layer in cache.layers]))
    assert runs[1] == runs[0] and runs[2] == runs[0]


@pytest.mark.parametrize("allocator", ["", "adakv-"])
@pytest.mark.parametrize("layers", ["pyramid", "epi"])
def test_each_layer_keeps_and_holds_exactly_its_budget(model, allocator, layers):
    n, ratio = 200, 0.5
    opts = {"sensitivity": (1.0, 0.2, 0.5, 0.9, 0.1, 0.6)} if layers == "epi" else {}
    press = make_press(f"{layers}-{allocator}snapkv-obk", compression_ratio=ratio, **opts)
    run = press.start(model=model)
    cache = model.new_cache()
    with torch.inference_mode():
        run.prefill(model, torch.tensor([tokens(n, seed=2)]), cache)
    mean = int(n * (1 - ratio))
    budgets = run.layer_budgets[0].tolist()
    assert sum(budgets) == N_LAYERS * mean and len(set(budgets)) > 1
    assert min(budgets) >= 64  # SnapKV's window is reserved in every layer
    if layers == "pyramid":
        assert budgets == sorted(budgets, reverse=True)
    H, D = model.cfg.n_kv_heads, model.cfg.head_dim
    for layer, b in zip(cache.layers, budgets, strict=True):
        if allocator:
            assert sum(layer.length) == H * b
        else:
            assert layer.length == [b] * H
        assert layer.nbytes() == 2 * H * b * D * 4  # K and V, float32: memory follows the layer's budget
        for kept in positions(layer):
            assert set(range(n - 64, n)) <= set(kept)  # the window is kept in every layer


def test_each_layer_keeps_what_the_base_press_keeps_with_that_layers_budget(model):
    """The kept set of layer l = the base press's kept set at layer l with budget m_l (slow reference)."""
    ids = tokens(180, seed=3)
    press = make_press("pyramid-adakv-snapkv-obk", compression_ratio=0.5)
    run = press.start(model=model)
    cache = model.new_cache()
    with torch.inference_mode():
        run.prefill(model, torch.tensor([ids]), cache)
    budgets = run.layer_budgets[0].tolist()
    refs = {b: make_press("adakv-snapkv-obk", budget=b) for b in set(budgets)}
    fan = Fanout(model, ids, list(refs.values()))
    for i, b in enumerate(budgets):
        ref = fan.compress(refs[b])
        assert positions(cache.layers[i]) == positions(ref.layers[i]), i


def test_decode_time_eviction_keeps_each_layer_within_its_own_budget(model):
    budget, n_new = 40, 12
    press = make_press("pyramid-h2o-obk", budget=budget)
    cache = model.new_cache()
    list(stream(model, [tokens(90, seed=4)], press=press, cache=cache, max_new_tokens=n_new))
    split = Pyramid().split(torch.tensor([budget]), N_LAYERS)[0].tolist()
    assert sum(split) == N_LAYERS * budget
    for layer, b in zip(cache.layers, split, strict=True):
        assert layer.length == [b] * model.cfg.n_kv_heads


def test_layer_budgets_through_fanout_equal_their_own_prefill(model):
    ids = tokens(160, seed=5)
    names = ["pyramid-snapkv-obkv", "epi-adakv-tova", "pyramid-h2o"]
    presses = [
        make_press(
            n, compression_ratio=0.7, **({"sensitivity": (0.9,) * 3 + (0.1,) * 3} if "epi" in n else {})
        )
        for n in names
    ]
    fan = Fanout(model, ids, presses)
    for press in presses:
        own = model.new_cache()
        list(stream(model, [ids], press=press, cache=own, max_new_tokens=1))
        shared = fan.compress(press)
        assert [positions(a) for a in own.layers] == [positions(b) for b in shared.layers], press.name


def test_a_padded_batch_equals_its_rows(model):
    rows = [tokens(150, seed=6), tokens(110, seed=7)]
    press = make_press("pyramid-snapkv-obk", compression_ratio=0.5)
    cache = model.new_cache(2)
    batch = [t.tolist() for t in stream(model, rows, press=press, cache=cache, max_new_tokens=4)]
    for r, row in enumerate(rows):
        alone = model.new_cache()
        out = [int(t[0]) for t in stream(model, [row], press=press, cache=alone, max_new_tokens=4)]
        assert out == [b[r] for b in batch]
        assert [positions(a) for a in alone.layers] == [positions(b, r) for b in cache.layers]


# ------------------------------------------------------------------------------------------ sensitivity
def test_sensitivity_profile(model):
    s = measure_sensitivity(model, block=64, n_tokens=320)
    assert len(s) == N_LAYERS and all(-1 <= x <= 1 + 1e-6 for x in s)
    assert s[0] == pytest.approx(1.0, abs=1e-5)  # layer 0's keys come from the embeddings alone
    assert min(s[1:]) < 0.999  # later layers see the restricted attention
    assert measure_sensitivity(model, block=64, n_tokens=320) == s  # memoised, deterministic
    # an epi press measures it from the model when no sensitivity is given
    press = make_press("epi-snapkv", compression_ratio=0.5, block=64, calibration=320)
    b = press.layers.split(torch.tensor([50]), N_LAYERS, model=model)[0].tolist()
    w = [1 - x for x in s]
    assert sum(b) == 50 * N_LAYERS and b[0] == min(b) and b.index(max(b)) == w.index(max(w))


def test_sensitivity_reference(model):
    """s_l recomputed by hand: keys of the full forward vs keys of each block run alone at its offset."""
    ids = torch.randint(0, 320, (192,), generator=torch.Generator().manual_seed(9))

    def keys(chunk: torch.Tensor, offset: int) -> list[torch.Tensor]:
        cache = model.new_cache()
        cache.seen += offset
        with torch.inference_mode():
            model(chunk[None], cache)
        return [layer.dense()[0][0].float() for layer in cache.layers]  # (Hkv, T, D)

    full = keys(ids, 0)
    blocks = [keys(ids[s : s + 64], s) for s in (64, 128)]
    ref = []
    for i in range(N_LAYERS):
        a, b = full[i][:, 64:], torch.cat([blk[i] for blk in blocks], 1)
        ref.append(float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()))
    assert measure_sensitivity(model, ids.tolist(), block=64) == pytest.approx(ref, abs=1e-5)


# ------------------------------------------------------------------------------------------ names, errors
def test_grammar():
    names = set(press_names())
    for lb in LAYER_BUDGETS:
        if lb != "flat":
            assert {f"{lb}-snapkv-obk", f"{lb}-adakv-snapkv-obk", f"{lb}-h2o", f"{lb}-adakv-knorm"} <= names
    p = PressName.parse("pyramid-adakv-snapkv-obk")
    assert p == PressName("adakv", "snapkv", "obk", "pyramid") and str(p) == "pyramid-adakv-snapkv-obk"
    assert p.base == "adakv-snapkv-obk" and p.family == "pyramid-adakv-snapkv"
    assert make_press("epi-tova", budget=8).press_name == PressName("uniform", "tova", "attn", "epi")
    for bad in (
        "flat-snapkv",
        "pyramid-pyramid-snapkv",
        "adakv-pyramid-snapkv",
        "pyramid",
        "pyramid-uniform-snapkv",
    ):
        with pytest.raises(PressError, match="unknown press"):
            PressName.parse(bad)
    assert PressName.parse("pyramid-mine-snapkv-obk", check=False) == PressName(
        "mine", "snapkv", "obk", "pyramid"
    )


def test_errors_are_one_line(model):
    for opts, match in (
        ({"beta": 0}, "pyramid option beta must be an integer >= 1"),
        ({"nope": 1}, "unknown option nope for snapkv; .* layer budget pyramid takes: beta"),
    ):
        with pytest.raises(PressError, match=match):
            make_press("pyramid-snapkv", compression_ratio=0.5, **opts)
    with pytest.raises(PressError, match="exponent must be a number > 0"):
        make_press("epi-snapkv", compression_ratio=0.5, exponent=-1)
    with pytest.raises(PressError, match="sensitivity must be numbers"):
        make_press("epi-snapkv", compression_ratio=0.5, sensitivity="abc")
    press = make_press("pyramid-snapkv", compression_ratio=0.5)
    cache = model.new_cache()
    with pytest.raises(PressError, match=r"start it with press.start\(model=model\)"):
        model(torch.tensor([tokens(100, 8)]), cache, observer=press.start().prefill_observer())
    with pytest.raises(PressError, match="has 2 values but the model has 6 layers"):
        list(
            stream(
                model,
                [tokens(100, 8)],
                press=make_press("epi-snapkv", compression_ratio=0.5, sensitivity=(0.1, 0.2)),
            )
        )


def test_sensitivity_is_stored_once_per_model(model, tmp_path, monkeypatch):
    from obinfer.cache import layer_budgets

    monkeypatch.setenv("OBINFER_DATA", str(tmp_path))
    monkeypatch.setattr(layer_budgets, "_MEASURED", layer_budgets.weakref.WeakKeyDictionary())
    s = measure_sensitivity(model, block=32, n_tokens=96)
    files = list((tmp_path / "sensitivity").glob("*.json"))
    assert len(files) == 1
    # a new process (empty memo) reads it back without running the model
    monkeypatch.setattr(layer_budgets, "_MEASURED", layer_budgets.weakref.WeakKeyDictionary())

    def boom(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("the model ran")

    monkeypatch.setattr(model, "forward", boom)
    assert measure_sensitivity(model, block=32, n_tokens=96) == s
    monkeypatch.undo()
    # other weights: another profile
    other = Transformer(model.cfg)
    monkeypatch.setenv("OBINFER_DATA", str(tmp_path))
    measure_sensitivity(other, block=32, n_tokens=96)
    assert len(list((tmp_path / "sensitivity").glob("*.json"))) == 2
