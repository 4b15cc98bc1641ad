"""RULER evaluation runner: kvpress's protocol, with one prefill per sample shared by every press.

Protocol (docs/ruler.md section 1.6): the context is wrapped in the chat template's user turn and
prefilled; the cache is compressed; then ``question + template suffix + answer prefix`` is fed at the
positions that follow the *uncompressed* context, and the answer is decoded greedily (stop ids or
``max_new_tokens``), post-processed and scored with RULER's string match. Without a chat template the
context gets a BOS token and the question a ``"\\n"`` suffix, as in kvpress. In query-aware mode
(``mode="aware"``) the question is appended to the context before compression and only the template
suffix + answer prefix follow it.

One prefill serves every press: compressing a layer never changes that layer's forward pass (the
press runs after the layer's attention) and the next layer's input does not depend on the layer's cache.
So the runner prefills once (`obinfer/cache/fanout.py:Fanout`, recording the queries the presses
read), then for each (press, ratio) forks the full cache and runs exactly the press's prefill
compression on the recorded queries, layer by layer, scoring each layer once per policy and score.
The result is the cache a press-in-the-loop prefill would have produced (tests/test_eval_runner.py
checks the answers are identical). ``reprefill=True`` runs the naive
loop (a fresh prefill per press) for timing comparisons.

Results are appended to ``<out>/results.jsonl`` one row per (sample, press, ratio, mode) as they arrive
(each line written whole and fsync'ed, or cut back off if the write fails), so an interrupted run loses
nothing and ``resume=True`` continues it: a line torn by a kill can only be the last one, and resuming
drops it and redoes that row. Every other file (the samples in ``<out>/data``) is replaced atomically.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from obinfer.cache.fanout import Fanout
from obinfer.cache.kv_cache import KVCache
from obinfer.cache.presses import PressName, make_press
from obinfer.errors import ObinferError
from obinfer.eval.metrics import score_row
from obinfer.eval.report import ReportError, read_results, scan_results
from obinfer.generate import stream
from obinfer.models.llama import Transformer
from obinfer.storage import atomic_write_bytes, atomic_write_text, oserror_for

MODES = ("agnostic", "aware")
FULL = "full"
RESULTS_FILE = "results.jsonl"
NO_CHAT_SUFFIX = "\n"  # kvpress: the question's suffix when the tokenizer has no chat template
SAMPLE_FIELDS = ("task", "index", "context", "question", "answer_prefix", "answers", "max_new_tokens")

logger = logging.getLogger(__name__)


class EvalError(ObinferError, ValueError):
    """A bad evaluation setting or a sample that does not fit the model."""


# ----------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Combo:
    """One compressed variant of a sample: press name and compression ratio (0.0 for full)."""

    press: str
    ratio: float


@dataclass
class EvalConfig:
    """What to run for every sample.

    Attributes:
        presses: press names ("full", "snapkv", "adakv-snapkv-obk", ...).
        ratios: compression ratios (fraction removed), each in (0, 1); "full" runs once, at ratio 0.
        modes: "agnostic" (question after compression) and/or "aware" (question compressed too).
        chat: wrap in the chat template; None = when the tokenizer has one.
        max_new_tokens: cap on the task's max_new_tokens (None = the task's own).
        reprefill: prefill again for every press (the naive loop; same answers, slower).
        model_name: recorded in every result row.
    """

    presses: Sequence[str]
    ratios: Sequence[float]
    modes: Sequence[str] = ("agnostic",)
    chat: bool | None = None
    max_new_tokens: int | None = None
    reprefill: bool = False
    model_name: str = ""
    combos: list[Combo] = field(init=False)

    def __post_init__(self) -> None:
        for name in self.presses:
            PressName.parse(name)  # PressError listing the valid names
        for r in self.ratios:
            if not 0.0 < r < 1.0:
                raise EvalError(f"compression ratios must be in (0, 1), got {r}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise EvalError(f"unknown mode(s) {bad or self.modes}; choose from {', '.join(MODES)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise EvalError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.combos = press_grid(self.presses, self.ratios)


def press_grid(presses: Sequence[str], ratios: Sequence[float]) -> list[Combo]:
    """Every (press, ratio) to run per sample; "full" once at ratio 0.0 and always last.

    Full goes last because the shared-prefill runner decodes it on the uncompressed cache itself,
    after every other press has forked that cache.
    """
    if not presses:
        raise EvalError("no presses given")
    out: list[Combo] = []
    for name in dict.fromkeys(presses):
        if name != FULL:
            if not ratios:
                raise EvalError(f"press {name} needs at least one compression ratio")
            out += [Combo(name, float(r)) for r in dict.fromkeys(ratios)]
    if FULL in presses:
        out.append(Combo(FULL, 0.0))
    return out


def result_key(row: dict[str, Any]) -> tuple:
    """What identifies a result: (task, length, index, press, ratio, mode)."""
    return (
        row["task"],
        int(row["length"]),
        int(row["index"]),
        row["press"],
        round(float(row["ratio"]), 6),
        row["mode"],
    )


# ------------------------------------------------------------------------------------------ prompts
def prompt_ids(tok: Any, row: dict[str, Any], mode: str, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids (prefilled and compressed, fed after compression) for one sample, as kvpress builds them.

    agnostic: ``prefix + context`` | ``question + suffix + answer_prefix``;
    aware:    ``prefix + context + question`` | ``suffix + answer_prefix``.
    With chat, (prefix, suffix) come from ``tok.chat_parts()`` (the template writes any BOS); without,
    the prefix is the BOS token and the suffix ``"\\n"``. Both parts are encoded without added BOS.
    """
    if chat:
        prefix, suffix = tok.chat_parts()
        bos: list[int] = []
    else:
        prefix, suffix = "", NO_CHAT_SUFFIX
        bos = [tok.bos_id] if getattr(tok, "bos_id", None) is not None else []
    context, question = row["context"], row["question"]
    if mode == "aware":
        context, question = context + question, ""
    ctx = bos + tok.encode(prefix + context, add_bos=False)
    q = tok.encode(question + suffix + row["answer_prefix"], add_bos=False)
    if not ctx or not q:
        raise EvalError(f"{row['task']} #{row['index']}: empty context or question after tokenization")
    return ctx, q


