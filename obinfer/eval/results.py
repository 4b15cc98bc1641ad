"""A results directory: ``results.jsonl`` (one row per answer), ``run.json`` (what produced it), and the
subdirectories the runner and the report write into (``data/``, ``plots/``, and ``shards/``: the
per-rank results files of a run under torchrun, merged into ``results.jsonl`` at its end, see
``obinfer/eval/distributed.py``).

``results.jsonl`` is appended one row per (sample, press, ratio or budget, mode) as answers arrive
(:func:`result_key`; rows of an absolute budget of M tokens per KV head have ``budget`` M and ratio 0,
rows written before budgets existed have no ``budget`` and count as 0), each line written whole and
fsync'ed, or cut back off if the write fails (:func:`append_line`), so an interrupted run loses nothing.
A line torn by a kill can only be the last one: resuming drops it and redoes that row
(:func:`open_for_resume`); a damaged line before the last is an error. Readers (the report) skip
unusable lines, naming them (:func:`scan_results`), or refuse them with ``strict``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from obinfer.cache.policies import PressError
from obinfer.cache.presses import PressName
from obinfer.errors import ObinferError
from obinfer.eval import EvalError
from obinfer.storage import atomic_write_bytes, atomic_write_text, oserror_for

RESULTS_FILE = "results.jsonl"
ARCHIVE_FILE = (
    "results.jsonl.gz"  # a finished or paused run, compressed for the repository (gzip of RESULTS_FILE)
)
RUN_FILE = "run.json"  # what a results directory was produced with (checked on --resume)
RUN_KEYS = ("model", "dtype", "seed", "chat", "press_opts")  # run.json entries that must match to resume
RESULT_FIELDS = ("task", "length", "index", "press", "ratio", "mode", "score")
SHARD_DIR = "shards"  # <out>/shards/rank00001-of-00004.jsonl: one results file per rank of a torchrun job
SHARD_GLOB = "rank*-of-*.jsonl"
METHOD_SEP = "@"  # a report's method name: <press>[@<tag>] (method_name)
CHUNK_TAG = METHOD_SEP + "chunk"

Rows = list[dict[str, Any]]
logger = logging.getLogger(__name__)


class ResultsError(EvalError):
    """A results file or directory that cannot be used (damaged, of the wrong kind, or already there)."""


class ResultsMissing(ObinferError, FileNotFoundError):
    """No results file (or an empty one) where results were expected."""


# ------------------------------------------------------------------------------------------- rows
def result_key(row: dict[str, Any]) -> tuple:
    """What identifies a result: (task, length, index, press, ratio, mode, budget).

    The budget (tokens per KV head; 0 for a ratio row) comes last and a row without one (written before
    budgets existed) counts as 0, so a run from then resumes without redoing its rows.
    """
    return (
        row["task"],
        int(row["length"]),
        int(row["index"]),
        row["press"],
        round(float(row["ratio"]), 6),
        row["mode"],
        row_budget(row),
    )


def row_budget(row: dict[str, Any]) -> int:
    """A row's absolute budget, tokens per KV head; 0 for a ratio row (and a row without the field)."""
    return int(row.get("budget") or 0)


def row_cap(row: dict[str, Any]) -> int | None:
    """The most answer tokens a row was decoded with (``cap``: its task's own budget, or ``--max-new-tokens``
    where smaller); None for a row written before caps were recorded."""
    cap = row.get("cap")
    return None if cap is None or isinstance(cap, bool) else int(cap)


def cut_short(row: dict[str, Any]) -> bool:
    """The answer reached its cap with references still missing, so a larger cap could score it higher.

    A capped answer that already scores 1 keeps that score with any larger cap: every metric counts the
    references found in the answer, and a longer answer holds the shorter one. A row without ``cap``
    counts as final."""
    cap = row_cap(row)
    return cap is not None and int(row.get("new_tokens") or 0) >= cap and float(row["score"]) < 1.0


