"""The RULER runner: one shared prefill gives the same answers as a press-in-the-loop prefill per press,
prompts are built the kvpress way, runs resume without redoing rows, and the CLI works end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from obinfer.cache.fanout import Fanout
from obinfer.cache.presses import make_press
from obinfer.eval import protocol, results, runner, samples
from obinfer.eval.metrics import score_row
from obinfer.eval.results import result_key
from obinfer.eval.runner import EvalConfig, run_eval
from obinfer.generate import generate
from obinfer.weights import load_model

SPECIALS = {"<|user|>": 300, "<|end|>": 301, "<|assistant|>": 302}


class ByteTokenizer:
    """A toy tokenizer for the 320-token tiny models: byte b -> id b + 3, BOS 1, EOS 2, three chat tokens."""

    bos_id, stop_ids, has_chat_template = 1, {2, 301}, True

    def __init__(self, chat: bool = True):
        self.has_chat_template = chat

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        i = 0
        while i < len(text):
            special = next((s for s in SPECIALS if text.startswith(s, i)), None)
            if special:
                ids.append(SPECIALS[special])
                i += len(special)
            else:
                ids += [b + 3 for b in text[i].encode("utf-8")]
                i += 1
        return ids

    def decode(self, ids: list[int]) -> str:
        names = {v: k for k, v in SPECIALS.items()}
        out = b"".join(
            names[i].encode() if i in names else bytes([i - 3]) if 3 <= i < 259 else b"" for i in ids
        )
        return out.decode("utf-8", errors="replace")

    def chat_parts(self) -> tuple[str, str]:
        return "<|user|>", "<|end|><|assistant|>"


def _rows(n: int = 2) -> list[dict]:
    base = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
    rows = []
    for i in range(n):
        needle = f"One of the special magic numbers for key-{i} is: {1234567 + i}.\n"
        context = "A special magic number is hidden below.\n" + base + needle + base
        rows.append(
            {
                "task": "niah_single_1",
                "index": i,
                "context": context,
                "question": f"What is the special magic number for key-{i}? ",
                "answer_prefix": "The number is",
                "answers": [str(1234567 + i)],
                "max_new_tokens": 6,
                "n_tokens": 0,
                "depth": [50.0],
                "max_seq_length": 512,
            }
        )
    return rows


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def prompt_ids(tok, row: dict, mode: str, chat: bool) -> tuple[list[int], list[int]]:
    p = protocol.sample_prompt(tok, row, mode, chat)
    return p.prefill, p.after


PRESSES = ["full", "snapkv", "adakv-snapkv-obk", "h2o", "tova-obv"]
RATIOS = [0.25, 0.75]


def test_prompt_ids_follow_kvpress():
    tok, row = ByteTokenizer(), _rows(1)[0]
    ctx, q = prompt_ids(tok, row, "agnostic", chat=True)
    assert ctx == tok.encode("<|user|>" + row["context"])
    assert q == tok.encode(row["question"] + "<|end|><|assistant|>" + row["answer_prefix"])
    ctx, q = prompt_ids(tok, row, "aware", chat=True)
    assert ctx == tok.encode("<|user|>" + row["context"] + row["question"])
    assert q == tok.encode("<|end|><|assistant|>" + row["answer_prefix"])
    ctx, q = prompt_ids(tok, row, "agnostic", chat=False)  # no template: BOS + context, "\n" suffix
    assert ctx == [tok.bos_id] + tok.encode(row["context"])
    assert q == tok.encode(row["question"] + "\n" + row["answer_prefix"])


def test_press_grid_runs_full_once_and_last():
    grid = runner.press_grid(["full", "snapkv", "h2o", "snapkv"], [0.5, 0.25])
    assert [(c.press, c.ratio) for c in grid] == [
        ("snapkv", 0.5),
        ("snapkv", 0.25),
        ("h2o", 0.5),
        ("h2o", 0.25),
        ("full", 0.0),
    ]


def test_press_grid_with_budgets():
    grid = runner.press_grid(["full", "h2o", "snapkv"], [0.5], [64, 16, 64])
    assert [(c.press, c.ratio, c.budget) for c in grid] == [
        ("h2o", 0.5, 0),
        ("h2o", 0.0, 64),
        ("h2o", 0.0, 16),
        ("snapkv", 0.5, 0),
        ("snapkv", 0.0, 64),
        ("snapkv", 0.0, 16),
        ("full", 0.0, 0),
    ]
    # budgets alone; a sample's rows run the budgets (a prefill each) first, the shared prefill last
    only = runner.press_grid(["full", "tova"], [], [32])
    assert [(c.press, c.budget) for c in only] == [("tova", 32), ("full", 0)]
    order = [(c.press, c.ratio, c.budget) for c in runner.run_order(grid)]
    assert order[:4] == [("h2o", 0.0, 64), ("h2o", 0.0, 16), ("snapkv", 0.0, 64), ("snapkv", 0.0, 16)]
    assert order[4:] == [("h2o", 0.5, 0), ("snapkv", 0.5, 0), ("full", 0.0, 0)]
    assert runner.press_grid(["full"], [], []) == [runner.Combo("full", 0.0)]
    with pytest.raises(runner.EvalError, match="needs at least one compression ratio or budget"):
        runner.press_grid(["full", "h2o"], [], [])


def test_shared_prefill_records_the_queries_the_presses_read(tiny_model, monkeypatch):
    """The runner's one prefill (obinfer/cache/fanout.py) keeps what the policies declare they observe."""
    seen = []
    real = runner.Fanout.__init__

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        real(self, *args, **kwargs)
        seen.append(self.n_queries)

    monkeypatch.setattr(runner.Fanout, "__init__", spy)
    tok, row = ByteTokenizer(), _rows(1)[0]
    ctx, q = prompt_ids(tok, row, "agnostic", chat=True)
    for presses in (["full", "snapkv", "tova"], ["snapkv", "h2o"], ["full", "knorm"]):
        combos = runner.press_grid(presses, [0.5])
        list(runner._shared(tiny_model, tok, ctx, q, 2, combos))
    assert seen == [64, len(ctx), 1]