def count_tokens_fn(tok: Any) -> Callable[[str], int]:
    """RULER's length measure: tokens of the raw text, without BOS or chat template."""
    return lambda text: len(tok.encode(text, add_bos=False))


# ------------------------------------------------------------------------------ shared prefill parts
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


# ------------------------------------------------------------------------------------------ samples
def _base_row(row: dict[str, Any], mode: str, combo: Combo, cfg: EvalConfig) -> dict[str, Any]:
    return {
        "task": row["task"],
        "length": int(row.get("max_seq_length", 0)),
        "index": int(row["index"]),
        "press": combo.press,
        "ratio": combo.ratio,
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


def _check_fits(model: Transformer, row: dict[str, Any], n_ctx: int, n_q: int, max_new: int) -> None:
    limit = model.cfg.max_position_embeddings
    if n_ctx + n_q + max_new > limit:
        raise EvalError(
            f"{row['task']} #{row['index']}: {n_ctx + n_q} prompt tokens + {max_new} new tokens exceed the "
            f"model's {limit} positions (use a smaller --length or --max-new-tokens)"
        )


def run_sample(
    model: Transformer, tok: Any, row: dict[str, Any], mode: str, combos: Sequence[Combo], cfg: EvalConfig
) -> Iterator[dict[str, Any]]:
    """Result rows of one sample in one mode for `combos` (one shared prefill, or one per combo)."""
    chat = tok.has_chat_template if cfg.chat is None else cfg.chat
    ctx, q = prompt_ids(tok, row, mode, chat)
    max_new = min(row["max_new_tokens"], cfg.max_new_tokens or row["max_new_tokens"])
    _check_fits(model, row, len(ctx), len(q), max_new)
    runner = _reprefilled if cfg.reprefill else _shared
    for combo, res in runner(model, tok, ctx, q, max_new, combos):
        out = _base_row(row, mode, combo, cfg)
        out.update(prompt_tokens=len(ctx), question_tokens=len(q))
        out.update(res)
        yield _finish(out, out.pop("_pred"), out.pop("_new"), row["task"])


def _shared(
    model: Transformer, tok: Any, ctx: list[int], q: list[int], max_new: int, combos: Sequence[Combo]
) -> Iterator[tuple[Combo, dict[str, Any]]]:
    """One prefill; each press compresses a fork of it (the last one, usually full, the prefill itself)."""
    presses = [make_press(c.press, compression_ratio=c.ratio) for c in combos]  # "full": FULL
    fan = Fanout(model, ctx, presses)
    prefill_s, full_bytes, full_tokens = fan.prefill_s, fan.cache.nbytes(), fan.cache.n_tokens()
    for i, (combo, press) in enumerate(zip(combos, presses, strict=True)):
        t0 = time.perf_counter()
        cache = fan.compress(press, in_place=i == len(combos) - 1)
        t1 = time.perf_counter()
        res = _cache_fields(cache, full_bytes, full_tokens)
        res["_pred"], res["_new"] = answer(model, tok, cache, q, max_new)
        res.update(
            prefill_s=prefill_s, compress_s=t1 - t0, decode_s=time.perf_counter() - t1, shared_prefill=True
        )
        yield combo, res


def _reprefilled(
    model: Transformer, tok: Any, ctx: list[int], q: list[int], max_new: int, combos: Sequence[Combo]
) -> Iterator[tuple[Combo, dict[str, Any]]]:
    """The naive loop: a fresh prefill per press, compressing inside it (the press's prefill observer)."""
    ids = torch.tensor([ctx], device=model.device)
    for combo in combos:
        run = make_press(combo.press, compression_ratio=combo.ratio).start()
        t0 = time.perf_counter()
        cache = model.new_cache(1)
        with torch.inference_mode():
            model(ids, cache, observer=run.prefill_observer(), last_only=True)
        t1 = time.perf_counter()
        full_bytes = run.bytes_before or cache.nbytes()
        res = _cache_fields(cache, full_bytes, len(ctx) * sum(L.n_segments for L in cache.layers))
        res["_pred"], res["_new"] = answer(model, tok, cache, q, max_new)
        res.update(prefill_s=t1 - t0, compress_s=0.0, decode_s=time.perf_counter() - t1, shared_prefill=False)
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
def _ensure_dir(path: Path, what: str) -> Path:
    if path.exists() and not path.is_dir():
        raise EvalError(f"{path} is a file, not a directory ({what})")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_out_dir(out_dir: Path | str, resume: bool, scan: bool = True) -> Path:
    """Check a results directory before anything runs; returns its results file.

    Raises EvalError if `out_dir` is a file, its results file is a directory, the results file already
    has rows and `resume` is off, or (resuming, with `scan`) the file has a damaged line other than a
    torn last one.
    """
    out_dir = Path(out_dir)
    path = out_dir / RESULTS_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"{out_dir} is a file, not a results directory (choose another --out)")
    if path.is_dir():
        raise EvalError(f"{path} is a directory, not a results file (remove it or choose another --out)")
    if path.is_file() and path.stat().st_size:
        if not resume:
            raise EvalError(
                f"{path} already exists: pass --resume to continue that run, or choose another --out"
            )
        if scan:
            _scan_for_resume(path)
    return path


