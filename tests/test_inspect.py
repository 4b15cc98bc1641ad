"""Tests for `obinfer inspect` (obinfer/inspect/run.py) on the tiny random Llama with a small BPE tokenizer.

References: the kept sets equal those of a real compressed prefill (`press.prefill_observer()` in the
model's forward, then `KVCache.kept_positions`), and the reported scores reproduce the kept sets through
the allocators.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from obinfer.cache import allocators
from obinfer.cache.presses import make_press
from obinfer.cli import main
from obinfer.inspect import (
    KEPT,
    PROTECTED,
    InspectError,
    Inspection,
    agreement,
    find_text,
    parse_positions,
    parse_span,
    plot_inspection,
    run_presses,
)
from obinfer.tokenizer import load_tokenizer
from obinfer.weights import load_model

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (the tiny config's eos is 2)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DOC = (
    "The lighthouse on Gull Rock was built in 1871. The last keeper, Ruth Maclean, kept a diary. "
    "The secret code of the lighthouse is 4172. The island has no trees, only thrift and sea campion, "
    "and in May the cliffs are white with nesting kittiwakes."
)
WINDOW = ["--press-opt", "window=8"]


def with_tokenizer(model_dir: Path, out: Path, corpus: list[str], vocab: int = 300) -> Path:
    """Copy a tiny checkpoint and give it a byte-level BPE tokenizer (ChatML, eos <|im_end|>) whose
    vocabulary fits the tiny model's 320 ids, trained on `corpus` with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    shutil.copytree(model_dir, out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def tok_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    return with_tokenizer(tiny_llama_dir, tmp_path_factory.mktemp("inspect") / "tiny", [DOC] * 3)


@pytest.fixture(scope="module")
def model_and_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(DOC)
    assert 40 < len(ids) < 300, len(ids)
    return load_model(tok_dir), ids, tok


@pytest.fixture()
def doc_file(tmp_path) -> Path:
    p = tmp_path / "doc.txt"
    p.write_text(DOC)
    return p


PRESSES = ["snapkv", "snapkv-obk", "adakv-snapkv-obk", "h2o-obkv", "tova-obv", "streamingllm", "h2o:budget"]


def _press(name: str):
    """A press by name at compression ratio 0.6 (snapkv: window 8); "<name>:budget" = 50 tokens per head."""
    name, _, budget = name.partition(":")
    opts = {"window": 8} if "snapkv" in name else {}
    if budget:
        return make_press(name, budget=50, **opts)
    return make_press(name, compression_ratio=0.6, **opts)


@torch.inference_mode()
def _real_kept(model, ids: list[int], name: str) -> list[list[list[int]]]:
    """Reference: compress during the model's own prefill and read the cache."""
    press, cache = _press(name), model.new_cache(1)
    model(torch.tensor([ids]), cache, observer=press.prefill_observer(), last_only=True)
    return [layer[0] for layer in cache.kept_positions()]


def test_kept_sets_equal_a_real_compressed_prefill(model_and_ids):
    model, ids, _ = model_and_ids
    views = run_presses(model, ids, [_press(n) for n in PRESSES])  # one prefill serves all of them
    for name, view in zip(PRESSES, views, strict=True):
        assert view.name == name.partition(":")[0]
        assert view.kept == _real_kept(model, ids, name), name
        L, H, n = view.scores.shape
        assert (L, H, n) == (model.cfg.n_layers, model.cfg.n_kv_heads, len(ids))
    ada = views[PRESSES.index("adakv-snapkv-obk")]
    lengths = [[len(h) for h in layer] for layer in ada.kept]
    assert any(len(set(ls)) > 1 for ls in lengths), "AdaKV should leave ragged heads here"
    n_kept = allocators.n_kept_for(len(ids), 0.6)
    assert all(sum(ls) == n_kept * model.cfg.n_kv_heads for ls in lengths)  # the layer budget is shared


def test_scores_reproduce_the_kept_sets(model_and_ids):
    model, ids, _ = model_and_ids
    names = ["snapkv-obk", "adakv-snapkv-obk", "h2o"]
    n_kept = allocators.n_kept_for(len(ids), 0.6)
    for name, view in zip(names, run_presses(model, ids, [_press(n) for n in names]), strict=True):
        for layer in range(model.cfg.n_layers):
            s = view.scores[layer][None]  # (1, Hkv, n): positions are slots in a full prefill
            mask = (
                allocators.adakv(s, n_kept, 0.2)
                if name.startswith("adakv")
                else allocators.uniform(s, n_kept)
            )
            assert [m.tolist() for m in allocators.keep_indices(mask)[0]] == view.kept[layer], (name, layer)
        if "snapkv" in name:  # the observation window is protected (+inf) and drawn as "always kept"
            assert view.window == (len(ids) - 8, len(ids))
            assert bool((view.scores[..., -8:] == float("inf")).all())
            assert bool(torch.isfinite(view.scores[..., :-8]).all())
            assert (view.raster(0)[:, -8:] == PROTECTED).all() and (view.raster(0) == KEPT).any()


def test_parse_positions_span_and_text():
    assert parse_positions("5, 1-3,2", 10) == [1, 2, 3, 5]
    assert (
        parse_span("2:7", 10) == (2, 7) and parse_span(":4", 10) == (0, 4) and parse_span("6:", 10) == (6, 10)
    )
    for bad in ("3-1", "x", "9-10", "-1"):
        with pytest.raises(InspectError, match="--highlight"):
            parse_positions(bad, 10)
    for bad in ("5", "4:4", "0:11", "a:b"):
        with pytest.raises(InspectError, match="--span"):
            parse_span(bad, 10)
    pieces = ["The", " code", " is", " 41", "72", ".", " 41"]
    assert find_text(pieces, "4172") == [3, 4]
    assert find_text(pieces, "41") == [3, 6]  # every occurrence
    assert find_text(pieces, "is 4") == [2, 3]
    with pytest.raises(InspectError, match="does not occur"):
        find_text(pieces, "needle")


