"""RULER evaluation runner: kvpress's protocol, with one prefill per sample shared by every press.

Protocol (docs/ruler.md section 1.6, `obinfer/eval/protocol.py`): the context is wrapped in the chat
template's user turn and prefilled; the cache is compressed; then ``question + template suffix + answer
prefix`` is fed at the positions that follow the *uncompressed* context, and the answer is decoded
greedily (stop ids or ``max_new_tokens``), post-processed and scored with RULER's string match. In
query-aware mode (``mode="aware"``) the question is appended to the context before compression and only
the template suffix + answer prefix follow it.

One prefill serves every press: compressing a layer never changes that layer's forward pass (the
press runs after the layer's attention) and the next layer's input does not depend on the layer's cache.
So the runner prefills once (`obinfer/cache/fanout.py:Fanout`, recording the queries the presses
read), then for each (press, ratio) forks the full cache and runs exactly the press's prefill
compression on the recorded queries, layer by layer, scoring each layer once per policy and score.
The result is the cache a press-in-the-loop prefill would have produced (tests/test_eval_runner.py
checks the answers are identical). ``reprefill=True`` runs the naive
loop (a fresh prefill per press) for timing comparisons.

Absolute budgets (``budgets=``, tokens per KV head, rows with ``budget`` M > 0 and ratio 0) run each
press exactly as ``obinfer generate --cache-budget M`` does (`obinfer.generate.stream` with
``make_press(name, budget=M)``): a prefill of its own, keeping at most M tokens per head, then the
question and the answer. They cannot share the prefill: presses that evict while decoding (h2o, tova,
trimkv) keep evicting through the question and every decoded token, which a compressed fork of one
prefill, decoded without the press, would not do.

Results are appended to ``<out>/results.jsonl`` one row per (sample, press, ratio or budget, mode) as
they arrive, each line whole and fsync'ed, so an interrupted run loses nothing and ``resume=True``
continues it (`obinfer/eval/results.py`). Under torchrun (``group=``), each rank runs its share of the
samples into its own shard and rank 0 merges them at the end (`obinfer/eval/distributed.py`). A
progress bar needs tqdm (the ``eval`` extra); without it, a progress line is logged every few seconds.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Any

import torch

from obinfer.cache.fanout import Fanout
from obinfer.cache.kv_cache import KVCache
from obinfer.cache.presses import FULL_NAME, Press, PressName, make_press
from obinfer.eval import EvalError
from obinfer.eval import distributed as dist
from obinfer.eval.metrics import score_row
from obinfer.eval.protocol import MODES, answer_cap, check_fits, check_length, sample_prompt
from obinfer.eval.results import (
    appender,
    check_out_dir,
    final_rows,
    needs_run,
    open_for_resume,
    output_dir,
    read_results,
    repair_for_append,
    result_key,
    shard_files,
)
from obinfer.generate import GenStats, stream
from obinfer.models.llama import Transformer

PROGRESS_EVERY_S = 10.0  # without tqdm: seconds between progress lines

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Combo:
    """One compressed variant of a sample: press name and either a compression ratio (0.0 for full) or,
    with ``budget`` M > 0 (ratio 0.0), an absolute budget of M tokens per KV head."""

    press: str
    ratio: float
    budget: int = 0


def combo_press(combo: Combo, options: dict[str, Any] | None = None) -> Press:
    """The press of a combo: its ratio, or its budget; `options` (policy, allocator, layer budget or query
    source options, as `make_press` takes them) go to every press but the full cache."""
    opts = {} if combo.press == FULL_NAME else dict(options or {})
    if combo.budget:
        return make_press(combo.press, budget=combo.budget, **opts)
    return make_press(combo.press, compression_ratio=combo.ratio, **opts)  # "full": FULL


@dataclass
class EvalConfig:
    """What to run for every sample.

    Attributes:
        presses: press names ("full", "snapkv", "adakv-snapkv-obk", ...).
        ratios: compression ratios (fraction removed), each in (0, 1); "full" runs once, at ratio 0.
        budgets: absolute budgets, tokens kept per KV head (integers >= 1), each run like
            ``obinfer generate --cache-budget M``: presses that evict while decoding (h2o, tova, trimkv)
            hold at most M tokens per head during the prefill and while decoding; the others compress
            to M after the prefill. Every press prefills on its own for these.
        modes: "agnostic" (question after compression) and/or "aware" (question compressed too).
        chat: wrap in the chat template; None = when the tokenizer has one.
        max_new_tokens: cap on the task's max_new_tokens (None = the task's own).
        reprefill: prefill again for every press (the naive loop; same answers, slower).
        batch: compressed caches of one sample decoded together as one batch of (ragged) rows; bounds
            memory (each row holds its own compressed cache); 1 decodes them one at a time.
        prefill_chunk: block-wise prefill with this many tokens per block (every press prefills on its
            own, compressing after each block: `PressRun.prefill`); None: one-shot.
        model_name: recorded in every result row.
        press_opts: options for every press but the full cache (``obinfer eval --press-opt``), e.g.
            {"window": 16} or {"gates": "my-gates.safetensors"}; a press that does not take one is a
            PressError before anything runs.
    """

    presses: Sequence[str]
    ratios: Sequence[float]
    modes: Sequence[str] = ("agnostic",)
    chat: bool | None = None
    max_new_tokens: int | None = None
    reprefill: bool = False
    model_name: str = ""
    batch: int = 8
    prefill_chunk: int | None = None
    budgets: Sequence[int] = ()
    press_opts: dict[str, Any] = field(default_factory=dict)
    combos: list[Combo] = field(init=False)

    def __post_init__(self) -> None:
        for name in self.presses:
            PressName.parse(name)  # PressError listing the valid names
        for r in self.ratios:
            if not 0.0 < r < 1.0:
                raise EvalError(f"compression ratios must be in (0, 1), got {r}")
        for b in self.budgets:
            if isinstance(b, bool) or not isinstance(b, Integral) or b < 1:
                raise EvalError(f"budgets must be integers >= 1 (tokens per KV head), got {b!r}")
        self.budgets = [int(b) for b in self.budgets]
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise EvalError(f"unknown mode(s) {bad or self.modes}; choose from {', '.join(MODES)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise EvalError(f"batch must be an integer >= 1, got {self.batch!r}")
        c = self.prefill_chunk
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise EvalError(f"prefill_chunk must be an integer >= 1 (tokens per block), got {c!r}")
        self.combos = press_grid(self.presses, self.ratios, self.budgets)
        for c in self.combos:
            self.press(c)  # PressError now (a bad budget or option), not after hours of other rows

    def press(self, combo: Combo) -> Press:
        """The press of one of the combos, with `press_opts`."""
        return combo_press(combo, self.press_opts)


def press_grid(presses: Sequence[str], ratios: Sequence[float], budgets: Sequence[int] = ()) -> list[Combo]:
    """Every (press, ratio) and (press, budget) to run per sample; "full" once at ratio 0.0 and last.

    Full goes last because the shared-prefill runner decodes it on the uncompressed cache itself,
    after every other press has forked that cache. A budget combo is ``Combo(name, 0.0, M)``.
    """
    if not presses:
        raise EvalError("no presses given")
    out: list[Combo] = []
    for name in dict.fromkeys(presses):
        if name != FULL_NAME:
            if not ratios and not budgets:
                raise EvalError(f"press {name} needs at least one compression ratio or budget")
            out += [Combo(name, float(r)) for r in dict.fromkeys(ratios)]
            out += [Combo(name, 0.0, int(b)) for b in dict.fromkeys(budgets)]
    if FULL_NAME in presses:
        out.append(Combo(FULL_NAME, 0.0))
    return out


def run_order(combos: Sequence[Combo]) -> list[Combo]:
    """The order `run_sample` yields a sample's rows in: the budget combos (a prefill each), then the
    ratio combos (one shared prefill, full last)."""
    return [c for c in combos if c.budget] + [c for c in combos if not c.budget]


# ------------------------------------------------------------------------------------------ decoding
def answer(
    model: Transformer, tok: Any, cache: KVCache, q_ids: Sequence[int], max_new: int
) -> tuple[str, int]:
    """Feed q_ids (at the positions after the uncompressed context) and decode greedily.

    Returns:
        (decoded text without stop tokens, number of generated tokens without stop tokens).
    """
    stops = set(tok.stop_ids)
    gen = stream(model, [q_ids], max_new_tokens=max_new, stop_ids=stops, cache=cache)
    out = [t for t in (int(x[0]) for x in gen) if t not in stops]
    return tok.decode(out), len(out)


def answer_batch(
    model: Transformer, tok: Any, caches: Sequence[KVCache], q_ids: Sequence[int], max_new: int
) -> list[tuple[str, int]]:
    """`answer` for several compressed caches of one context at once: one batch of (ragged) rows, so
    the weights are read once per step for all of them, and a row that has stopped leaves the batch
    (`drop_finished`). Greedy, so each row's tokens are the ones `answer` gives for that cache alone
    (tests/test_eval_runner.py checks it).
    """
    if len(caches) == 1:
        return [answer(model, tok, caches[0], q_ids, max_new)]
    stops = set(tok.stop_ids)
    stacked = KVCache.cat_rows(list(caches))
    steps = [x.tolist() for x in stream(model, [list(q_ids)] * len(caches), max_new_tokens=max_new,
                                        stop_ids=stops, cache=stacked, drop_finished=True)]  # fmt: skip
    out = []
    for r in range(len(caches)):
        toks = []
        for step in steps:
            if step[r] in stops:
                break
            toks.append(step[r])
        out.append((tok.decode(toks), len(toks)))
    return out


# ---------------------------------------------------------------------------------------- one sample
def _base_row(row: dict[str, Any], mode: str, combo: Combo, cfg: EvalConfig) -> dict[str, Any]:
    return {
        "task": row["task"],
        "length": int(row.get("max_seq_length", 0)),
        "index": int(row["index"]),
        "press": combo.press,
        "ratio": combo.ratio,
        "budget": combo.budget,
        "mode": mode,
        "model": cfg.model_name,
        "answers": list(row["answers"]),
        "n_tokens": row.get("n_tokens"),
        "depth": row.get("depth", []),
        "haystack": row.get("haystack"),
    }


def _finish(res: dict[str, Any], pred: str, n_new: int, task: str) -> dict[str, Any]:
    res.update(pred=pred, new_tokens=n_new, score=score_row(pred, res["answers"], task))
    return res


def run_sample(
    model: Transformer, tok: Any, row: dict[str, Any], mode: str, combos: Sequence[Combo], cfg: EvalConfig
) -> Iterator[dict[str, Any]]:
    """Result rows of one sample in one mode for `combos`, in `run_order`: budget combos one prefill each,
    then ratio combos (one shared prefill, or one per combo)."""
    prompt = sample_prompt(tok, row, mode, cfg.chat)
    max_new = answer_cap(row["max_new_tokens"], cfg.max_new_tokens)
    check_fits(row, prompt, max_new, model.cfg.max_position_embeddings)
    ctx, q = prompt.prefill, prompt.after
    by_budget = [c for c in combos if c.budget]
    by_ratio = [c for c in combos if not c.budget]
    if cfg.reprefill or cfg.prefill_chunk is not None:  # chunked: each press's own block-wise prefill
        ratio_results = _reprefilled(model, tok, ctx, q, max_new, by_ratio, cfg.prefill_chunk, cfg.press)
    else:
        ratio_results = (
            _shared(model, tok, ctx, q, max_new, by_ratio, cfg.batch, cfg.press) if by_ratio else iter(())
        )
    results = itertools.chain(
        _budgeted(model, tok, ctx, q, max_new, by_budget, cfg.prefill_chunk, cfg.press), ratio_results
    )
    for combo, res in results:
        out = _base_row(row, mode, combo, cfg)
        out.update(prompt_tokens=len(ctx), question_tokens=len(q), cap=max_new)
        out.update(res)
        yield _finish(out, out.pop("_pred"), out.pop("_new"), row["task"])


def _shared(
    model: Transformer,
    tok: Any,
    ctx: list[int],
    q: list[int],
    max_new: int,
    combos: Sequence[Combo],
    batch: int = 1,
    make: Callable[[Combo], Press] = combo_press,
) -> Iterator[tuple[Combo, dict[str, Any]]]:
    """One prefill; each press compresses a fork of it (the last one, usually full, the prefill itself);
    the compressed caches are decoded `batch` at a time as one batch of rows."""
    presses = [make(c) for c in combos]
    fan = Fanout(model, ctx, presses)
    prefill_s, full_bytes, full_tokens = fan.prefill_s, fan.cache.nbytes(), fan.cache.n_tokens()
    for start in range(0, len(combos), batch):
        group = range(start, min(start + batch, len(combos)))
        caches, results = [], []
        for i in group:
            t0 = time.perf_counter()
            cache = fan.compress(presses[i], in_place=i == len(combos) - 1)
            res = _cache_fields(cache, full_bytes, full_tokens)
            res.update(prefill_s=prefill_s, compress_s=time.perf_counter() - t0, shared_prefill=True)
            caches.append(cache)
            results.append(res)
        t1 = time.perf_counter()
        answers = answer_batch(model, tok, caches, q, max_new)
        decode_s = time.perf_counter() - t1
        for i, res, (pred, n_new) in zip(group, results, answers, strict=True):
            res.update(_pred=pred, _new=n_new, decode_s=decode_s, decode_rows=len(group))
            yield combos[i], res


def _reprefilled(
    model: Transformer,
    tok: Any,
    ctx: list[int],
    q: list[int],
    max_new: int,
    combos: Sequence[Combo],
    chunk: int | None = None,
    make: Callable[[Combo], Press] = combo_press,
) -> Iterator[tuple[Combo, dict[str, Any]]]:
    """The naive loop: a fresh prefill per press, compressing inside it (the press's prefill observer)."""
    ids = torch.tensor([ctx], device=model.device)
    for combo in combos:
        run = make(combo).start(model=model)
        t0 = time.perf_counter()
        cache = model.new_cache(1)
        with torch.inference_mode():
            run.prefill(model, ids, cache, chunk=chunk)  # every press; block-wise with a chunk
        t1 = time.perf_counter()
        full_bytes = run.bytes_before or cache.nbytes()
        res = _cache_fields(cache, full_bytes, len(ctx) * sum(L.n_segments for L in cache.layers))
        res["_pred"], res["_new"] = answer(model, tok, cache, q, max_new)
        res.update(prefill_s=t1 - t0, compress_s=0.0, decode_s=time.perf_counter() - t1, shared_prefill=False)
        if chunk is not None:
            res.update(prefill_chunk=chunk, cache_bytes_peak=max(run.peak_bytes, full_bytes))
        yield combo, res


def _budgeted(
    model: Transformer,
    tok: Any,
    ctx: list[int],
    q: list[int],
    max_new: int,
    combos: Sequence[Combo],
    chunk: int | None = None,
    make: Callable[[Combo], Press] = combo_press,
) -> Iterator[tuple[Combo, dict[str, Any]]]:
    """Each budget combo exactly as ``obinfer generate --cache-budget M`` runs it: `stream` with
    ``make_press(name, budget=M)``, its own prefill (block-wise with a chunk), `q` fed after it.

    Besides `_reprefilled`'s fields, a row records ``cache_bytes_peak`` (most K/V bytes during the
    prefill), ``cache_bytes_end`` and ``head_tokens_end`` (K/V bytes, and the most tokens one KV head
    holds, once the answer is decoded: at most M for a press that evicts while decoding).
    """
    stops = set(tok.stop_ids)
    for combo in combos:
        press = make(combo)
        cache = model.new_cache(1)
        stats = GenStats()
        t0 = time.perf_counter()
        steps = stream(model, [ctx], questions=[q], press=press, max_new_tokens=max_new, stop_ids=stops,
                       cache=cache, stats=stats, prefill_chunk=chunk)  # fmt: skip
        out = [t for t in (int(x[0]) for x in steps) if t not in stops]  # ends after a stop token
        total_s = time.perf_counter() - t0
        res = {
            "cache_bytes_full": stats.cache_bytes_full,
            "cache_bytes": stats.cache_bytes_kept,
            "full_tokens": len(ctx) * sum(L.n_segments for L in cache.layers),
            "kept_tokens": stats.cache_tokens_kept,  # after the prefill, before the question
            "_pred": tok.decode(out),
            "_new": len(out),
            "prefill_s": stats.prefill_s,
            "compress_s": 0.0,
            "decode_s": total_s - stats.prefill_s,  # the question and the answer, as `_reprefilled`
            "shared_prefill": False,
            "cache_bytes_peak": stats.cache_bytes_peak,
            "cache_bytes_end": stats.cache_bytes,
            "head_tokens_end": max(hi for _, _, hi in stats.kept_per_layer),
        }
        if chunk is not None:
            res["prefill_chunk"] = chunk
        yield combo, res


def _cache_fields(cache: KVCache, full_bytes: int, full_tokens: int) -> dict[str, Any]:
    """K/V bytes and slots before and after compression (before the question is fed)."""
    return {
        "cache_bytes_full": full_bytes,
        "cache_bytes": cache.nbytes(),
        "full_tokens": full_tokens,
        "kept_tokens": cache.n_tokens(),
    }


# ----------------------------------------------------------------------------------------- the loop
def _check_lengths(model: Transformer, samples: Sequence[dict[str, Any]], cfg: EvalConfig) -> None:
    """Fail before running anything if a sample's length budget cannot fit the model's positions."""
    seen = set()
    for row in samples:
        if "max_seq_length" not in row or "max_new_tokens" not in row:
            continue
        key = (row["task"], int(row["max_seq_length"]), int(row["max_new_tokens"]))
        if key not in seen:
            seen.add(key)
            check_length(*key, model.cfg.max_position_embeddings, cfg.max_new_tokens)


def _pending(
    samples: Sequence[dict], cfg: EvalConfig, done: dict[tuple, dict[str, Any]]
) -> list[tuple[dict, str, list[Combo]]]:
    """(sample, mode, combos) still to run: no result yet, or one cut short by a smaller cap (`needs_run`)."""
    work = []
    for row in samples:
        cap = answer_cap(row["max_new_tokens"], cfg.max_new_tokens)
        for mode in cfg.modes:
            todo = [
                c for c in cfg.combos if needs_run(done.get(result_key(_base_row(row, mode, c, cfg))), cap)
            ]
            if todo:
                work.append((row, mode, todo))
    return work


class _Progress:
    """tqdm's bar when tqdm is installed, else a plain line logged at most every PROGRESS_EVERY_S."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.where = total, done, enabled, ""
        self.last = time.monotonic()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, initial=done, unit="answer", desc="eval")

    def at(self, where: str) -> None:
        self.where = where
        if self.bar is not None:
            self.bar.set_postfix_str(where, refresh=False)

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and (now - self.last >= PROGRESS_EVERY_S or self.done == self.total):
            self.last = now
            logger.info("eval: %d/%d answers (%s)", self.done, self.total, self.where)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def result_order(samples: Sequence[dict[str, Any]], cfg: EvalConfig) -> dict[tuple, int]:
    """Row key -> its place in the order a single process writes a fresh run's rows."""
    combos = run_order(cfg.combos)
    keys = (result_key(_base_row(row, mode, c, cfg)) for row in samples for mode in cfg.modes for c in combos)
    return {k: i for i, k in enumerate(keys)}


def run_eval(
    model: Transformer,
    tok: Any,
    samples: Sequence[dict[str, Any]],
    cfg: EvalConfig,
    out_dir: Path | str,
    *,
    resume: bool = False,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    group: dist.Group | None = None,
) -> list[dict[str, Any]]:
    """Run every (sample, mode, press, ratio or budget) not yet in ``<out_dir>/results.jsonl`` and
    append it there.

    Args:
        tok: a tokenizer object (encode(text, add_bos=), decode(ids), chat_parts(), stop_ids,
            has_chat_template, bos_id).
        samples: rows from `make_ruler` (task, index, context, question, answer_prefix, answers,
            max_new_tokens, max_seq_length, ...).
        resume: continue an existing results file, skipping finished rows (a torn last line, left by a
            kill, is dropped and its row redone).
        progress: a progress bar (tqdm), or without tqdm a progress line every few seconds.
        on_result: called with each new result row right after it is written.
        group: the ranks of a torchrun job (every rank calls this with the same samples): this rank runs
            its share into its shard; rank 0 waits for the others and merges every shard into
            ``results.jsonl``. Rows finished in any earlier run (any world size, shards included) are
            skipped.
    Returns:
        Every row of the results file (under torchrun: rank 0 the merged rows, another rank its shard's).
    Raises:
        EvalError: bad settings, an `out_dir` that is a file, results already there without `resume`,
            a damaged results file, a sample that does not fit the model; DistributedError: a rank that
            did not start, died or hangs.
        OSError: the results cannot be written (read-only directory, disk full), naming the file.
    """
    out_dir = Path(out_dir)
    world = group.world if group is not None else dist.World()
    path = check_out_dir(out_dir, resume, scan=False)
    _check_lengths(model, samples, cfg)
    output_dir(out_dir, "(the results directory)")
    if group is not None and world.is_distributed:
        group.barrier("the start of the evaluation")  # every rank checked out_dir: now they write
        path = dist.shard_path(out_dir, world)
        output_dir(path.parent, "(the shards of a torchrun job)")
        mine = repair_for_append(path)
    else:
        mine = open_for_resume(path, resume)
    done = final_rows([*mine.values(), *dist.finished_rows(out_dir, skip=path).values()])
    my_share = dist.my_samples(list(samples), world)
    work = _pending(my_share, cfg, done)
    total = len(my_share) * len(cfg.modes) * len(cfg.combos)
    bar = _Progress(total, total - sum(len(c) for _, _, c in work), progress)
    die_after, written = dist.die_after_rows(world), 0
    try:
        with appender(path) as append:
            for row, mode, combos in work:
                bar.at(f"{row['task']} #{row['index']} {mode}")
                for res in run_sample(model, tok, row, mode, combos, cfg):
                    append(res)
                    written += 1
                    if group is not None:
                        group.row_done()
                    if written == die_after:
                        dist.die_now(path)
                    bar.step()
                    if on_result is not None:
                        on_result(res)
    finally:
        bar.close()
    if group is not None and world.is_distributed:
        group.finish()
        if not world.is_main:
            return read_results(path)
        group.wait_for_ranks()
        return dist.merge_results(out_dir, result_order(samples, cfg))
    if shard_files(out_dir):  # a torchrun job's shards, resumed in one process
        return dist.merge_results(out_dir, result_order(samples, cfg))
    return read_results(path)
