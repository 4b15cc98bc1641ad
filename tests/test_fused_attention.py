"""H2O with fused=True takes a prefill layer's attention outputs from its own scoring pass
(`Policy.fuses_attention`, `PressRun.compress_layer(attend=True)`): the same logits (to float32 rounding)
and kept tokens as attention then scoring; without the option, nothing changes."""

from __future__ import annotations

import pytest
import torch

from obinfer.cache.presses import make_press
from obinfer.weights import load_model


def _prefill(model, ids, n_pad, press, fused: bool):  # noqa: ANN001, ANN202
    """(logits, kept positions, scoring calls that attended) of one prefill, fused or not."""
    cache, run = model.new_cache(ids.shape[0]), press.start(model=model)
    observe = run.prefill_observer()
    calls = []
    if fused:
        attend = observe.attend_and_observe

        def spy(idx, q, q_pos, layer):  # noqa: ANN001, ANN202
            calls.append(idx)
            return attend(idx, q, q_pos, layer)

        observe.attend_and_observe = spy
    else:  # a plain function: no attend_and_observe, so the model attends first, then observes
        plain = observe

        def observe(idx, q, q_pos, layer):  # noqa: ANN001, ANN202
            plain(idx, q, q_pos, layer)

    with torch.inference_mode():
        logits = model(ids, cache, n_pad=n_pad, observer=observe)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits2 = model(nxt, cache)
    return torch.cat([logits, logits2], 1), cache.kept_positions(), calls


@pytest.mark.parametrize(
    "name, window",
    [("h2o", 0), ("h2o-obk", 0), ("h2o-obkv", 0), ("adakv-h2o-obv", 0), ("snapkv", 0),
     ("snapkv-obk", 0), ("snapkv-obk", 8), ("adakv-snapkv-obkv", 8), ("snapkv-caote", 8)],
)  # fmt: skip
def test_fused_prefill_equals_attention_then_scoring(tiny_dir, name, window):
    """H2O fused; SnapKV reuses the layer's attention outputs as the window's O (`reuses_outputs`):
    window 64 observes the whole prompt, padding queries included (row 1); window 8 only the tail."""
    model = load_model(tiny_dir)
    torch.manual_seed(0)
    ids = torch.randint(3, model.cfg.vocab_size, (2, 37))
    n_pad = torch.tensor([0, 5])
    opts = {"chunk": 7, "fused": True} if "h2o" in name else {"window": window} if window else {}
    press = make_press(name, compression_ratio=0.5, **opts)
    a, kept_a, calls = _prefill(model, ids, n_pad, press, fused=True)
    b, kept_b, _ = _prefill(model, ids, n_pad, press, fused=False)
    assert calls == list(range(model.cfg.n_layers))  # every layer went through the fused entry point
    valid = torch.ones_like(a[..., 0], dtype=torch.bool)
    valid[1, :5] = False  # padding positions' logits are nobody's business
    torch.testing.assert_close(a[valid], b[valid], rtol=1e-4, atol=1e-4)
    assert kept_a == kept_b


def test_fused_path_skips_the_model_attention(tiny_llama_dir, monkeypatch):
    """With fused H2O, no `attention.attend` call happens during the prefill: the scores gave the outputs."""
    import obinfer.cache.attention as attention_module

    model = load_model(tiny_llama_dir)
    ids = torch.randint(3, model.cfg.vocab_size, (1, 20))
    seen = []
    real = attention_module.attend
    monkeypatch.setattr(attention_module, "attend", lambda *a, **k: seen.append(1) or real(*a, **k))
    n = model.cfg.n_layers
    for name, opts, expected in (("h2o-obk", {"fused": True}, 0), ("h2o-obk", {}, n), ("snapkv-obk", {}, n)):
        seen.clear()
        run = make_press(name, compression_ratio=0.5, **opts).start(model=model)
        with torch.inference_mode():
            run.prefill(model, ids, model.new_cache())
        assert len(seen) == expected, (name, opts)


def test_fused_is_an_option_and_off_by_default():
    from obinfer.cache.presses import PressError

    assert not make_press("h2o", compression_ratio=0.5).policy.fuses_attention
    assert make_press("h2o-obk", compression_ratio=0.5, fused=True).policy.fuses_attention
    assert not make_press("snapkv", compression_ratio=0.5).policy.fuses_attention
    with pytest.raises(PressError, match="fused"):
        make_press("h2o", compression_ratio=0.5, fused="yes")


def test_snapkv_scores_with_the_layer_attention_outputs(tiny_llama_dir, monkeypatch):
    """A prefill layer's SnapKV scoring is handed the layer's float32 attention outputs (no second A V);
    a bfloat16 model's outputs are not used (scores stay float32), nor is anything handed to a policy
    that does not take them."""
    from obinfer.cache import policies

    given = []
    real = policies.SnapKV.score
    monkeypatch.setattr(
        policies.SnapKV,
        "score",
        lambda self, *a, outputs=None: given.append(outputs) or real(self, *a, outputs=outputs),
    )
    ids = torch.randint(3, 50, (1, 30))
    for dtype, expect in ((torch.float32, True), (torch.bfloat16, False)):
        model = load_model(tiny_llama_dir, dtype=dtype)
        given.clear()
        run = make_press("snapkv-obk", compression_ratio=0.5, window=8).start(model=model)
        with torch.inference_mode():
            run.prefill(model, ids, model.new_cache())
        assert len(given) == model.cfg.n_layers
        assert all((o is not None) == expect for o in given), dtype
        if expect:
            assert given[0].shape == (1, model.cfg.n_heads, 30, model.cfg.head_dim)