def _scan_for_resume(path: Path) -> tuple[list[dict[str, Any]], bytes | None]:
    """(rows, repaired file content or None): a torn last line is dropped, any other bad line is fatal."""
    try:
        scan = scan_results(path)
    except ReportError as e:
        raise EvalError(str(e)) from None
    middle = [b for b in scan.bad if b.line != scan.last_line]
    if middle:
        b = middle[0]
        raise EvalError(
            f"{path}:{b.line}: {b.reason} (a damaged line before the last one; only a torn last line is "
            "repaired): fix or delete that line, then rerun with --resume"
        )
    if scan.bad:  # the last write was interrupted: keep the complete rows, redo that one
        return scan.rows, scan.data[: scan.bad[-1].offset]
    if scan.data and not scan.data.endswith(b"\n"):  # cut just before its newline: the row is whole
        return scan.rows, scan.data + b"\n"
    return scan.rows, None


def _open_results(path: Path, resume: bool) -> set[tuple]:
    """Keys already done; repairs a torn last line (atomically). Refuses to mix runs unless resuming."""
    check_out_dir(path.parent, resume, scan=False)
    if not path.exists() or path.stat().st_size == 0:
        return set()
    rows, repaired = _scan_for_resume(path)
    if repaired is not None:
        if len(repaired) < path.stat().st_size:
            logger.warning(
                "%s: dropped a torn last line (an interrupted write); its row will be redone", path
            )
        atomic_write_bytes(path, repaired)
    return {result_key(r) for r in rows}


