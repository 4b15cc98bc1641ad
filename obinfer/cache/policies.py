"""Eviction policies: which queries observe, what is protected, and when eviction happens.

A policy turns one layer's state into per-slot scores (B, Hkv, S), higher = keep, `+inf` for protected
slots and `-inf` for invalid (padding) slots; an allocator (`allocators.py`) then picks the kept slots.
The saliency term itself comes from a pluggable score (`scores.py`): `attn`, `obv`, `obk`, `obkv`, ...
OBCache variants keep everything of the baseline policy and change only that term (scores.md section 3).

Spec: docs/scores.md section 3. Defaults follow kvpress where it has the method.

Every option is type- and range-checked when the policy is made (`__post_init__`): a bad value raises
`PressError` naming the policy, the option and the expected type, e.g.
``snapkv option window must be an integer >= 1, got 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from obinfer.cache.kv_cache import LayerCache
from obinfer.cache.scores import ScoreFn, ScoreInputs, pool_scores, score_queries_chunked
from obinfer.errors import ObinferError

INF = float("inf")


class PressError(ObinferError, ValueError):
    """A press that cannot run: unknown name or option, bad ratio, budget or option value."""


def _show(v: Any) -> str:
    """`'yes' (str)`, `2.5 (float)`, `-4`: the value, and its type unless it is a plain int."""
    return repr(v) if type(v) is int else f"{v!r} ({type(v).__name__})"


def is_int(v: Any) -> bool:
    """A real integer (Python or numpy), not a bool."""
    return isinstance(v, Integral) and not isinstance(v, bool)


def check_int(owner: str, name: str, v: Any, minimum: int, allow_none: bool = False) -> None:
    """PressError unless v is an integer >= minimum (or None when allowed)."""
    if (v is None and allow_none) or (is_int(v) and v >= minimum):
        return
    none = " or None" if allow_none else ""
    raise PressError(f"{owner} option {name} must be an integer >= {minimum}{none}, got {_show(v)}")


def check_bool(owner: str, name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise PressError(f"{owner} option {name} must be a bool (true or false), got {_show(v)}")


def check_choice(owner: str, name: str, v: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(v, str) or v not in choices:
        raise PressError(f"{owner} option {name} must be one of {', '.join(choices)}; got {_show(v)}")


@dataclass
class Policy:
    """Base class. `uses_score`: takes a `-<score>` suffix. `decode_time`: can evict while decoding."""

    name = "policy"
    uses_score = True
    decode_time = False

    def observed_queries(self, n: int) -> int | None:
        """Prompt queries whose attention scores the keys for a prompt of n tokens (None: unknown)."""
        return None

    def prefill_scores(
        self, q: Tensor, q_pos: Tensor, layer: LayerCache, score: ScoreFn, gqa: str, n_kept: Tensor | None
    ) -> Tensor:
        """Scores (B, Hkv, S) of the layer's slots after prefill; q: (B, Hq, T, D) all prompt queries.

        n_kept (B,) is the budget; None leaves out budget-dependent protection (see `protect`).
        """
        raise NotImplementedError

    def raw_scores(self, q: Tensor, q_pos: Tensor, layer: LayerCache, score: ScoreFn, gqa: str) -> Tensor:
        """The budget-independent part of `prefill_scores`: one scoring serves every compression ratio."""
        return self.prefill_scores(q, q_pos, layer, score, gqa, None)

    def protect(self, scores: Tensor, pos: Tensor, q_pos: Tensor, n_kept: Tensor) -> Tensor:
        """Budget-dependent protection added to `raw_scores` (default: none)."""
        return scores

    def decode_scores(self, q: Tensor, q_pos: Tensor, layer: LayerCache, score: ScoreFn, gqa: str) -> Tensor:
        """Scores (B, Hkv, S) after a decode step whose queries are q (B, Hq, T, D)."""
        raise PressError(f"{self.name} does not evict during decoding")

    def protect_decode(self, scores: Tensor, pos: Tensor, seen: Tensor, budget: int) -> Tensor:
        """Mark slots that decode-time eviction must keep (default: the newest token)."""
        return scores.masked_fill(pos == (seen[:, None, None] - 1), INF)


def _invalid(scores: Tensor, pos: Tensor) -> Tensor:
    return scores.masked_fill(pos < 0, -INF)


@dataclass
class SnapKV(Policy):
    """SnapKV: the last `window` prompt queries observe; scores pooled; the window is always kept.

    Options: `window` (observation queries, >= 1), `kernel` (odd pooling size >= 1), `pooling`
    ("avg" or "max").

    A prompt of at most `window` tokens is observed whole (the window shrinks to the prompt), a
    deliberate difference from kvpress, which refuses such prompts. No key then precedes the window, so
    the window is not protected (that would keep every token); each key is instead scored by the mean of
    its score over the queries that see it (key p is seen by the n - p queries at or after it, as in
    kvpress's ObservedAttentionPress), then pooled as usual. In a left-padded batch this applies row by
    row; longer rows are scored exactly as before.
    """

    name = "snapkv"
    window: int = 64
    kernel: int = 5
    pooling: str = "avg"  # or "max" (the OBCache paper uses max-pool, kernel 7)

    def __post_init__(self) -> None:
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise PressError(
                f"snapkv option kernel must be odd (pooling keeps the length), got {self.kernel}"
            )
        check_choice(self.name, "pooling", self.pooling, ("avg", "max"))

    def observed_queries(self, n: int) -> int:
        return min(self.window, n)

    def prefill_scores(self, q, q_pos, layer, score, gqa, n_kept):  # noqa: ANN001
        k, v, pos = layer.dense()
        n = k.shape[2]
        w = min(self.window, n)
        s = score(ScoreInputs(q[:, :, -w:], k, v, q_pos[:, -w:], pos, gqa))  # (B, Hkv, n)
        short = (pos[:, 0] >= 0).sum(-1) <= self.window  # (B,) rows observed whole
        if bool(short.all()):
            return _invalid(self._whole_prompt(s, pos, q_pos[:, -w:]), pos)
        ctx = s[..., : n - w].masked_fill(pos[..., : n - w] < 0, 0.0)
        out = torch.cat(
            [pool_scores(ctx, self.kernel, self.pooling), torch.full_like(s[..., n - w :], INF)], -1
        )
        if bool(short.any()):
            out = torch.where(short[:, None, None], self._whole_prompt(s, pos, q_pos[:, -w:]), out)
        return _invalid(out, pos)

    def _whole_prompt(self, s: Tensor, pos: Tensor, obs_pos: Tensor) -> Tensor:
        """Scores when the window covers the prompt: mean over the observing queries that see each key.

        s: (B, Hkv, n) summed scores; pos: (B, Hkv, n) key positions; obs_pos: (B, W) positions of the
        observation queries (negative: padding), consecutive within a row.
        """
        last = obs_pos[:, -1][:, None, None]  # (B, 1, 1)
        m = (obs_pos >= 0).sum(-1)[:, None, None]  # valid observation queries per row
        seen_by = ((last - pos).clamp_min(0).minimum(m - 1) + 1).clamp_min(1)
        mean = (s / seen_by).masked_fill(pos < 0, 0.0)
        return pool_scores(mean, self.kernel, self.pooling)


@dataclass
class TOVA(Policy):
    """TOVA: the last query observes; its score is averaged over all heads (same kept set per KV head)."""

    name = "tova"
    decode_time = True
    per_head: bool = False  # option: each KV head ranks by its own group's score

    def __post_init__(self) -> None:
        check_bool(self.name, "per_head", self.per_head)

    def observed_queries(self, n: int) -> int:
        return min(1, n)

    def _last_query(self, q, q_pos, layer, score, gqa):  # noqa: ANN001
        k, v, pos = layer.dense()
        s = score(ScoreInputs(q[:, :, -1:], k, v, q_pos[:, -1:], pos, gqa))
        if not self.per_head:
            s = s.masked_fill(pos < 0, 0.0).mean(1, keepdim=True).expand_as(s)
        return _invalid(s, pos), pos

    def prefill_scores(self, q, q_pos, layer, score, gqa, n_kept):  # noqa: ANN001
        s, pos = self._last_query(q, q_pos, layer, score, gqa)
        return s.masked_fill(pos == q_pos[:, -1:, None], INF)  # the last token is always kept

    def decode_scores(self, q, q_pos, layer, score, gqa):  # noqa: ANN001
        return self._last_query(q, q_pos, layer, score, gqa)[0]


@dataclass
class H2O(Policy):
    """H2O: scores accumulated over every query seen (prefill, then decode); recent tokens protected.

    `recent`: protected most-recent tokens (None = half the budget, the paper's split; more than the
    prompt simply protects the whole prompt).
    `normalize="visible"`: divide each key's prefill sum by the number of queries that see it and use
    no recent window (kvpress ObservedAttentionPress, prefill only).
    `chunk`: queries scored at once (memory, not results).
    """

    name = "h2o"
    decode_time = True
    recent: int | None = None
    normalize: str = "none"  # or "visible"
    chunk: int = 256
    acc_name: str = field(default="h2o", repr=False)

    def __post_init__(self) -> None:
        check_int(self.name, "recent", self.recent, 0, allow_none=True)
        check_choice(self.name, "normalize", self.normalize, ("none", "visible"))
        check_int(self.name, "chunk", self.chunk, 1)
        if not isinstance(self.acc_name, str) or not self.acc_name:
            raise PressError(f"h2o option acc_name must be a non-empty string, got {_show(self.acc_name)}")

    def observed_queries(self, n: int) -> int:
        return n

    def prefill_scores(self, q, q_pos, layer, score, gqa, n_kept):  # noqa: ANN001
        k, v, pos = layer.dense()
        s = self._sums(q, q_pos, k, v, pos, score, gqa)
        layer.add_to_accumulator(self.acc_name, s)  # decode steps keep adding to these sums
        if self.normalize == "visible":
            seen = q_pos[:, -1][:, None, None] + 1  # queries in the prompt per row
            s = s / (seen - pos).clamp_min(1)
        s = _invalid(s, pos)
        return s if n_kept is None else self.protect(s, pos, q_pos, n_kept)

    def protect(self, scores: Tensor, pos: Tensor, q_pos: Tensor, n_kept: Tensor) -> Tensor:
        """The recent window (none with normalize="visible", as kvpress)."""
        if self.normalize == "visible":
            return scores
        return self._protect_recent(scores, pos, q_pos[:, -1] + 1, n_kept)

    def _sums(self, q, q_pos, k, v, pos, score, gqa) -> Tensor:  # noqa: ANN001
        """The score summed over the new queries q (the last slots), chunk by chunk; 0 on invalid slots."""
        s = score_queries_chunked(score, q, q_pos, k, v, pos, gqa, self.chunk, causal_prefix=True)
        return s.masked_fill(pos < 0, 0.0)

    def _protect_recent(self, s: Tensor, pos: Tensor, seen: Tensor, budget: Tensor | int) -> Tensor:
        r = torch.as_tensor(budget // 2 if self.recent is None else self.recent, device=s.device)
        r = r.reshape(-1, 1, 1) if r.dim() else r
        return s.masked_fill((pos >= seen[:, None, None] - r) & (pos >= 0), INF)

    def decode_scores(self, q, q_pos, layer, score, gqa):  # noqa: ANN001
        k, v, pos = layer.dense()
        layer.add_to_accumulator(self.acc_name, self._sums(q, q_pos, k, v, pos, score, gqa))
        return _invalid(layer.acc_dense(self.acc_name).clone(), pos)

    def protect_decode(self, scores, pos, seen, budget):  # noqa: ANN001
        return self._protect_recent(scores, pos, seen, budget)


@dataclass
class StreamingLLM(Policy):
    """StreamingLLM: keep `sinks` first tokens and the most recent ones."""

    name = "streamingllm"
    uses_score = False
    sinks: int = 4

    def __post_init__(self) -> None:
        check_int(self.name, "sinks", self.sinks, 0)

    def observed_queries(self, n: int) -> int:
        return 0

    def prefill_scores(self, q, q_pos, layer, score, gqa, n_kept):  # noqa: ANN001
        _, _, pos = layer.dense()
        s = pos.float().masked_fill((pos >= 0) & (pos < self.sinks), INF)
        return _invalid(s, pos)


@dataclass
class Knorm(Policy):
    """Knorm: keep keys with the smallest L2 norm (score = -||k||, post-RoPE, float32)."""

    name = "knorm"
    uses_score = False

    def observed_queries(self, n: int) -> int:
        return 0

    def prefill_scores(self, q, q_pos, layer, score, gqa, n_kept):  # noqa: ANN001
        k, _, pos = layer.dense()
        return _invalid(-k.float().norm(dim=-1), pos)


@dataclass
class Random(Policy):
    """Random baseline: random scores from an explicit, seeded generator."""

    name = "random"
    uses_score = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_int(self.seed) or not -(2**63) <= self.seed < 2**64:
            raise PressError(
                f"random option seed must be an integer in [-2**63, 2**64), got {_show(self.seed)}"
            )

    def observed_queries(self, n: int) -> int:
        return 0

    def prefill_scores(self, q, q_pos, layer, score, gqa, n_kept):  # noqa: ANN001
        _, _, pos = layer.dense()
        g = torch.Generator().manual_seed(self.seed)
        return _invalid(torch.rand(pos.shape, generator=g).to(pos.device), pos)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (SnapKV, TOVA, H2O, StreamingLLM, Knorm, Random)}
