"""Generation: prefill (with optional compression) -> feed the question -> token-by-token decode.

`stream()` is a generator of token ids per step for a batch of prompts (left-padded); `generate()`
wraps it for one prompt. Both fill a `GenStats` record. Sampling uses an explicit `torch.Generator`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from obinfer.cache.kv_cache import KVCache
from obinfer.models.llama import Transformer


@dataclass
class Sampling:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; seed None = nondeterministic."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

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
    cache_bytes: int = 0  # K/V bytes at the end (decoding grows the buffers in steps)
    kept_per_layer: list[tuple[int, float, int]] = field(default_factory=list)  # (min, mean, max) over heads

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


@torch.inference_mode()
def stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling: Sampling | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
    press=None,  # noqa: ANN001  (obinfer.cache.presses.Press)
    questions: Sequence[Sequence[int]] | None = None,
    cache: KVCache | None = None,
    stats: GenStats | None = None,
) -> Iterator[Tensor]:
    """Yield the next token of every row, step by step, until all rows stop or max_new_tokens.

    Args:
        prompts: token ids per row (the context; compressed by `press` if given).
        questions: optional ids per row fed after compression at the next positions (query-agnostic).
        cache: an existing cache to continue (e.g. a compressed context); a new one if None.
    Yields:
        (B,) next-token ids; rows that already stopped repeat their stop token.
    """
    sampling = sampling or Sampling()
    stats = stats if stats is not None else GenStats()
    gen = sampling.generator(model.device)
    B = len(prompts)
    cache = cache if cache is not None else model.new_cache(B)
    ids, n_pad = left_pad(prompts)
    ids, n_pad = ids.to(model.device), (n_pad if int(n_pad.sum()) else None)
    stats.prompt_tokens = int(sum(len(p) for p in prompts))
    t0 = time.perf_counter()
    observer = press.prefill_observer(stats) if press is not None else None
    logits = model(ids, cache, n_pad=n_pad, observer=observer, last_only=True)[:, -1]
    stats.prefill_s = time.perf_counter() - t0
    stats.cache_bytes_full = getattr(press, "bytes_before", 0) or cache.nbytes()
    stats.cache_bytes_kept = cache.nbytes()
    step_observer = press.decode_observer(stats) if press is not None else None
    if questions is not None:
        q_ids, q_pad = left_pad(questions)
        if int(q_pad.sum()):
            raise ValueError(
                "questions must have equal lengths within a batch (pad them on the left of the context)"
            )
        logits = model(q_ids.to(model.device), cache, observer=step_observer, last_only=True)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=model.device)
    t_dec = time.perf_counter()
    prev: Tensor | None = None
    for step in range(max_new_tokens):
        tok = sample_next(logits, sampling, gen)
        if prev is not None:
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
        logits = model(tok[:, None], cache, observer=step_observer)[:, -1]
    stats.decode_s = time.perf_counter() - t_dec
    stats.cache_bytes = cache.nbytes()
    stats.kept_per_layer = kept_summary(cache)


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
    press=None,  # noqa: ANN001
    question: Sequence[int] | None = None,
    stats: GenStats | None = None,
) -> Iterator[int]:
    """Stream the token ids generated for one prompt (stop token excluded)."""
    for tok in stream(
        model,
        [prompt],
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_ids=stop_ids,
        press=press,
        questions=None if question is None else [question],
        stats=stats,
    ):
        t = int(tok[0])
        if t not in stop_ids:  # the stream ends right after a stop token (and fills the stats)
            yield t