def _append_line(fd: int, data: bytes, path: Path) -> None:
    """Append one whole line and fsync it; on any failure cut the file back to where it was."""
    pos = os.lseek(fd, 0, os.SEEK_END)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException as e:
        try:
            os.ftruncate(fd, pos)
        except OSError:
            pass  # the next --resume drops the torn line
        if isinstance(e, OSError):
            new = oserror_for(path, e)
            if new is not e:
                raise new from e
        raise


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


def check_length(
    task: str,
    length: int,
    task_new_tokens: int,
    limit: int | None = None,
    max_new_tokens: int | None = None,
) -> None:
    """Raise EvalError if `length` (RULER's max_seq_length) is out of range for the task or the model.

    A sample's prompt gets ``length - task_new_tokens`` tokens and its answer up to ``task_new_tokens``
    (capped by `max_new_tokens`), so `length` must exceed ``task_new_tokens`` and, given the model's
    `limit` positions, the prompt plus the capped answer must fit them (the chat template's few extra
    tokens are checked per sample, when its prompt is built).
    """
    if length <= task_new_tokens:
        raise EvalError(
            f"length {length} is too small for {task}: it must exceed the task's {task_new_tokens} answer tokens"
        )
    new = min(task_new_tokens, max_new_tokens or task_new_tokens)
    need = length - task_new_tokens + new
    if limit is not None and need > limit:
        raise EvalError(
            f"length {length} does not fit the model: {task} prompts get {length - task_new_tokens} tokens and "
            f"answers {new}, {need} positions in all, but the model has {limit} (use a smaller --length "
            "or --max-new-tokens)"
        )


def _pending(
    samples: Sequence[dict], cfg: EvalConfig, done: set[tuple]
) -> list[tuple[dict, str, list[Combo]]]:
    work = []
    for row in samples:
        for mode in cfg.modes:
            todo = [c for c in cfg.combos if result_key(_base_row(row, mode, c, cfg)) not in done]
            if todo:
                work.append((row, mode, todo))
    return work


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
) -> list[dict[str, Any]]:
    """Run every (sample, mode, press, ratio) not yet in ``<out_dir>/results.jsonl`` and append it there.

    Args:
        tok: a tokenizer object (encode(text, add_bos=), decode(ids), chat_parts(), stop_ids,
            has_chat_template, bos_id).
        samples: rows from `make_ruler` (task, index, context, question, answer_prefix, answers,
            max_new_tokens, max_seq_length, ...).
        resume: continue an existing results file, skipping finished rows (a torn last line, left by a
            kill, is dropped and its row redone).
        on_result: called with each new result row right after it is written.
    Returns:
        Every row of the results file.
    Raises:
        EvalError: bad settings, an `out_dir` that is a file, results already there without `resume`,
            a damaged results file, a sample that does not fit the model.
        OSError: the results cannot be written (read-only directory, disk full), naming the file.
    """
    out_dir = Path(out_dir)
    path = check_out_dir(out_dir, resume, scan=False)
    _check_lengths(model, samples, cfg)
    _ensure_dir(out_dir, "the results directory")
    done = _open_results(path, resume)
    work = _pending(samples, cfg, done)
    total = len(samples) * len(cfg.modes) * len(cfg.combos)
    todo = sum(len(c) for _, _, c in work)
    from tqdm import tqdm

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        with tqdm(total=total, initial=total - todo, disable=not progress, unit="answer", desc="eval") as bar:
            for row, mode, combos in work:
                bar.set_postfix_str(f"{row['task']} #{row['index']} {mode}", refresh=False)
                for res in run_sample(model, tok, row, mode, combos, cfg):
                    _append_line(fd, (json.dumps(res, ensure_ascii=False) + "\n").encode("utf-8"), path)
                    bar.update(1)
                    if on_result is not None:
                        on_result(res)
    finally:
        os.close(fd)
    return read_results(path)


