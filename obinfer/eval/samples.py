"""The sample cache of a results directory: ``<out>/data/<task>_<length>_<seed>.jsonl``.

Samples are derived data (``obinfer/eval/tasks.py:make_ruler`` is deterministic): a cache file is
(re)generated when it is missing, too short, unreadable, or built with other settings, and it is
replaced atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from obinfer.errors import ObinferError
from obinfer.eval import EvalError, haystack, tasks
from obinfer.eval.protocol import check_length
from obinfer.eval.results import decode_json, output_dir

SAMPLE_FIELDS = ("task", "index", "context", "question", "answer_prefix", "answers", "max_new_tokens")

logger = logging.getLogger(__name__)


def sample_path(out_dir: Path | str, task: str, length: int, seed: int) -> Path:
    return Path(out_dir) / "data" / f"{task}_{length}_{seed}.jsonl"


def check_lengths(
    names: Sequence[str], lengths: Sequence[int], limit: int | None = None, max_new_tokens: int | None = None
) -> None:
    """:func:`obinfer.eval.protocol.check_length` for every (task, length), with each task's answer length."""
    for task in names:
        for length in lengths:
            check_length(task, length, tasks.TASKS[task].max_new_tokens, limit, max_new_tokens)


def load_samples(
    out_dir: Path | str,
    names: Sequence[str],
    lengths: Sequence[int],
    n: int,
    seed: int,
    count_tokens: Callable[[str], int],
    noise_fallback: bool = False,
    essays_dir: Path | str | None = None,
) -> list[dict[str, Any]]:
    """:func:`load_or_make_samples` for every length, then every task: the samples of a run, in order."""
    return [
        row
        for length in lengths
        for task in names
        for row in load_or_make_samples(
            out_dir, task, length, n, seed, count_tokens, noise_fallback, essays_dir
        )
    ]


ORDERS = ("task", "sample")


def order_samples(rows: Sequence[dict[str, Any]], order: str) -> list[dict[str, Any]]:
    """The run's samples in the order they are evaluated: "task" (as `load_samples` gives them: every
    sample of a task, task after task) or "sample" (sample 0 of every task, then sample 1, ...: a run
    stopped early covers every task about equally, and a longer --samples run extends it evenly)."""
    if order not in ORDERS:
        raise ValueError(f"unknown sample order {order!r}; choose from {', '.join(ORDERS)}")
    return list(rows) if order == "task" else sorted(rows, key=lambda r: int(r["index"]))  # stable


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
    output_dir(path.parent, "(the sample cache)")
    tasks.save_jsonl(rows, path)
    return rows


def _cached_samples(
    path: Path, task: str, length: int, n: int, hay: str | None, count_tokens: Callable[[str], int]
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
        row, why = decode_json(line)
        if why is not None:
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
        and r.get("haystack") == hay
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
