"""Generation: prefill (with optional compression) -> feed the question -> token-by-token decode.

`stream()` is a generator of token ids per step for a batch of prompts (left-padded); `generate()`
wraps it for one prompt. Both fill a `GenStats` record. Sampling uses an explicit `torch.Generator`.

Arguments are checked when `stream()` / `generate()` is called, before any forward pass (an empty
prompt, a token id outside the vocabulary, max_new_tokens < 1, ...), and `Sampling` checks its values
when it is made: each raises `GenerationError` with a one-line message.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch
from torch import Tensor

from obinfer.cache.kv_cache import KVCache
from obinfer.cache.presses import FULL, Press
from obinfer.errors import ObinferError
from obinfer.models.llama import Transformer


class GenerationError(ObinferError, ValueError):
    """Bad generation arguments: sampling values, an empty prompt, token ids outside the vocabulary."""


def _is_int(v: object) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


@dataclass
class Sampling:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; seed None = nondeterministic.

    Checked when made (and again by `stream`): temperature a finite number >= 0, 0 < top_p <= 1,
    top_k an integer >= 0, seed an integer (or None); anything else raises `GenerationError`.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise GenerationError naming the first bad value."""
        t, p, k, seed = self.temperature, self.top_p, self.top_k, self.seed
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not _is_real(p) or not 0 < p <= 1:  # NaN fails the comparison too
            raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if not _is_int(k) or k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if seed is not None and (not _is_int(seed) or not -(2**63) <= seed < 2**64):
            raise GenerationError(f"seed must be an integer in [-2**63, 2**64) or None, got {seed!r}")

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        if self.temperature <= 0:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


@dataclass
class GenStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0  # time to first token (prefill + question + first sample)
    prefill_s: float = 0.0  # prompt forward, including any compression
    scoring_s: float = 0.0  # time spent by the press scoring and choosing slots (prefill + decode)
    compact_s: float = 0.0  # time spent compacting the cache after prefill compression
    decode_s: float = 0.0
    cache_bytes_full: int = 0  # K/V bytes right after prefill, before compression
    cache_bytes_kept: int = 0  # K/V bytes right after prefill (and compression)
    cache_tokens_kept: int = 0  # slots (tokens x KV heads x layers) in use then, before any question
    cache_bytes: int = 0  # K/V bytes at the end (decoding grows the buffers in steps)
    cache_bytes_peak: int = 0  # most K/V bytes held during the prefill (chunked prefill: flat in the prompt)
    kept_per_layer: list[tuple[int, float, int]] = field(default_factory=list)  # (min, mean, max) over heads
    # prompt queries whose attention scored the keys at prefill (None: no press scored): snapkv's window,
    # shrunk to the prompt when the prompt is not longer; 1 for tova; every prompt token for h2o; 0 for
    # the score-free policies (streamingllm, knorm, random). For a batch, the smallest over its rows.
    observed_queries: int | None = None

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s and self.new_tokens > 1 else 0.0


def sample_next(logits: Tensor, s: Sampling, generator: torch.Generator | None) -> Tensor:
    """Pick the next token. logits: (B, V) -> (B,) long."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """(B, T) ids left-padded with pad_id, and (B,) pad counts."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + list(r) for r in rows], dtype=torch.long)
    return ids, torch.tensor([T - len(r) for r in rows])


def _check_ids(rows: Sequence[Sequence[int]], what: str, vocab: int) -> list[list[int]]:
    """rows as lists of ints, or GenerationError: no rows, an empty row, a non-integer or out-of-vocab id."""
    if hasattr(rows, "tolist"):  # a (B, T) tensor or array
        rows = rows.tolist()
    if isinstance(rows, str | bytes) or not isinstance(rows, Sequence):
        raise GenerationError(f"{what}s must be a list of token-id lists, got {type(rows).__name__}")
    if len(rows) == 0:
        raise GenerationError(f"no {what}s given (an empty batch)")
    out = []
    for b, row in enumerate(rows):
        where = f"the {what}" if len(rows) == 1 else f"{what} {b}"
        if hasattr(row, "tolist"):
            row = row.tolist()
        if isinstance(row, str | bytes) or not isinstance(row, Sequence):
            raise GenerationError(f"{where} must be a list of token ids, got {type(row).__name__}")
        if len(row) == 0:
            raise GenerationError(f"{where} is empty (0 tokens)")
        for i, t in enumerate(row):
            if not _is_int(t):
                raise GenerationError(f"{where} has {t!r} at index {i}; token ids must be integers")
            if not 0 <= t < vocab:
                raise GenerationError(
                    f"{where} has token id {t} at index {i}, outside the vocabulary [0, {vocab})"
                )
        out.append([int(t) for t in row])
    return out


def stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    press: Press = FULL,
    questions: Sequence[Sequence[int]] | None = None,
    cache: KVCache | None = None,
    stats: GenStats | None = None,
    prefill_chunk: int | None = None,
    drop_finished: bool = False,
) -> Iterator[Tensor]:
    """Yield the next token of every row, step by step, until all rows stop or max_new_tokens.

    Args:
        prompts: token ids per row (the context; compressed by `press`, default `FULL`: no compression).
        questions: optional ids per row fed after compression at the next positions (query-agnostic).
        cache: an existing cache to continue (e.g. a compressed context); a new one if None.
        prefill_chunk: feed the prompts in blocks of this many tokens, compressing every layer to the
            press's budget after each block (bounded memory; `PressRun.prefill`); None: one forward.
        drop_finished: once rows stop, drop them from the cache (`KVCache.keep_rows`) and run the model
            on the other rows only, so finished rows cost nothing. Rows are independent, so greedy
            tokens are the same as without it (sampling draws differ). The cache then ends up holding
            only the rows still decoding at the last drop: use it on a cache you discard. Not with a
            press that evicts while decoding (its state is per row).
    Yields:
        (B,) next-token ids; rows that already stopped repeat their stop token.
    Raises:
        GenerationError: at the call (before any forward pass) for an empty batch or prompt, a token id
            outside the vocabulary, max_new_tokens < 1, bad sampling values, a cache of another batch, or
            a press that is not a `Press` (use `FULL`, or `make_press("full")`, for none), or
            drop_finished with a press that evicts while decoding.
    """
    vocab = model.cfg.vocab_size
    prompts = _check_ids(prompts, "prompt", vocab)
    if questions is not None:
        questions = _check_ids(questions, "question", vocab)
        if len(questions) != len(prompts):
            raise GenerationError(f"{len(questions)} questions for {len(prompts)} prompts")
        if len({len(q) for q in questions}) > 1:
            raise GenerationError(
                "questions must have equal lengths within a batch (pad them on the left of the context)"
            )
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    sampling = sampling if sampling is not None else Sampling()
    if not isinstance(sampling, Sampling):
        raise GenerationError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    sampling.check()
    if not all(_is_int(t) for t in stop_ids):
        raise GenerationError(f"stop_ids must be integer token ids, got {sorted(map(repr, stop_ids))}")
    if not isinstance(press, Press):
        raise GenerationError(f"press must be a Press (make_press(...), or FULL for none), got {press!r}")
    if cache is not None and cache.batch != len(prompts):
        raise GenerationError(f"the cache holds {cache.batch} rows but {len(prompts)} prompts were given")
    if prefill_chunk is not None and (not _is_int(prefill_chunk) or prefill_chunk < 1):
        raise GenerationError(
            f"prefill_chunk must be an integer >= 1 (tokens per block), got {prefill_chunk!r}"
        )
    if drop_finished and press.decode_evicts:
        raise GenerationError(
            f"drop_finished cannot be used with {press!r}: it evicts while decoding (its state is per row)"
        )
    return _stream(
        model, prompts, max_new_tokens, sampling, stop_ids, press, questions, cache, stats, prefill_chunk,
        drop_finished,
    )  # fmt: skip