def _is_png(path: Path) -> tuple[int, ...]:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path).shape


def test_plot_every_layout(model_and_ids, tmp_path):
    model, ids, tok = model_and_ids
    views = run_presses(model, ids, [_press("snapkv"), _press("adakv-snapkv-obk")])
    pieces = [tok.decode([i]) for i in ids]
    one = Inspection(pieces, views[:1], [3, 4])
    two = Inspection(pieces, views, [3, 4])
    h1, w1, _ = _is_png(plot_inspection(one, tmp_path / "one.png"))
    h2, w2, _ = _is_png(plot_inspection(two, tmp_path / "two.png", title="two presses"))
    assert w2 > 2 * w1  # two presses + their disagreement side by side
    _is_png(plot_inspection(two, tmp_path / "span.png", span=(0, 30)))  # token tick labels


def _run(tmp_path: Path, tok_dir: Path, doc_file: Path, *extra: str) -> tuple[int, dict | None]:
    out, js = tmp_path / "kept.png", tmp_path / "kept.json"
    argv = ["inspect", "--model", str(tok_dir), "--context-file", str(doc_file), "--no-chat"]
    code = main(argv + ["--out", str(out), "--json", str(js), *extra])
    if code != 0:
        return code, None
    _is_png(out)
    return code, json.loads(js.read_text())


def test_cli_single_press_png_and_json(tok_dir, doc_file, model_and_ids, tmp_path, capsys):
    model, ids, _ = model_and_ids
    args = ["--press", "adakv-snapkv-obk", "--compression-ratio", "0.6", *WINDOW]
    code, data = _run(
        tmp_path, tok_dir, doc_file, *args, "--highlight", "3,10-12", "--highlight-text", "4172"
    )
    assert code == 0
    assert data["n_positions"] == len(ids) and len(data["tokens"]) == len(ids)
    assert {3, 10, 11, 12} <= set(data["highlight"])
    assert "4172" in "".join(data["tokens"][i] for i in data["highlight"] if i > 12)
    (press,) = data["presses"]
    assert press["name"] == "adakv-snapkv-obk"
    assert press["kept"] == _real_kept(model, ids, "adakv-snapkv-obk")
    assert press["observation_window"] == [len(ids) - 8, len(ids)]
    assert all(len(row) == len(ids) for layer in press["scores"] for row in layer)
    assert all(p == list(range(len(ids) - 8, len(ids))) for layer in press["protected"] for p in layer)
    assert all(x is not None for layer in press["scores"] for row in layer for x in row[:-8])
    assert "slots kept" in capsys.readouterr().err


def test_cli_compare_and_query_aware(tok_dir, doc_file, model_and_ids, tmp_path):
    model, ids, _ = model_and_ids
    args = ["--compare", "snapkv,adakv-snapkv-obk", "--compression-ratio", "0.6", *WINDOW]
    code, data = _run(tmp_path, tok_dir, doc_file, *args, "--span", "5:40")
    assert code == 0
    a, b = data["presses"]
    assert (a["name"], b["name"]) == ("snapkv", "adakv-snapkv-obk")
    assert a["kept"] == _real_kept(model, ids, "snapkv") and b["kept"] == _real_kept(
        model, ids, "adakv-snapkv-obk"
    )
    sa = {(i, h, p) for i, layer in enumerate(a["kept"]) for h, ps in enumerate(layer) for p in ps}
    sb = {(i, h, p) for i, layer in enumerate(b["kept"]) for h, ps in enumerate(layer) for p in ps}
    assert data["agreement"] == pytest.approx(len(sa & sb) / len(sa | sb))
    code, qa = _run(tmp_path, tok_dir, doc_file, *args, "--question", "What is the code?")
    assert code == 0 and qa["n_positions"] > data["n_positions"]  # the question is compressed with the text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--press", "snapkv", "--compression-ratio", "0.5", "--highlight", "7-3"], "--highlight"),
        (["--press", "snapkv", "--compression-ratio", "0.5", "--highlight-text", "zebra"], "does not occur"),
        (["--compare", "snapkv", "--compression-ratio", "0.5"], "two press names"),
        (["--press", "snapkv", "--compare", "tova,knorm", "--compression-ratio", "0.5"], "not both"),
        (["--compression-ratio", "0.5"], "needs a press"),
        (["--press", "snapkv", "--compression-ratio", "0.5", "--press-opt", "window=0"], "window"),
        (["--press", "nosuch", "--compression-ratio", "0.5"], "unknown press"),
    ],
)
def test_cli_errors_are_one_line(tok_dir, doc_file, tmp_path, capsys, extra, message):
    code, _ = _run(tmp_path, tok_dir, doc_file, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("obinfer: error:")


def test_cli_needs_an_output(tok_dir, doc_file, capsys):
    argv = ["inspect", "--model", str(tok_dir), "--context-file", str(doc_file), "--press", "tova"]
    assert main(argv + ["--compression-ratio", "0.5"]) == 2
    assert "--out" in capsys.readouterr().err


def test_agreement_is_one_for_identical_views(model_and_ids):
    model, ids, _ = model_and_ids
    a, b = run_presses(model, ids, [_press("snapkv-obk"), _press("snapkv-obk")])
    assert agreement(a, b) == 1.0 and a.kept == b.kept and torch.equal(a.scores, b.scores)