def test_one_prefill_equals_a_prefill_per_press(tiny_model, tmp_path):
    """Every (sample, mode, press, ratio) answer equals generate() with the press in its own prefill."""
    tok, rows = ByteTokenizer(), _rows(2)
    cfg = EvalConfig(PRESSES, RATIOS, modes=["agnostic", "aware"])
    results = run_eval(tiny_model, tok, rows, cfg, tmp_path, progress=False)
    assert len(results) == 2 * 2 * (1 + 4 * 2)
    preds = {}
    for res in results:
        row = rows[res["index"]]
        ctx, q = prompt_ids(tok, row, res["mode"], chat=True)
        press = make_press(res["press"], compression_ratio=res["ratio"])  # "full": FULL, no compression
        ref = tok.decode(
            list(generate(tiny_model, ctx, question=q, press=press, max_new_tokens=6, stop_ids=tok.stop_ids))
        )
        assert res["pred"] == ref, (res["press"], res["ratio"], res["mode"])
        assert res["score"] == score_row(ref, row["answers"], row["task"])
        assert res["shared_prefill"] is True
        preds[result_key(res)] = ref
        layers, heads = tiny_model.cfg.n_layers, tiny_model.cfg.n_kv_heads
        assert res["full_tokens"] == len(ctx) * layers * heads
        if res["press"] in ("snapkv", "h2o"):  # uniform allocator: int(n (1 - r)) per head
            assert res["kept_tokens"] == int(len(ctx) * (1 - res["ratio"])) * layers * heads
            assert res["cache_bytes"] < res["cache_bytes_full"]
    # compression changed some answer, so the equality above is not vacuous
    full = {k[:3] + k[5:]: v for k, v in preds.items() if k[3] == "full"}
    assert any(v != full[k[:3] + k[5:]] for k, v in preds.items() if k[3] != "full")


@pytest.mark.parametrize("batch", [3, 20])
def test_batched_decoding_gives_the_same_answers(tiny_model, tmp_path, batch):
    """A sample's compressed caches (uniform and ragged AdaKV rows, different lengths) decoded as one
    batch answer exactly what decoding each alone answers."""
    tok, rows = ByteTokenizer(), _rows(2)
    cfg = dict(presses=PRESSES, ratios=RATIOS, modes=["agnostic", "aware"])
    alone = run_eval(tiny_model, tok, rows, EvalConfig(**cfg, batch=1), tmp_path / "a", progress=False)
    together = run_eval(tiny_model, tok, rows, EvalConfig(**cfg, batch=batch), tmp_path / "b", progress=False)
    key = lambda r: (r["index"], r["mode"], r["press"], r["ratio"])  # noqa: E731
    assert {key(r): (r["pred"], r["new_tokens"]) for r in alone} == {
        key(r): (r["pred"], r["new_tokens"]) for r in together
    }
    assert max(r["decode_rows"] for r in together) == min(batch, 9) and {r["decode_rows"] for r in alone} == {
        1
    }
    with pytest.raises(runner.EvalError, match="batch"):
        EvalConfig(**cfg, batch=0)


def test_reprefill_gives_the_same_rows(tiny_model, tmp_path):
    tok, rows = ByteTokenizer(chat=False), _rows(1)
    presses = ["full", "adakv-snapkv", "h2o-obkv"]
    shared = run_eval(tiny_model, tok, rows, EvalConfig(presses, [0.5]), tmp_path / "a", progress=False)
    naive = run_eval(
        tiny_model, tok, rows, EvalConfig(presses, [0.5], reprefill=True), tmp_path / "b", progress=False
    )
    assert [r["shared_prefill"] for r in naive] == [False] * 3
    keep = (
        "press",
        "ratio",
        "pred",
        "score",
        "cache_bytes",
        "cache_bytes_full",
        "kept_tokens",
        "full_tokens",
    )
    assert [{k: r[k] for k in keep} for r in shared] == [{k: r[k] for k in keep} for r in naive]


def _reference(model, tok, ctx: list[int], q: list[int], press, chunk: int | None = None) -> str:
    """What `obinfer generate --cache-budget M` answers: generate() with the press in its own prefill."""
    ids = generate(model, ctx, question=q, press=press, max_new_tokens=6, stop_ids=tok.stop_ids,
                   prefill_chunk=chunk)  # fmt: skip
    return tok.decode(list(ids))