@torch.inference_mode()
def _stream(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling,
    stop_ids: set[int] | frozenset[int],
    press: Press,
    questions: list[list[int]] | None,
    cache: KVCache | None,
    stats: GenStats | None,
    prefill_chunk: int | None = None,
    drop_finished: bool = False,
) -> Iterator[Tensor]:
    stats = stats if stats is not None else GenStats()
    gen = sampling.generator(model.device)
    B = len(prompts)
    cache = cache if cache is not None else model.new_cache(B)
    ids, n_pad = left_pad(prompts)
    ids, n_pad = ids.to(model.device), (n_pad if int(n_pad.sum()) else None)
    stats.prompt_tokens = int(sum(len(p) for p in prompts))
    t0 = time.perf_counter()
    run = press.start(stats, model=model)  # this prompt's press state (timings, decode budgets)
    logits = run.prefill(model, ids, cache, n_pad=n_pad, chunk=prefill_chunk)
    stats.prefill_s = time.perf_counter() - t0
    stats.cache_bytes_peak = max(run.peak_bytes, cache.nbytes())
    stats.cache_bytes_full = run.bytes_before or cache.nbytes()
    stats.cache_bytes_kept = cache.nbytes()
    stats.cache_tokens_kept = cache.n_tokens()
    step_observer = run.decode_observer()
    if questions is not None:
        q_ids, _ = left_pad(questions)  # equal lengths (checked by stream): no padding
        logits = model(q_ids.to(model.device), cache, observer=step_observer, last_only=True)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=model.device)
    t_dec = time.perf_counter()
    prev: Tensor | None = None
    held: Tensor | None = None  # drop_finished: the rows the cache (and logits) still hold, once some left
    for step in range(max_new_tokens):
        tok = sample_next(logits, sampling, gen)
        if held is not None:  # the rows no longer held all stopped: they repeat their stop token
            tok = prev.index_copy(0, held, tok)
        elif prev is not None:
            tok = torch.where(done, prev, tok)
        if step == 0:
            stats.ttft_s = time.perf_counter() - t0
            t_dec = time.perf_counter()
        stats.new_tokens += 1
        yield tok
        done = done | torch.isin(tok, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        prev = tok
        if drop_finished:
            held = _drop_finished(cache, held, done)
        logits = model((tok if held is None else tok[held])[:, None], cache, observer=step_observer)[:, -1]
    stats.decode_s = time.perf_counter() - t_dec
    stats.cache_bytes = cache.nbytes()
    stats.kept_per_layer = kept_summary(cache)


def _drop_finished(cache: KVCache, held: Tensor | None, done: Tensor) -> Tensor | None:
    """Drop the finished rows from `cache`, which holds rows `held` of the batch (None: all of them).
    Returns the rows it holds now (None while that is still all of them)."""
    rows = held if held is not None else torch.arange(len(done), device=done.device)
    keep = (~done[rows]).nonzero()[:, 0]  # positions in the cache of the rows still running
    if len(keep) == len(rows):
        return held
    cache.keep_rows(keep.tolist())
    return rows[keep]


def kept_summary(cache: KVCache) -> list[tuple[int, float, int]]:
    """(min, mean, max) tokens over the heads of each layer."""
    out = []
    for layer in cache.layers:
        ls = layer.length
        out.append((min(ls), sum(ls) / len(ls), max(ls)))
    return out


def generate(
    model: Transformer,
    prompt: Sequence[int],
    *,
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    press: Press = FULL,
    question: Sequence[int] | None = None,
    stats: GenStats | None = None,
    prefill_chunk: int | None = None,
) -> Iterator[int]:
    """Stream the token ids generated for one prompt (stop token excluded).

    Raises:
        GenerationError: at the call, e.g. "the prompt is empty (0 tokens)" (see `stream`).
    """
    steps = stream(
        model,
        [prompt],
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_ids=stop_ids,
        press=press,
        questions=None if question is None else [question],
        stats=stats,
        prefill_chunk=prefill_chunk,
    )
    return _unbatch(steps, stop_ids)


def _unbatch(steps: Iterator[Tensor], stop_ids: set[int] | frozenset[int]) -> Iterator[int]:
    for tok in steps:
        t = int(tok[0])
        if t not in stop_ids:  # the stream ends right after a stop token (and fills the stats)
            yield t