def supersedes(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """`new` is the result of `old` decoded again with a larger cap, `old` having been cut short."""
    return cut_short(old) and (row_cap(new) or 0) > (row_cap(old) or 0)


def needs_run(done: dict[str, Any] | None, cap: int) -> bool:
    """A result to (re)compute with answer cap `cap`: none yet, or one cut short at a smaller cap."""
    return done is None or (cut_short(done) and (row_cap(done) or 0) < cap)


def final_rows(rows: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Each :func:`result_key`'s result, in first-seen order: its first row, unless a later one
    :func:`supersedes` it (the same answer redone with a larger cap, ``obinfer eval --resume
    --max-new-tokens`` larger than before), which then takes its place. A results file keeps both lines."""
    out: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = result_key(row)
        if key not in out or supersedes(row, out[key]):
            out[key] = row
    return out


@cache
def press_name(name: str) -> PressName:
    """The parsed press name of a results row or of a report's method (:func:`method_name`; its
    ``@`` tag is not part of the press), parsed once per name; the shape only, see PressName."""
    return PressName.parse(split_method(name)[0], check=False)


def method_name(row: dict[str, Any]) -> str:
    """The name a report gives a row's method: its press, tagged ``@chunkN`` when the row was made
    with a block-wise prefill (``obinfer eval --prefill-chunk N``), so that such a run reads beside a
    one-shot run of the same presses (``obinfer report GRID CHUNKED``) as other methods, compared
    with them, instead of colliding with their rows."""
    chunk = row.get("prefill_chunk")
    return f"{row['press']}{CHUNK_TAG}{chunk}" if chunk else row["press"]


def split_method(name: str) -> tuple[str, str]:
    """A method name -> (press name, tag): "snapkv@chunk512" -> ("snapkv", "@chunk512"); an untagged
    name -> (name, "")."""
    press, sep, tag = name.partition(METHOD_SEP)
    return press, sep + tag


def row_problem(row: Any) -> str | None:
    """Why a decoded JSON value is not a usable result row, or None if it is."""
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [k for k in RESULT_FIELDS if k not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    if not all(isinstance(row[k], str) for k in ("task", "press", "mode")):
        return "task, press and mode must be strings"
    depth = row.get("depth")
    if depth is not None and not isinstance(depth, list):
        return "depth must be a list"
    try:
        for x in (row["ratio"], row["score"], *(depth or [])):
            float(x)
        int(row["length"]), int(row["index"])
    except (TypeError, ValueError, OverflowError):
        return "length, index, ratio, score and depth must be numbers"
    for field, least in (("budget", 0), ("prefill_chunk", 1), ("cap", 1), ("new_tokens", 0)):
        v = row.get(field)  # optional integer fields
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            return f"{field} must be an integer >= {least}"
    not_a_press = f"{row['press']!r} is not a press name"
    if METHOD_SEP in row["press"]:  # a report's method name (`press_name` reads it); a row's press has no tag
        return not_a_press
    try:
        press_name(row["press"])
    except PressError:
        return not_a_press
    return None


def decode_json(raw: bytes) -> tuple[Any, str | None]:
    """(value, None) for UTF-8 JSON bytes (a JSON-lines line, a small file), else (None, why): why is
    "not UTF-8" or "not valid JSON"."""
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except (json.JSONDecodeError, RecursionError):
        return None, "not valid JSON"


# ---------------------------------------------------------------------------------------- reading
@dataclass
class BadLine:
    """A line of a results file that is not a usable result row."""

    line: int  # 1-based line number
    offset: int  # byte offset of the line's start
    reason: str
    path: Path | None = None  # the file, when a scan covers several (None: the scan's own path)


@dataclass
class ResultsScan:
    """Everything :func:`scan_results` found in a results file.

    ``last_line`` is the number of the last non-blank line (0 if none); ``data`` the file's bytes.
    """

    path: Path
    rows: Rows
    bad: list[BadLine]
    last_line: int
    data: bytes

    def describe(self, bad: Sequence[BadLine] | None = None, first: int = 3) -> str:
        """``PATH:3 (not valid JSON), PATH:9 (...) and 2 more`` for the first few bad lines."""
        bad = self.bad if bad is None else bad
        text = ", ".join(f"{b.path or self.path}:{b.line} ({b.reason})" for b in bad[:first])
        return text + (f" and {len(bad) - first} more" if len(bad) > first else "")

    def bad_lines_error(self) -> str:
        """The message refusing this file: its first bad line and how many there are."""
        b, n = self.bad[0], len(self.bad)
        more = f" ({n} unreadable lines in all)" if n > 1 else ""
        return f"{b.path or self.path}:{b.line}: {b.reason}{more}; fix or delete the line(s) to use this file"


def results_path(path: Path | str) -> Path:
    """The results file: `path` itself, or for a directory ``path/results.jsonl``, or its archive
    ``path/results.jsonl.gz`` where only that exists."""
    p = Path(path)
    if not p.is_dir():
        return p
    return (
        p / ARCHIVE_FILE
        if (p / ARCHIVE_FILE).is_file() and not (p / RESULTS_FILE).exists()
        else p / RESULTS_FILE
    )


def _read_bytes(p: Path) -> bytes:
    """A results file's bytes, decompressed for a ``.gz`` one (ResultsError if it is not gzip)."""
    data = p.read_bytes()
    if p.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise ResultsError(f"{p} is not a readable gzip file ({e})") from None


def unpack_archive(out_dir: Path | str) -> bool:
    """Resuming a directory that holds only ``results.jsonl.gz`` (a run committed to the repository):
    write its rows back to ``results.jsonl`` (atomically) so that the run appends to them. True if it did.
    """
    d = Path(out_dir)
    gz, plain = d / ARCHIVE_FILE, d / RESULTS_FILE
    if plain.exists() or not gz.is_file():
        return False
    atomic_write_bytes(plain, _read_bytes(gz))
    return True


def scan_results(path: Path | str) -> ResultsScan:
    """Read a results JSONL file (or directory) line by line, keeping the bad lines' numbers and reasons.

    A line is bad if it is not UTF-8, not JSON, or not a result row (see :func:`row_problem`); blank
    lines are ignored. Raises ResultsMissing if there is no such file, ResultsError if it is a
    directory and OSError if it cannot be read.
    """
    p = results_path(path)
    if p.is_dir():
        raise ResultsError(f"{p} is a directory, not a results file")
    if not p.is_file():
        raise ResultsMissing(f"no results found at {p} (run `obinfer eval --out DIR` first)")
    data = _read_bytes(p)
    rows: Rows = []
    bad: list[BadLine] = []
    offset, last = 0, 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        last = number
        row, why = decode_json(raw)
        why = why or row_problem(row)
        if why is None:
            rows.append(row)
        else:
            bad.append(BadLine(number, start, why))
    return ResultsScan(p, rows, bad, last, data)


def _final(scan: ResultsScan) -> ResultsScan:
    """`scan` with its rows reduced to :func:`final_rows` (a redone answer replaces the one it redoes)."""
    scan.rows = list(final_rows(scan.rows).values())
    return scan


def shard_files(out_dir: Path | str) -> list[Path]:
    """The per-rank results files of a results directory (``<out>/shards/rank*-of-*.jsonl``), sorted."""
    d = Path(out_dir) / SHARD_DIR
    return sorted(p for p in d.glob(SHARD_GLOB) if p.is_file()) if d.is_dir() else []


def scan_results_dir(path: Path | str) -> ResultsScan:
    """:func:`scan_results` of a results directory's ``results.jsonl`` and of its unmerged shards (a run
    under torchrun still going, or one that died): their rows, each :func:`result_key` once
    (:func:`final_rows`), and their bad lines, each naming its file. A file path is scanned alone.

    Raises ResultsMissing if there is neither a results file nor a shard.
    """
    p = Path(path)
    if not p.is_dir():
        return _final(scan_results(p))
    main, shards = p / RESULTS_FILE, shard_files(p)
    if not shards:
        return _final(scan_results(p))
    scans = [scan_results(f) for f in ([main] if main.exists() else []) + shards]
    rows = list(final_rows(row for scan in scans for row in scan.rows).values())
    bad = [BadLine(b.line, b.offset, b.reason, scan.path) for scan in scans for b in scan.bad]
    return ResultsScan(main, rows, bad, 0, b"")


def scan_runs(paths: Sequence[Path | str]) -> ResultsScan:
    """Several results directories (or files) read as one run, e.g. a grid and its ablation run on the
    same samples (``obinfer report GRID ABLATION``): each :func:`scan_results_dir`, then their rows, each
    :func:`result_key` once.

    Raises ResultsError if two of them were made with different ``RUN_KEYS`` settings (another model,
    dtype, seed, chat setting or press options: their sample i or their numerics differ, so pairing
    them would compare unlike things), hold rows of different models, or answer the same result key
    differently (unless one answer redoes the other with a larger cap: :func:`supersedes`, and then it
    is the one kept). The scan's path is the first one's. Each row's ``press`` is its
    :func:`method_name` (a block-wise prefill's rows are ``<press>@chunkN``), as reports show it.
    """
    if not paths:
        raise ResultsError("no results directory given")
    scans = [_named_methods(scan_results_dir(p)) for p in paths]
    if len(scans) == 1:
        return scans[0]
    _check_same_run(paths, scans)
    seen: dict[tuple, tuple[Path, dict[str, Any]]] = {}
    for scan in scans:
        for row in scan.rows:
            key = result_key(row)
            if key not in seen or supersedes(row, seen[key][1]):
                seen[key] = (scan.path, row)
            elif not supersedes(seen[key][1], row) and _answer(seen[key][1]) != _answer(row):
                task, length, index, press, ratio, mode, budget = key
                what = f"budget {budget}" if budget else f"ratio {ratio:g}"
                raise ResultsError(
                    f"{seen[key][0]} and {scan.path} answer {task} #{index} ({length} tokens, {press}, {what}, "
                    f"{mode}) differently: report them separately"
                )
    rows = [row for _, row in seen.values()]
    bad = [BadLine(b.line, b.offset, b.reason, b.path or scan.path) for scan in scans for b in scan.bad]
    return ResultsScan(scans[0].path, rows, bad, 0, b"")


def _named_methods(scan: ResultsScan) -> ResultsScan:
    """`scan` with each row's press replaced by its :func:`method_name` (rows copied where it differs)."""
    rows = [r if (m := method_name(r)) == r["press"] else {**r, "press": m} for r in scan.rows]
    return dataclasses.replace(scan, rows=rows)


def _answer(row: dict[str, Any]) -> tuple[Any, float]:
    return row.get("pred"), float(row["score"])


def _check_same_run(paths: Sequence[Path | str], scans: Sequence[ResultsScan]) -> None:
    """`scan_runs`'s refusal of runs that cannot be read as one."""
    infos = [
        (Path(p), read_run_info(Path(p) / RUN_FILE))
        for p in paths
        if Path(p).is_dir() and (Path(p) / RUN_FILE).is_file()
    ]
    for p, info in infos[1:]:
        p0, info0 = infos[0]
        diff = [k for k in RUN_KEYS if info0.get(k) != info.get(k)]
        if diff:
            what = ", ".join(f"{k} {info0.get(k)} vs {info.get(k)}" for k in diff)
            raise ResultsError(
                f"{p0} and {p} were made with different settings ({what}): report them separately"
            )
    models = [({str(r.get("model")) for r in scan.rows}, scan.path) for scan in scans]
    for names, path in models[1:]:
        if names and models[0][0] and names != models[0][0]:
            raise ResultsError(
                f"{models[0][1]} and {path} hold rows of different models "
                f"({', '.join(sorted(models[0][0]))} vs {', '.join(sorted(names))}): report them separately"
            )


def read_results(path: Path | str, with_errors: bool = False, strict: bool = False) -> Any:
    """Rows of a results JSONL file (or directory), each result once (:func:`final_rows`); unusable lines
    are skipped (see :func:`scan_results`).

    Args:
        strict: raise ResultsError naming the file and line of the first unusable line instead.
    Returns:
        rows, or (rows, number of skipped lines) with ``with_errors``.
    """
    scan = _final(scan_results(path))
    if strict and scan.bad:
        raise ResultsError(scan.bad_lines_error())
    return (scan.rows, len(scan.bad)) if with_errors else scan.rows


# ---------------------------------------------------------------------------------------- writing
def output_dir(path: Path | str, what: str) -> Path:
    """``mkdir -p path``; ResultsError ``PATH is a file, not a directory <what>`` if a file is there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ResultsError(f"{path} is a file, not a directory {what}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_out_dir(out_dir: Path | str, resume: bool, scan: bool = True) -> Path:
    """Check a results directory before anything runs; returns its results file.

    Raises ResultsError if `out_dir` is a file, its results file is a directory, the results file (or a
    shard of a torchrun job) already has rows and `resume` is off, or (resuming, with `scan`) one of
    them has a damaged line other than a torn last one.
    """
    out_dir = Path(out_dir)
    path = out_dir / RESULTS_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise ResultsError(f"{out_dir} is a file, not a results directory (choose another --out)")
    if path.is_dir():
        raise ResultsError(f"{path} is a directory, not a results file (remove it or choose another --out)")
    if (out_dir / ARCHIVE_FILE).is_file() and not path.exists():
        if not resume:
            raise ResultsError(
                f"{out_dir / ARCHIVE_FILE} already exists: pass --resume to continue that run, or choose "
                "another --out"
            )
        unpack_archive(out_dir)
    if path.is_file() and path.stat().st_size:
        if not resume:
            raise ResultsError(
                f"{path} already exists: pass --resume to continue that run, or choose another --out"
            )
        if scan:
            scan_for_resume(path)
    for shard in shard_files(out_dir):
        if shard.stat().st_size and not resume:
            raise ResultsError(
                f"{shard} already exists (a torchrun job's results): pass --resume to continue that run, "
                "or choose another --out"
            )
        if scan:
            scan_for_resume(shard)
    return path


def scan_for_resume(path: Path) -> tuple[Rows, bytes | None]:
    """(rows, repaired file content or None): a torn last line is dropped, any other bad line is fatal."""
    scan = scan_results(path)
    middle = [b for b in scan.bad if b.line != scan.last_line]
    if middle:
        b = middle[0]
        raise ResultsError(
            f"{path}:{b.line}: {b.reason} (a damaged line before the last one; only a torn last line is "
            "repaired): fix or delete that line, then rerun with --resume"
        )
    if scan.bad:  # the last write was interrupted: keep the complete rows, redo that one
        return scan.rows, scan.data[: scan.bad[-1].offset]
    if scan.data and not scan.data.endswith(b"\n"):  # cut just before its newline: the row is whole
        return scan.rows, scan.data + b"\n"
    return scan.rows, None


def open_for_resume(path: Path, resume: bool) -> dict[tuple, dict[str, Any]]:
    """The results already there, by key (:func:`final_rows`); repairs a torn last line (atomically).
    Refuses to mix runs unless resuming."""
    check_out_dir(path.parent, resume, scan=False)
    return repair_for_append(path)


def repair_for_append(path: Path) -> dict[tuple, dict[str, Any]]:
    """The rows in `path` (a results file this process alone appends to) by key (:func:`final_rows`); a
    torn last line is dropped (atomically) so that the next row starts a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return {}
    rows, repaired = scan_for_resume(path)
    if repaired is not None:
        if len(repaired) < path.stat().st_size:
            logger.warning(
                "%s: dropped a torn last line (an interrupted write); its row will be redone", path
            )
        atomic_write_bytes(path, repaired)
    return final_rows(rows)


@contextlib.contextmanager
def appender(path: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A function that appends one row to the results file `path` (created if missing), as one whole,
    fsync'ed line (:func:`append_line`)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        yield lambda row: append_line(fd, (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"), path)
    finally:
        os.close(fd)


def append_line(fd: int, data: bytes, path: Path) -> None:
    """Append one whole line and fsync it; on any failure cut the file back to where it was.

    `fd` is `path` opened with ``O_APPEND``; an OSError is re-raised naming `path`.
    """
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


# ---------------------------------------------------------------------------------------- run.json
def read_run_info(path: Path) -> dict[str, Any]:
    """The settings recorded in ``run.json``; ResultsError naming the file if it cannot be read."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ResultsError(f"{path} is a directory, not the run settings file (remove it)") from None
    info, why = decode_json(raw)
    if why is None:
        if isinstance(info, dict):
            return info
        why = "not a JSON object"
    raise ResultsError(
        f"{path} is unreadable ({why}): delete it to resume without checking the model and settings "
        "(it is then rewritten), or use another --out"
    )


def check_run_info(out_dir: Path | str, info: dict[str, Any], resume: bool) -> None:
    """Record `info` in ``<out_dir>/run.json``; resuming, first refuse a run whose ``RUN_KEYS`` differ
    (another model, dtype, seed, chat setting or press options)."""
    out_dir = Path(out_dir)
    path = out_dir / RUN_FILE
    if resume and path.exists():
        old = read_run_info(path)
        diff = [k for k in RUN_KEYS if old.get(k) != info.get(k)]
        if diff:
            what = ", ".join(f"{k}: {old.get(k)} -> {info.get(k)}" for k in diff)
            raise ResultsError(f"--resume on {out_dir} with different settings ({what}); use another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(info, indent=1) + "\n")