def test_budget_rows_equal_generate_with_a_cache_budget(tiny_model, tmp_path):
    """A budget row answers what generate() answers with make_press(name, budget=M); h2o and tova hold at
    most M tokens per head after the prefill and after the answer, snapkv only after the prefill."""
    tok, rows = ByteTokenizer(), _rows(2)
    presses, budgets = ["full", "tova", "h2o", "snapkv"], [16, 1000]
    cfg = EvalConfig(presses, [0.5], modes=["agnostic", "aware"], budgets=budgets)
    res = run_eval(tiny_model, tok, rows, cfg, tmp_path, progress=False)
    assert len(res) == 2 * 2 * (1 + 3 * (1 + 2))
    order = runner.result_order(rows, cfg)  # how a torchrun job's merge sorts: as written here
    assert [order[result_key(r)] for r in res] == list(range(len(res)))
    layers, heads = tiny_model.cfg.n_layers, tiny_model.cfg.n_kv_heads
    full = {(r["index"], r["mode"]): r["pred"] for r in res if r["press"] == "full"}
    budget_rows = [r for r in res if r["budget"]]
    assert len(budget_rows) == 2 * 2 * 3 * 2 and all(r["ratio"] == 0.0 for r in budget_rows)
    for r in budget_rows:
        ctx, q = prompt_ids(tok, rows[r["index"]], r["mode"], chat=True)
        M = r["budget"]
        assert r["pred"] == _reference(tiny_model, tok, ctx, q, make_press(r["press"], budget=M)), r
        assert r["score"] == score_row(r["pred"], rows[r["index"]]["answers"], r["task"])
        assert r["shared_prefill"] is False
        assert r["full_tokens"] == len(ctx) * layers * heads
        assert r["kept_tokens"] == min(len(ctx), M) * layers * heads  # after the prefill, before q
        if M < len(ctx):
            assert r["cache_bytes"] < r["cache_bytes_full"]
            if r["press"] in ("h2o", "tova"):  # evict while decoding: never above M
                assert r["head_tokens_end"] == M
            else:  # snapkv compresses once: the question and the answer add to its M
                assert r["head_tokens_end"] > M
        else:  # a budget above the prompt keeps everything: the full cache's answer
            assert r["kept_tokens"] == r["full_tokens"] and r["cache_bytes"] == r["cache_bytes_full"]
            assert r["pred"] == full[r["index"], r["mode"]]
    # the small budget changed some answer, so the equalities above are not vacuous
    assert any(r["pred"] != full[r["index"], r["mode"]] for r in budget_rows if r["budget"] == 16)
    # the ratio rows are the shared prefill's, as without budgets
    ratio_rows = [r for r in res if not r["budget"]]
    assert {r["shared_prefill"] for r in ratio_rows} == {True}
    plain = run_eval(tiny_model, tok, rows, EvalConfig(presses, [0.5], modes=["agnostic", "aware"]),
                     tmp_path / "plain", progress=False)  # fmt: skip
    drop = ("prefill_s", "compress_s", "decode_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ratio_rows] == [
        {k: v for k, v in r.items() if k not in drop} for r in plain
    ]


def test_budget_rows_with_a_chunked_prefill(tiny_model, tmp_path):
    """With --prefill-chunk, a budget row is generate(..., prefill_chunk=N) with the budget."""
    tok, rows = ByteTokenizer(), _rows(1)
    cfg = EvalConfig(["tova"], [], budgets=[16], prefill_chunk=64)
    (r,) = run_eval(tiny_model, tok, rows, cfg, tmp_path, progress=False)
    ctx, q = prompt_ids(tok, rows[0], "agnostic", chat=True)
    assert r["pred"] == _reference(tiny_model, tok, ctx, q, make_press("tova", budget=16), chunk=64)
    assert r["prefill_chunk"] == 64 and r["head_tokens_end"] == 16
    layers, heads = tiny_model.cfg.n_layers, tiny_model.cfg.n_kv_heads
    assert r["kept_tokens"] == 16 * layers * heads
    # a block at a time: the cache never held more than M + N tokens per head, not the whole prompt
    per_slot = r["cache_bytes"] / r["kept_tokens"]
    assert r["cache_bytes_peak"] <= (16 + 64) * layers * heads * per_slot < r["full_tokens"] * per_slot


def test_budget_settings_are_checked():
    for bad in (0, -3, 1.5, True, "64"):
        with pytest.raises(runner.EvalError, match=r"budgets must be integers >= 1 \(tokens per KV head\)"):
            EvalConfig(["h2o"], [], budgets=[64, bad])
    with pytest.raises(runner.EvalError, match="needs at least one compression ratio or budget"):
        EvalConfig(["h2o"], [], budgets=[])
    assert EvalConfig(["h2o"], [], budgets=(64,)).budgets == [64]


class Interrupt(Exception):
    pass


def test_resume_after_interruption(tiny_model, tmp_path):
    tok, rows = ByteTokenizer(), _rows(2)
    cfg = EvalConfig(["full", "snapkv", "h2o"], [0.25, 0.5], modes=["agnostic"])
    total = 2 * (1 + 2 * 2)
    first: list[dict] = []

    def stop_after(k: int):
        def cb(res: dict) -> None:
            first.append(res)
            if len(first) == k:
                raise Interrupt

        return cb

    with pytest.raises(Interrupt):
        run_eval(tiny_model, tok, rows, cfg, tmp_path, progress=False, on_result=stop_after(3))
    path = tmp_path / "results.jsonl"
    written = path.read_text().splitlines()
    assert len(written) == 3
    with path.open("a") as fh:  # a torn write from the interruption
        fh.write('{"task": "niah_single_1", "ind')
    with pytest.raises(runner.EvalError, match="--resume"):
        run_eval(tiny_model, tok, rows, cfg, tmp_path, progress=False)
    second: list[dict] = []
    final = run_eval(
        tiny_model, tok, rows, cfg, tmp_path, resume=True, progress=False, on_result=second.append
    )
    assert len(second) == total - 3  # finished rows were not redone
    assert not {result_key(r) for r in first} & {result_key(r) for r in second}
    counts = Counter(result_key(r) for r in final)
    assert len(counts) == total and set(counts.values()) == {1}
    assert path.read_text().splitlines()[:3] == written  # the first rows are kept verbatim
    again: list[dict] = []
    run_eval(tiny_model, tok, rows, cfg, tmp_path, resume=True, progress=False, on_result=again.append)
    assert again == []
    # an uninterrupted run gives the same answers
    fresh = run_eval(tiny_model, tok, rows, cfg, tmp_path / "fresh", progress=False)
    by_key = {result_key(r): r["pred"] for r in fresh}
    assert all(by_key[result_key(r)] == r["pred"] for r in final)