# -------------------------------------------------------------------------------------- sample data
def sample_path(out_dir: Path | str, task: str, length: int, seed: int) -> Path:
    return Path(out_dir) / "data" / f"{task}_{length}_{seed}.jsonl"


def load_or_make_samples(
    out_dir: Path | str,
    task: str,
    length: int,
    n: int,
    seed: int,
    count_tokens: Callable[[str], int],
    noise_fallback: bool = False,
    essays_dir: Path | str | None = None,
) -> list[dict[str, Any]]:
    """The first n samples of (task, length, seed), cached in ``<out>/data/<task>_<length>_<seed>.jsonl``.

    The cache is derived data: it is (re)generated, deterministically, when it is missing, has fewer
    than n rows, was built with another haystack (e.g. the noise fallback before the essays were
    fetched) or another tokenizer, or cannot be read (torn, not UTF-8, not JSON: a warning is logged).
    It is written atomically.

    Raises:
        EvalError: n < 1, an unknown task, a length too small for the task; a directory where the
            sample file should be.
    """
    from obinfer.eval import tasks

    if n < 1:
        raise EvalError(f"the number of samples must be >= 1, got {n}")
    want = _haystack_for(task, noise_fallback, essays_dir)
    check_length(task, length, tasks.TASKS[task].max_new_tokens)
    path = sample_path(out_dir, task, length, seed)
    rows = _cached_samples(path, task, length, n, want, count_tokens)
    if rows is not None:
        return rows
    try:
        rows = tasks.make_ruler(task, length, n, seed, count_tokens, noise_fallback, essays_dir)
    except ObinferError:
        raise
    except ValueError as e:  # e.g. a length too small for the task
        raise EvalError(str(e)) from None
    _ensure_dir(path.parent, "the sample cache")
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def _cached_samples(
    path: Path, task: str, length: int, n: int, haystack: str | None, count_tokens: Callable[[str], int]
) -> list[dict[str, Any]] | None:
    """The first n cached rows if the file holds them for these settings, else None (regenerate)."""
    if path.is_dir():
        raise EvalError(f"{path} is a directory, not a sample file (remove it)")
    if not path.is_file():
        return None
    rows = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if len(rows) == n:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not valid JSON"
            logger.warning("%s:%d is unreadable (%s); regenerating the samples", path, number, why)
            return None
        if not isinstance(row, dict) or any(k not in row for k in SAMPLE_FIELDS):
            logger.warning("%s:%d is not a sample; regenerating the samples", path, number)
            return None
        rows.append(row)
    if len(rows) < n:
        return None
    same = all(
        r["task"] == task
        and r.get("max_seq_length") == length
        and r["index"] == i
        and r.get("haystack") == haystack
        for i, r in enumerate(rows)
    )
    first = rows[0]
    if not same or first.get("n_tokens") != count_tokens(
        first["context"] + first["question"] + first["answer_prefix"]
    ):
        logger.info("%s was built with other settings or another tokenizer; regenerating it", path)
        return None
    return rows


def _haystack_for(task: str, noise_fallback: bool, essays_dir: Path | str | None) -> str | None:
    from obinfer.eval import haystack, tasks

    if task not in tasks.TASKS:
        raise EvalError(f"unknown RULER task {task!r}; valid tasks: {', '.join(tasks.TASKS)}")
    kind = tasks.TASKS[task].haystack
    if kind != "essay":
        return kind
    try:
        haystack.essay_words(essays_dir)
        return "essay"
    except haystack.EssaysMissing:
        if noise_fallback:
            return "noise"
        raise
