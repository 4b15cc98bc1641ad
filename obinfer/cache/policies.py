"""Eviction policies: which queries observe, what is protected, and when eviction happens.

A policy turns one layer's state into per-slot scores (B, Hkv, S), higher = keep, `+inf` for protected
slots and `-inf` for invalid (padding) slots; an allocator (`allocators.py`) then picks the kept slots.
The saliency term itself comes from a pluggable score (`scores.py`): `attn`, `obv`, `obk`, `obkv`, ...
OBCache variants keep everything of the baseline policy and change only that term (scores.md section 3).

Spec: docs/scores.md section 3. Defaults follow kvpress where it has the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from obinfer.cache.kv_cache import LayerCache
from obinfer.cache.scores import ScoreFn, ScoreInputs, pool_scores, score_queries_chunked

INF = float("inf")


class PressError(ValueError):
    """A press that cannot run: unknown name, bad ratio or budget, prompt too short for the policy."""


@dataclass
class Policy:
    """Base class. `uses_score`: takes a `-<score>` suffix. `decode_time`: can evict while decoding."""

    name = "policy"
    uses_score = True
    decode_time = False

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
    """SnapKV: the last `window` prompt queries observe; scores pooled; the window is always kept."""

    name = "snapkv"
    window: int = 64
    kernel: int = 5
    pooling: str = "avg"  # or "max" (the OBCache paper uses max-pool, kernel 7)

    def prefill_scores(self, q, q_pos, layer, score, gqa, n_kept):  # noqa: ANN001
        k, v, pos = layer.dense()
        n = k.shape[2]
        if n <= self.window:
            raise PressError(f"snapkv needs a prompt longer than its window ({self.window} tokens), got {n}")
        w = self.window
        s = score(ScoreInputs(q[:, :, -w:], k, v, q_pos[:, -w:], pos, gqa))  # (B, Hkv, n)
        ctx = s[..., : n - w].masked_fill(pos[..., : n - w] < 0, 0.0)
        s = torch.cat(
            [pool_scores(ctx, self.kernel, self.pooling), torch.full_like(s[..., n - w :], INF)], -1
        )
        return _invalid(s, pos)


@dataclass
class TOVA(Policy):
    """TOVA: the last query observes; its score is averaged over all heads (same kept set per KV head)."""

    name = "tova"
    decode_time = True
    per_head: bool = False  # option: each KV head ranks by its own group's score

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

    `recent`: protected most-recent tokens (None = half the budget, the paper's split).
    `normalize="visible"`: divide each key's prefill sum by the number of queries that see it and use
    no recent window (kvpress ObservedAttentionPress, prefill only).
    """

    name = "h2o"
    decode_time = True
    recent: int | None = None
    normalize: str = "none"  # or "visible"
    chunk: int = 256
    acc_name: str = field(default="h2o", repr=False)

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

    def prefill_scores(self, q, q_pos, layer, score, gqa, n_kept):  # noqa: ANN001
        _, _, pos = layer.dense()
        s = pos.float().masked_fill((pos >= 0) & (pos < self.sinks), INF)
        return _invalid(s, pos)


@dataclass
class Knorm(Policy):
    """Knorm: keep keys with the smallest L2 norm (score = -||k||, post-RoPE, float32)."""

    name = "knorm"
    uses_score = False

    def prefill_scores(self, q, q_pos, layer, score, gqa, n_kept):  # noqa: ANN001
        k, _, pos = layer.dense()
        return _invalid(-k.float().norm(dim=-1), pos)


@dataclass
class Random(Policy):
    """Random baseline: random scores from an explicit, seeded generator."""

    name = "random"
    uses_score = False
    seed: int = 0

    def prefill_scores(self, q, q_pos, layer, score, gqa, n_kept):  # noqa: ANN001
        _, _, pos = layer.dense()
        g = torch.Generator().manual_seed(self.seed)
        return _invalid(torch.rand(pos.shape, generator=g).to(pos.device), pos)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (SnapKV, TOVA, H2O, StreamingLLM, Knorm, Random)}