def test_resume_skips_budget_rows_and_reads_rows_without_budgets(tiny_model, tmp_path):
    """An interrupted run with budgets resumes without redoing a row; rows of a run from before budgets
    (no "budget" field) count as its ratio rows, so adding budgets to such a run runs the budgets only."""
    tok, rows = ByteTokenizer(), _rows(2)
    cfg = EvalConfig(["full", "h2o"], [0.5], budgets=[16, 32])
    total = 2 * (1 + 3)
    first: list[dict] = []

    def stop_after_3(res: dict) -> None:
        first.append(res)
        if len(first) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_eval(tiny_model, tok, rows, cfg, tmp_path / "a", progress=False, on_result=stop_after_3)
    assert [r["budget"] for r in first] == [16, 32, 0]  # budget rows first, then the shared prefill
    second: list[dict] = []
    final = run_eval(tiny_model, tok, rows, cfg, tmp_path / "a", resume=True, progress=False,
                     on_result=second.append)  # fmt: skip
    assert len(second) == total - 3
    assert not {result_key(r) for r in first} & {result_key(r) for r in second}
    assert len({result_key(r) for r in final}) == len(final) == total
    again: list[dict] = []
    run_eval(tiny_model, tok, rows, cfg, tmp_path / "a", resume=True, progress=False, on_result=again.append)
    assert again == []
    # an old results file: the ratio rows without a "budget" field
    old = run_eval(tiny_model, tok, rows, EvalConfig(["full", "h2o"], [0.5]), tmp_path / "b", progress=False)
    path = tmp_path / "b" / "results.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "budget"}) + "\n" for r in old))
    new: list[dict] = []
    merged = run_eval(tiny_model, tok, rows, cfg, tmp_path / "b", resume=True, progress=False,
                      on_result=new.append)  # fmt: skip
    assert sorted((r["index"], r["budget"]) for r in new) == [(0, 16), (0, 32), (1, 16), (1, 32)]
    assert len(merged) == total and len({result_key(r) for r in merged}) == total
    by_key = {result_key(r): r["pred"] for r in final}
    assert all(by_key[result_key(r)] == r["pred"] for r in merged)


def test_resume_with_a_larger_cap_redoes_only_the_answers_it_cut_short(tiny_model, tmp_path):
    """Each row records its answer cap. Resumed with a larger --max-new-tokens, a run redoes the answers
    that reached the old cap with references missing (and only those: not one that scored 1, nor a row
    without a recorded cap), appends them, and reads each result once, the redone answer replacing the
    old one. The redone answers are those of a fresh run with the larger cap."""
    tok, rows = ByteTokenizer(), _rows(2)
    presses, ratios = ["full", "snapkv", "h2o"], [0.25, 0.5]
    small = run_eval(tiny_model, tok, rows, EvalConfig(presses, ratios, max_new_tokens=2), tmp_path,
                     progress=False)  # fmt: skip
    assert {r["cap"] for r in small} == {2} and {r["new_tokens"] for r in small} == {2}
    assert all(r["score"] < 1 for r in small)  # a random tiny model: every answer is cut short
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    kept = {result_key(small[0]), result_key(small[1])}
    doctored = [json.loads(x) for x in lines]
    doctored[0]["score"] = 1.0  # as if it had found the needle: a longer answer cannot score more
    del doctored[1]["cap"]  # a row from before caps were recorded: final
    path.write_text("".join(json.dumps(r) + "\n" for r in doctored))
    redone: list[dict] = []
    cfg = EvalConfig(presses, ratios, max_new_tokens=5)
    final = run_eval(
        tiny_model, tok, rows, cfg, tmp_path, resume=True, progress=False, on_result=redone.append
    )
    assert {result_key(r) for r in redone} == {result_key(r) for r in small} - kept
    assert {r["cap"] for r in redone} == {5} and max(r["new_tokens"] for r in redone) > 2
    assert len(path.read_text().splitlines()) == len(small) + len(redone)  # the old lines stay
    assert len(final) == len(small) and {result_key(r) for r in final} == {result_key(r) for r in small}
    by_key = {result_key(r): r for r in final}
    assert all(by_key[k] == r for k, r in zip(map(result_key, doctored[:2]), doctored[:2], strict=True))
    fresh = {result_key(r): r["pred"] for r in run_eval(tiny_model, tok, rows, cfg, tmp_path / "fresh",
                                                          progress=False)}  # fmt: skip
    assert all(fresh[result_key(r)] == r["pred"] for r in redone)
    again: list[dict] = []
    run_eval(tiny_model, tok, rows, cfg, tmp_path, resume=True, progress=False, on_result=again.append)
    assert again == []  # cut short again at 5: only a cap above 5 would redo them
    assert results.read_results(path) == final


def test_prompt_too_long_is_a_clear_error(tiny_model, tmp_path):
    row = _rows(1)[0]
    row["context"] = "x" * 600
    with pytest.raises(runner.EvalError, match="exceed the model's 512 positions"):
        run_eval(tiny_model, ByteTokenizer(), [row], EvalConfig(["full"], []), tmp_path, progress=False)


def test_bad_settings_are_rejected():
    from obinfer.cache.policies import PressError

    with pytest.raises(PressError, match="unknown press"):
        EvalConfig(["snapkv-nope"], [0.5])
    with pytest.raises(runner.EvalError, match="ratios"):
        EvalConfig(["snapkv"], [1.0])
    with pytest.raises(runner.EvalError, match="mode"):
        EvalConfig(["snapkv"], [0.5], modes=["sideways"])


def test_cli_eval_resume_and_report(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from obinfer import cli
    from obinfer.cli import eval as eval_cli

    tok, model = ByteTokenizer(), load_model(tiny_llama_dir)
    monkeypatch.setattr(eval_cli, "load", lambda *a, **k: (model, tok, Path(tiny_llama_dir)))
    out = tmp_path / "res"
    argv = ["eval", "--presses", "full,snapkv,snapkv-obk", "--ratios", "0.5", "--tasks", "niah_single_1"]
    argv += ["--length", "560", "--samples", "2", "--max-new-tokens", "3", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    data = out / "data" / "niah_single_1_560_42.jsonl"
    samples = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(samples) == 2 and all(s["n_tokens"] + 128 <= 560 for s in samples)
    assert [s["n_tokens"] for s in samples] == [
        len(tok.encode(s["context"] + s["question"] + s["answer_prefix"])) for s in samples
    ]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 and {r["new_tokens"] <= 3 for r in rows} == {True}
    assert cli.main(argv) == 2  # refuses to overwrite
    assert "--resume" in capsys.readouterr().err
    assert cli.main(argv + ["--resume"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 6
    assert cli.main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "snapkv-obk" in text and "full" in text
    assert (out / "plots" / "accuracy_agnostic_560.png").stat().st_size > 0
    assert cli.main(["eval", "--tasks", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_decoding_is_greedy_and_deterministic(tiny_model):
    """The runner's answer() equals an explicit argmax loop on the same cache."""
    tok, row = ByteTokenizer(), _rows(1)[0]
    ctx, q = prompt_ids(tok, row, "agnostic", chat=True)
    cache = Fanout(tiny_model, ctx).cache
    ref_cache = cache.fork()
    text, n = runner.answer(tiny_model, tok, cache, q, 5)
    out = []
    with torch.inference_mode():
        logits = tiny_model(torch.tensor([q]), ref_cache)[:, -1]
        for _ in range(5):
            t = int(logits.argmax(-1))
            if t in tok.stop_ids:
                break
            out.append(t)
            logits = tiny_model(torch.tensor([[t]]), ref_cache)[:, -1]
    assert (text, n) == (tok.decode(out), len(out))


# ------------------------------------------------------------------ bad input and interruptions
def _one_line_error(capsys, *needles: str) -> str:
    """stderr is exactly one `obinfer: error:` line containing every needle."""
    err = capsys.readouterr().err
    assert err.startswith("obinfer: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _no_temp_files(root: Path) -> None:
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def cli_eval(tiny_model, monkeypatch, tmp_path):
    """run(*extra_args) -> exit code of a quick `obinfer eval` (full cache, 2 samples, 2 new tokens)."""
    from obinfer import cli
    from obinfer.cli import eval as eval_cli

    tok = ByteTokenizer()
    monkeypatch.setattr(eval_cli, "load", lambda *a, **k: (tiny_model, tok, Path("tiny")))
    out = tmp_path / "res"
    base = ["eval", "--presses", "full,streamingllm", "--ratios", "0.5", "--tasks", "niah_single_1"]
    base += ["--length", "560", "--samples", "2", "--max-new-tokens", "2", "--no-progress"]

    def run(*extra: str) -> int:
        argv = base + list(extra)
        return cli.main(argv if "--out" in extra else argv + ["--out", str(out)])

    return run, out


def _keys(path: Path) -> Counter:
    return Counter(result_key(json.loads(line)) for line in path.read_text().splitlines())


def test_cli_budgets(cli_eval, capsys):
    """--budgets alone runs no ratio (the default ratios apply only when neither is given); adding a budget
    with --resume runs just the new rows; the report has a budget table."""
    from obinfer import cli

    _, out = cli_eval  # its model and tokenizer
    base = ["eval", "--presses", "full,h2o", "--tasks", "niah_single_1", "--length", "560", "--samples", "1",
            "--max-new-tokens", "2", "--no-progress", "--out"]  # fmt: skip
    rows = lambda d: [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]  # noqa: E731
    points = lambda: sorted((r["press"], r["ratio"], r.get("budget")) for r in rows(out))  # noqa: E731
    assert cli.main([*base, str(out), "--budgets", "16,32"]) == 0
    assert points() == [("full", 0.0, 0), ("h2o", 0.0, 16), ("h2o", 0.0, 32)]
    assert cli.main([*base, str(out), "--budgets", "16,32,64", "--ratios", "0.5", "--resume"]) == 0
    added = [("h2o", 0.0, 64), ("h2o", 0.5, 0)]
    assert points() == [("full", 0.0, 0), ("h2o", 0.0, 16), ("h2o", 0.0, 32), *added]
    capsys.readouterr()
    assert cli.main(["report", str(out), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "== mode agnostic, length 560, by budget (tokens per head) ==" in text
    assert "== mode agnostic, length 560 ==" in text and "budget 64" in text
    default = out.parent / "default"
    assert cli.main([*base, str(default)]) == 0  # neither: the default ratios
    assert sorted({r["ratio"] for r in rows(default)}) == [0.0, 0.25, 0.5, 0.75]


def test_cli_resume_repairs_a_torn_results_file(cli_eval, capsys):
    run, out = cli_eval
    assert run() == 0
    path = out / "results.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 4
    path.write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed while writing row 3
    capsys.readouterr()
    assert run("--resume") == 0
    assert path.read_bytes().splitlines(keepends=True)[:2] == lines[:2]  # kept verbatim
    assert set(_keys(path).values()) == {1} and len(_keys(path)) == 4  # row 3 redone once
    # cut right before the newline: the row is whole, kept, and the next row starts on a new line
    path.write_bytes(b"".join(lines[:3])[:-1])
    assert run("--resume") == 0
    assert set(_keys(path).values()) == {1} and len(_keys(path)) == 4
    # cut inside a multi-byte UTF-8 character: not UTF-8, still a torn last line
    row = json.loads(lines[3]) | {"pred": "é" * 20}
    torn = json.dumps(row, ensure_ascii=False).encode()
    cut = torn.index("é".encode()) + 1
    path.write_bytes(b"".join(lines[:3]) + torn[:cut])
    assert run("--resume") == 0
    assert len(_keys(path)) == 4 and path.read_bytes().endswith(b"\n")
    _no_temp_files(out)


def test_cli_resume_refuses_a_damaged_middle_line(cli_eval, capsys):
    run, out = cli_eval
    assert run() == 0
    path = out / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    damaged = lines[:1] + [lines[1][:30] + "\n"] + lines[2:]
    path.write_text("".join(damaged))
    capsys.readouterr()
    assert run("--resume") == 2
    _one_line_error(capsys, f"{path}:2:", "not valid JSON")
    assert path.read_text() == "".join(damaged)  # left as it was
    path.write_text("".join(lines[:1] + ['{"task": "vt"}\n'] + lines[2:]))  # JSON, but not a result row
    assert run("--resume") == 2
    _one_line_error(capsys, f"{path}:2:", "missing")


def test_cli_regenerates_a_torn_or_undecodable_sample_file(cli_eval, capsys):
    run, out = cli_eval
    assert run() == 0
    data = out / "data" / "niah_single_1_560_42.jsonl"
    good = data.read_bytes()
    data.write_bytes(good[: len(good) // 3])  # killed while writing the cache (older versions)
    (out / "results.jsonl").unlink()
    assert run() == 0
    assert data.read_bytes() == good  # regenerated deterministically
    data.write_bytes(b"\xff\xfe" + good[2:])  # not UTF-8
    assert run("--resume") == 0
    assert data.read_bytes() == good
    _no_temp_files(out)
    data.unlink()
    data.mkdir()  # a directory where the file belongs
    capsys.readouterr()
    assert run("--resume") == 2
    _one_line_error(capsys, str(data), "directory")


def test_cli_torn_run_json_is_named(cli_eval, capsys):
    run, out = cli_eval
    assert run() == 0
    run_json = out / "run.json"
    text = run_json.read_text()
    run_json.write_text(text[: len(text) // 2])
    capsys.readouterr()
    assert run("--resume") == 2
    _one_line_error(capsys, str(run_json), "not valid JSON", "delete it")
    run_json.write_bytes(b"\xff" + text.encode())
    assert run("--resume") == 2
    _one_line_error(capsys, str(run_json), "not UTF-8")
    run_json.unlink()  # what the message says to do
    assert run("--resume") == 0
    assert json.loads(run_json.read_text()) == json.loads(text)


def test_cli_out_paths_of_the_wrong_kind(cli_eval, tmp_path, capsys):
    run, _ = cli_eval
    a_file = tmp_path / "file.txt"
    a_file.write_text("hello")
    assert run("--out", str(a_file)) == 2
    _one_line_error(capsys, str(a_file), "not a results directory")
    assert a_file.read_text() == "hello"
    (tmp_path / "d" / "results.jsonl").mkdir(parents=True)
    assert run("--out", str(tmp_path / "d")) == 2
    _one_line_error(capsys, str(tmp_path / "d" / "results.jsonl"), "is a directory")
    (tmp_path / "e" / "data").parent.mkdir()
    (tmp_path / "e" / "data").write_text("not a directory")
    assert run("--out", str(tmp_path / "e")) == 2
    _one_line_error(capsys, str(tmp_path / "e" / "data"), "not a directory")


def test_cli_unwritable_out_dir_names_the_file(cli_eval, monkeypatch, capsys):
    """A read-only (or full) output directory: one line naming the file, nothing half-written."""
    import errno
    import types

    from obinfer import storage

    run, out = cli_eval

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(out / ".run.json.x.tmp"))

    monkeypatch.setattr(storage, "tempfile", types.SimpleNamespace(mkstemp=refuse))
    assert run() == 2
    _one_line_error(capsys, "Permission denied", str(out / "run.json"))
    assert not (out / "run.json").exists() and not (out / "results.jsonl").exists()


def test_append_failure_cuts_the_partial_line_back(tmp_path, monkeypatch):
    """Disk full in the middle of a row: the file is cut back to its last whole row, the error names it."""
    import errno
    import os

    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    real_write = os.write

    def half_then_full(f: int, data) -> int:
        if f != fd:
            return real_write(f, data)
        if len(data) > 4:
            return real_write(f, bytes(data[:4]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    try:
        with pytest.raises(OSError, match="No space left") as err:
            results.append_line(fd, b'{"b": 2, "c": 3}\n', path)
    finally:
        os.close(fd)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert path.read_bytes() == b'{"a": 1}\n'


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--samples", "0"], "--samples must be >= 1"),
        (["--length", "100"], "too small for niah_single_1"),
        (["--length", "0"], "too small"),
        (["--length", "4096"], "does not fit the model"),
        (["--ratios", "1.0"], "ratios must be in (0, 1)"),
        (["--ratios", "-0.25"], "ratios must be in (0, 1)"),
        (["--ratios", "nan"], "ratios must be in (0, 1)"),
        (["--ratios", "half"], "--ratios expects"),
        (["--presses", "snapkv-nope"], "unknown press"),
        (["--tasks", "niah_single_1,nope"], "unknown task(s) nope"),
        (["--modes", "sideways"], "unknown mode"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--budgets", "0"], "budgets must be integers >= 1 (tokens per KV head), got 0"),
        (["--budgets", "64,-8"], "budgets must be integers >= 1"),
        (["--budgets", "abc"], "--budgets expects comma-separated integers, got 'abc'"),
        (["--budgets", "64.5"], "--budgets expects comma-separated integers"),
        (["--budgets", ","], "--budgets is empty"),
    ],
)
def test_cli_out_of_range_options(cli_eval, capsys, args, needle):
    run, out = cli_eval
    assert run(*args) == 2
    _one_line_error(capsys, needle)
    assert not (out / "results.jsonl").exists()


def test_library_range_checks(tmp_path):
    count = lambda text: len(text.split())
    with pytest.raises(runner.EvalError, match="samples must be >= 1"):
        samples.load_or_make_samples(tmp_path, "vt", 2048, 0, 42, count)
    with pytest.raises(runner.EvalError, match="unknown RULER task"):
        samples.load_or_make_samples(tmp_path, "nope", 2048, 1, 42, count)
    with pytest.raises(runner.EvalError, match="too small for vt"):
        samples.load_or_make_samples(tmp_path, "vt", 10, 1, 42, count)
    with pytest.raises(runner.EvalError, match="does not fit the model"):
        protocol.check_length("vt", 1000, 30, limit=512)
    protocol.check_length("niah_single_1", 560, 128, limit=512, max_new_tokens=3)  # 432 + 3 fits
    assert not list(tmp_path.iterdir())


def test_run_eval_checks_its_out_dir(tiny_model, tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    cfg = EvalConfig(["full"], [])
    with pytest.raises(runner.EvalError, match="not a results directory"):
        run_eval(tiny_model, ByteTokenizer(), _rows(1), cfg, a_file, progress=False)
    row = _rows(1)[0] | {"max_seq_length": 4096, "max_new_tokens": 6}
    with pytest.raises(runner.EvalError, match="does not fit the model"):
        run_eval(tiny_model, ByteTokenizer(), [row], cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_atomic_writes(tmp_path):
    import os

    from obinfer import storage

    path = tmp_path / "f.txt"
    storage.atomic_write_text(path, "old")
    os.chmod(path, 0o640)
    storage.atomic_write_text(path, "new é")
    assert path.read_text(encoding="utf-8") == "new é" and (path.stat().st_mode & 0o777) == 0o640
    with pytest.raises(KeyboardInterrupt), storage.atomic_path(path) as tmp:  # killed mid-write
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text(encoding="utf-8") == "new é" and os.listdir(tmp_path) == ["f.txt"]
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        storage.atomic_write_text(tmp_path, "x")
    with pytest.raises(FileNotFoundError) as err:
        storage.atomic_write_bytes(tmp_path / "missing" / "g.bin", b"x")
    assert err.value.filename == str(tmp_path / "missing" / "g.bin")  # the target, not the temp file
    fresh = storage.atomic_write_bytes(tmp_path / "h.bin", b"\x00")
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.read_bytes() == b"\x00" and (fresh.stat().st_mode & 0o777) == 0o666 & ~umask


def test_runs_without_tqdm(tiny_model, tmp_path, monkeypatch, caplog):
    """tqdm is optional (the eval extra): without it, progress is a plain logged line."""
    import logging
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` raises ImportError
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.0)
    cfg = EvalConfig(["full", "snapkv"], [0.5])
    with caplog.at_level(logging.INFO, logger="obinfer.eval.runner"):
        rows = run_eval(tiny_model, ByteTokenizer(), _rows(1), cfg, tmp_path, progress=True)
    assert len(rows) == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "obinfer.eval.runner"]
    assert lines == [f"eval: {i}/2 answers (niah_single_1 #0 agnostic)" for i in (1, 2)]


# ------------------------------------------------------------------ results.py
def _result_rows(n: int = 3) -> list[dict]:
    return [
        {
            "task": "vt",
            "length": 1000,
            "index": i,
            "press": "adakv-snapkv-obk",
            "ratio": 0.5,
            "mode": "agnostic",
            "score": 1.0,
            "pred": "é",
        }
        for i in range(n)
    ]


def test_result_keys_tell_budgets_apart_and_read_old_rows():
    """A row written before budgets existed (no "budget") has the key of the same ratio combo now; a
    budget row's key holds its budget."""
    sample = _rows(1)[0]
    cfg = EvalConfig(["snapkv"], [0.5], budgets=[64, 128])
    new = [runner._base_row(sample, "agnostic", c, cfg) for c in cfg.combos]
    assert [(r["ratio"], r["budget"]) for r in new] == [(0.5, 0), (0.0, 64), (0.0, 128)]
    old = {k: v for k, v in new[0].items() if k != "budget"}
    assert result_key(old) == result_key(new[0]) and result_key(old | {"budget": None}) == result_key(new[0])
    assert len({result_key(r) for r in new}) == 3
    assert result_key(new[1]) == ("niah_single_1", 512, 0, "snapkv", 0.0, "agnostic", 64)
    good = _result_rows(1)[0]
    assert results.row_problem(good | {"budget": 64}) is None
    for bad in ("64", -1, 1.5, True):
        assert results.row_problem(good | {"budget": bad}) == "budget must be an integer >= 0"


def test_decode_json_names_the_problem():
    assert results.decode_json(b'{"a": 1}') == ({"a": 1}, None)
    assert results.decode_json(b"\xff{}") == (None, "not UTF-8")
    assert results.decode_json(b'{"a": ') == (None, "not valid JSON")
    assert results.decode_json(b"[" * 100_000) == (None, "not valid JSON")  # too deep to parse


def test_result_keys_and_press_names():
    row = _result_rows(1)[0] | {"length": "1000", "ratio": 0.5000000001}
    assert result_key(row) == ("vt", 1000, 0, "adakv-snapkv-obk", 0.5, "agnostic", 0)
    assert results.row_problem(row) is None
    assert results.row_problem(row | {"press": "my_policy-my_score"}) is None  # the shape, not the registry
    assert results.row_problem(row | {"press": "snapkv-obk-x-y"}) == "'snapkv-obk-x-y' is not a press name"
    assert results.press_name("adakv-snapkv-obk") is results.press_name("adakv-snapkv-obk")  # parsed once
    assert results.press_name("adakv-snapkv-obk").family == "adakv-snapkv"


def test_appender_writes_whole_lines_and_resume_repairs_a_torn_end(tmp_path):
    path = tmp_path / "results.jsonl"
    rows = _result_rows()
    with results.appender(path) as append:
        for r in rows:
            append(r)
    data = path.read_bytes()
    assert data.count(b"\n") == 3 and "é".encode() in data  # one UTF-8 line per row
    assert results.read_results(path) == rows
    keys = {result_key(r) for r in rows}
    assert results.open_for_resume(path, resume=True).keys() == keys
    with pytest.raises(results.ResultsError, match="--resume"):
        results.open_for_resume(path, resume=False)
    path.write_bytes(data + data[:20])  # a torn last line: dropped, atomically
    assert results.scan_for_resume(path) == (rows, data)
    assert results.open_for_resume(path, resume=True).keys() == keys and path.read_bytes() == data
    path.write_bytes(data[:-1])  # a whole last row without its newline: kept, newline added
    assert results.open_for_resume(path, resume=True).keys() == keys and path.read_bytes() == data
    lines = data.splitlines(keepends=True)
    path.write_bytes(lines[0] + b"{oops\n" + lines[2])
    with pytest.raises(
        results.ResultsError, match=r"jsonl:2: not valid JSON \(a damaged line before the last"
    ):
        results.open_for_resume(path, resume=True)
    with pytest.raises(results.ResultsError, match=r"jsonl:2: not valid JSON; fix or delete"):
        results.read_results(path, strict=True)
    assert results.read_results(path, with_errors=True) == ([rows[0], rows[2]], 1)
    _no_temp_files(tmp_path)


def test_output_dir_names_a_file_in_the_way(tmp_path):
    assert results.output_dir(tmp_path / "a" / "b", "(x)").is_dir()
    (tmp_path / "f").write_text("")
    with pytest.raises(results.ResultsError, match=r"f is a file, not a directory \(the sample cache\)"):
        results.output_dir(tmp_path / "f", "(the sample cache)")


def test_run_info_is_recorded_and_checked_on_resume(tmp_path):
    out, info = tmp_path / "out", {"model": "tiny", "dtype": "float32", "seed": 42, "chat": True}
    results.check_run_info(out, info, resume=False)
    assert results.read_run_info(out / results.RUN_FILE) == info
    results.check_run_info(out, info | {"note": 1}, resume=True)  # only RUN_KEYS must match
    with pytest.raises(
        results.ResultsError, match=r"different settings \(seed: 42 -> 7, chat: True -> False\)"
    ):
        results.check_run_info(out, info | {"seed": 7, "chat": False}, resume=True)
    results.check_run_info(out, info | {"seed": 7}, resume=False)  # a fresh run records its own
    assert results.read_run_info(out / results.RUN_FILE)["seed"] == 7
    (out / results.RUN_FILE).write_text("[1]")
    with pytest.raises(results.ResultsError, match="not a JSON object"):
        results.check_run_info(out, info, resume=True)


def test_cli_order_by_sample_interleaves_the_tasks(cli_eval):
    """--order sample: sample 0 of every task, then sample 1, ...; the same rows as --order task."""
    from obinfer.eval.samples import order_samples

    run, out = cli_eval
    assert run("--tasks", "niah_single_1,niah_single_2", "--order", "sample") == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["index"], r["task"]) for r in rows if r["press"] == "full"] == [
        (0, "niah_single_1"),
        (0, "niah_single_2"),
        (1, "niah_single_1"),
        (1, "niah_single_2"),
    ]
    other = out.parent / "by_task"
    assert run("--tasks", "niah_single_1,niah_single_2", "--out", str(other)) == 0
    by_task = [json.loads(line) for line in (other / "results.jsonl").read_text().splitlines()]
    assert [r["task"] for r in by_task if r["press"] == "full"] == ["niah_single_1"] * 2 + [
        "niah_single_2"
    ] * 2
    assert _keys(out / "results.jsonl") == _keys(other / "results.jsonl")
    with pytest.raises(ValueError, match="unknown sample order"):
        order_samples([], "random")


def test_cli_press_options_reach_every_press_and_pin_the_run(cli_eval, capsys):
    """--press-opt goes to every press but full (here StreamingLLM's sink count), is recorded in
    run.json, and a --resume with other options is refused; an option no press takes is one line naming
    it, before anything runs."""
    from obinfer.eval.runner import Combo, EvalConfig

    cfg = EvalConfig(["full", "streamingllm"], [0.5], press_opts={"sinks": 8}, budgets=[32])
    assert {str(c): cfg.press(c).policy.sinks for c in cfg.combos if c.press != "full"} == {
        str(Combo("streamingllm", 0.5)): 8,
        str(Combo("streamingllm", 0.0, 32)): 8,
    }
    assert cfg.press(Combo("full", 0.0)).is_full
    run, out = cli_eval
    assert run("--press-opt", "sinks=8") == 0
    info = json.loads((out / "run.json").read_text())
    assert info["press_opts"] == {"sinks": 8}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["press"] for r in rows} == {"full", "streamingllm"}
    assert run("--press-opt", "sinks=4", "--resume") == 2
    _one_line_error(capsys, "press_opts", "sinks")
    assert run("--press-opt", "sinks=8", "--resume") == 0
    other = out.parent / "other"
    assert run("--press-opt", "nope=1", "--out", str(other)) == 2
    _one_line_error(capsys, "nope")
    assert not (other / "results.jsonl").exists()
    assert run("--press-opt", "novalue", "--out", str(other)) == 2
    _one_line_error(capsys, "KEY=VALUE")
