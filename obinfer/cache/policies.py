"""Eviction policies: which queries observe, what is protected, and when eviction happens.

A policy turns one layer's state into per-slot scores (B, Hkv, S), higher = keep, `+inf` for protected
slots and `-inf` for invalid (padding) slots; an allocator (`allocators.py`) then picks the kept slots.
The saliency term itself comes from a pluggable score (`scores.py`): `attn`, `obv`, `obk`, `obkv`, ...
OBCache variants keep everything of the baseline policy and change only that term (scores.md section 3).

A policy is one class registered with `@register_policy` (it becomes a frozen dataclass whose fields are
its options, and `<policy>`, `<policy>-<score>` and `<allocator>-<policy>...` become press names). The
hooks a press calls, in order, at prefill:

1. `score(q, q_pos, layer, score_fn, gqa)`: budget-independent scores, pure (writes nothing), so one
   scoring serves every compression ratio and allocator (`obinfer/cache/fanout.py`);
2. `update_state(layer, scores, pos)`: fold them into per-slot state kept in the layer (H2O's sums); called
   whenever scores were computed, also when nothing is evicted and when they came from a memo;
3. `protect(scores, pos, q_pos, n_kept)`: the budget-dependent part (H2O's recent window);

and after each decoding step (only policies with `decode_time`, under an absolute budget):
`decode_scores` (pure), `update_state`, `decode_ranking`, `protect_decode`. `observed_span(n)` declares
which prompt queries the scores read, so a shared prefill records only those.

Spec: docs/scores.md section 3. Defaults follow kvpress where it has the method.

Every option is type- and range-checked when the policy is made (`__post_init__`): a bad value raises
`PressError` naming the policy, the option and the expected type, e.g.
``snapkv option window must be an integer >= 1, got 0``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
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


class Policy:
    """Base class of eviction policies (register subclasses with `@register_policy`).

    Class attributes: `name` (the press-name part, no "-"), `uses_score` (takes a `-<score>` suffix and
    observes queries), `decode_time` (can evict while decoding), `fuses_attention` (has
    `score_and_attend`: its prefill scores compute the layer's attention outputs too). Options are
    dataclass fields.
    """

    name = "policy"
    uses_score = True
    decode_time = False
    fuses_attention = False
    lookahead = False  # observation queries can come from after the prompt (LAQ: obinfer/cache/lookahead.py)
    reuses_outputs = False  # `score` takes `outputs=`: the layer's own attention outputs, reused as O
    needs_input = False  # reads each layer's input hidden states (`observe_input`; TRIM-KV's gates)

    # ------------------------------------------------------------------ what is observed
    def observed_span(self, n: int) -> tuple[int, int] | None:
        """[start, end) of the prompt queries (positions 0..n-1) whose attention scores the keys.

        None: no query (score-free policies). Default: every query when the policy uses a score (always
        correct; narrow it so that a shared prefill records fewer queries).
        """
        return (0, n) if self.uses_score and n > 0 else None

    def observed_queries(self, n: int) -> int:
        """How many prompt queries score the keys for a prompt of n tokens (0: none)."""
        span = self.observed_span(n)
        return 0 if span is None else span[1] - span[0]

    def queries_needed(self, n: int) -> int:
        """How many of the last prompt queries `score` reads for a prompt of n tokens (0: none)."""
        span = self.observed_span(n)
        return 0 if span is None else n - span[0]

    def reserved(self, n: int) -> int:
        """Slots the policy keeps in every layer whatever the budget, for a row of n valid tokens (SnapKV's
        window, TOVA's last token); layer budgets (`obinfer/cache/layer_budgets.py`) spread only the rest.
        Default 0."""
        return 0

    # ------------------------------------------------------------------ prefill
    def score(self, q: Tensor, q_pos: Tensor, layer: LayerCache, score_fn: ScoreFn, gqa: str) -> Tensor:
        """Budget-independent scores (B, Hkv, S) of the layer's slots after prefill. Pure.

        q: (B, Hq, T', D) the last T' prompt queries (post-RoPE; at least `queries_needed(T)` of them
        and at least one; index them from the end), q_pos: (B, T') their positions. Slots that are
        always kept whatever the budget (SnapKV's window, TOVA's last token) score `+inf`; invalid
        slots `-inf`. A policy with `reuses_outputs` also takes `outputs=`, when the press has them: the
        layer's float32 attention outputs (B, Hq, T'', D) of the last T'' <= T' queries of q (a prefill
        layer's own attention), for `ScoreInputs.outputs`. It must score the same as without them (up
        to float32 rounding) and ignore outputs that do not cover the queries it reads.
        """
        raise NotImplementedError

    def score_many(
        self, q: Tensor, q_pos: Tensor, layer: LayerCache, score_fns: Sequence[ScoreFn], gqa: str, **kw: Any
    ) -> list[Tensor]:
        """`score` for several score functions, equal to one `score` call each, bit for bit. The default
        makes those calls (kw: `outputs=` for a policy with `reuses_outputs`); a policy whose scoring pass
        is costly (H2O: every prompt query against every key) shares it between the scores (`Fanout` asks
        for the scores of all its presses that differ only in the score)."""
        return [self.score(q, q_pos, layer, fn, gqa, **kw) for fn in score_fns]

    def update_state(self, layer: LayerCache, scores: Tensor, pos: Tensor) -> None:
        """Fold scores (B, Hkv, S) from `score` or `decode_scores` into per-slot state in the layer.

        pos: (B, Hkv, S) slot positions (`layer.dense()`, negative: invalid). Called by the press
        whenever scores were computed for the layer, before it is compacted (the state is compacted
        with the slots). Default: no state.
        """

    def protect(self, scores: Tensor, pos: Tensor, q_pos: Tensor, n_kept: Tensor) -> Tensor:
        """The final prefill ranking for a budget of n_kept (B,) tokens per head (default: `scores`).

        Budget-dependent protection (`+inf`) goes here, and any rescaling that must not enter the
        state. pos: (B, Hkv, S) slot positions; q_pos: as given to `score`.
        """
        return scores

    def score_lookahead(
        self, q: Tensor, q_pos: Tensor, layer: LayerCache, score_fn: ScoreFn, gqa: str
    ) -> Tensor:
        """Like `score`, but every query of q (B, Hq, T', D) observes, including queries from after the
        prompt (LAQ's lookahead queries, not in the cache): the policy's observation window is replaced,
        its protection is not. Only policies with `lookahead = True` have it. Pure."""
        raise PressError(f"{self.name} cannot observe lookahead queries")

    # ------------------------------------------------------------------ per-token input (needs_input)
    def bind(self, model: Any, budget: int | None) -> Policy:
        """This policy with its model-specific settings resolved, for a run on `model` under `budget`
        (None: a compression ratio). Default: itself. TRIM-KV: its gates file found for the model and
        budget, and checked (a bound policy names the file, so its per-slot state and shared scores never
        mix with another file's)."""
        return self

    def input_accumulators(self) -> tuple[str, ...]:
        """The per-slot accumulators `observe_input` writes (a shared prefill drops the others' from a fork)."""
        return ()

    def observe_input(self, idx: int, x: Tensor, pos: Tensor, layer: LayerCache) -> None:
        """Only for `needs_input`, on a bound policy (`bind`): layer idx's normalised input x (B, T, C) for its T newest slots, right
        after they were appended (positions pos (B, T)); write per-slot state (`LayerCache.set_newest`)."""

    # ------------------------------------------------------------------ decode
    def decode_scores(
        self, q: Tensor, q_pos: Tensor, layer: LayerCache, score_fn: ScoreFn, gqa: str
    ) -> Tensor:
        """Scores (B, Hkv, S) of a decode step whose queries are q (B, Hq, T, D). Pure."""
        raise PressError(f"{self.name} does not evict during decoding")

    def decode_ranking(self, layer: LayerCache, scores: Tensor, pos: Tensor) -> Tensor:
        """The ranking after a decode step, once `update_state` ran (default: the step's scores)."""
        return scores

    def protect_decode(self, scores: Tensor, pos: Tensor, seen: Tensor, budget: int) -> Tensor:
        """Mark slots that decode-time eviction must keep (default: the newest token)."""
        return scores.masked_fill(pos == (seen[:, None, None] - 1), INF)


RESERVED_NAMES = ("full", "none")
POLICIES: dict[str, type[Policy]] = {}


def check_name(kind: str, name: Any) -> None:
    """ValueError unless name can be part of a press name: a non-empty string without "-", not reserved."""
    if not isinstance(name, str) or not name or "-" in name or name in RESERVED_NAMES:
        raise ValueError(f"{kind} name must be a non-empty string without '-', not full/none; got {name!r}")


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: register a `Policy` subclass under its `name` (made a frozen dataclass if it is
    not a dataclass already). Its options are the dataclass fields, checked in `__post_init__`."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise TypeError(f"register_policy takes a Policy subclass, got {cls!r}")
    name = cls.__dict__.get("name")
    check_name("policy", name)
    if name in POLICIES:
        raise ValueError(f"policy {name!r} is already registered")
    for mod, attr, kind in (
        ("obinfer.cache.allocators", "ALLOCATORS", "allocator"),
        ("obinfer.cache.layer_budgets", "LAYER_BUDGETS", "layer budget"),
        ("obinfer.cache.lookahead", "QUERY_SOURCES", "query source"),
    ):
        if name in getattr(sys.modules.get(mod), attr, {}):
            raise ValueError(f"policy {name!r} would shadow the {kind} of that name")
    if "__dataclass_fields__" not in cls.__dict__:
        cls = dataclass(frozen=True)(cls)
    POLICIES[name] = cls
    return cls


def _invalid(scores: Tensor, pos: Tensor) -> Tensor:
    return scores.masked_fill(pos < 0, -INF)


@register_policy
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
    lookahead = True
    reuses_outputs = True
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

    def observed_span(self, n: int) -> tuple[int, int] | None:
        return (n - min(self.window, n), n) if n > 0 else None

    def reserved(self, n: int) -> int:
        return self.window if n > self.window else 0

    def score(self, q, q_pos, layer, score_fn, gqa, outputs=None):  # noqa: ANN001
        k, v, pos = layer.dense()
        w = min(self.window, k.shape[2])
        # the window's A V, already computed (outputs of the last queries; too few: recompute)
        o = outputs[:, :, -w:] if outputs is not None and outputs.shape[2] >= w else None
        s = score_fn(ScoreInputs(q[:, :, -w:], k, v, q_pos[:, -w:], pos, gqa, outputs=o))  # (B, Hkv, n)
        return self._rank(s, pos, q_pos[:, -w:])

    def score_lookahead(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
        """Every given query observes (LAQ's lookahead queries, and LAQ++'s prompt tail); the last
        `window` prompt tokens are still protected and the rest pooled, as in `score`."""
        k, v, pos = layer.dense()
        return self._rank(score_fn(ScoreInputs(q, k, v, q_pos, pos, gqa)), pos, q_pos)

    def _rank(self, s: Tensor, pos: Tensor, obs_pos: Tensor) -> Tensor:
        """Summed scores s (B, Hkv, n) -> the ranking: the last `window` slots protected, the rest pooled;
        rows not longer than the window observed whole. obs_pos: (B, W) positions of the observers.

        "The last slots" are each head's newest valid ones: a ragged layer (a chunked prefill compresses
        rows and AdaKV heads to different lengths, and `dense` pads them at the end) is first rolled so
        that every head's last valid slot is the last slot, ranked, and rolled back."""
        n = s.shape[-1]
        if n and not bool((pos[..., -1] >= 0).all()):
            ar = torch.arange(n, device=pos.device)
            last = torch.where(pos >= 0, ar, -1).amax(-1, keepdim=True)  # (B, Hkv, 1)
            last = torch.where(last < 0, n - 1, last)  # an empty head stays as it is
            idx = (ar - (n - 1 - last)) % n  # aligned[j] = x[idx[j]]: the last valid slot goes to n - 1
            ranked = self._rank_aligned(s.gather(-1, idx), pos.gather(-1, idx), obs_pos)
            return torch.empty_like(ranked).scatter_(-1, idx, ranked)
        return self._rank_aligned(s, pos, obs_pos)

    def _rank_aligned(self, s: Tensor, pos: Tensor, obs_pos: Tensor) -> Tensor:
        n = s.shape[-1]
        w = min(self.window, n)
        short = (pos >= 0).sum(-1) <= self.window  # (B, Hkv) heads observed whole (rows, in one shot)
        if bool(short.all()):
            return _invalid(self._whole_prompt(s, pos, obs_pos), pos)
        ctx = s[..., : n - w].masked_fill(pos[..., : n - w] < 0, 0.0)
        out = torch.cat(
            [pool_scores(ctx, self.kernel, self.pooling), torch.full_like(s[..., n - w :], INF)], -1
        )
        if bool(short.any()):
            out = torch.where(short[..., None], self._whole_prompt(s, pos, obs_pos), out)
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


@register_policy
class TOVA(Policy):
    """TOVA: the last query observes; its score is averaged over all heads (same kept set per KV head)."""

    name = "tova"
    decode_time = True
    lookahead = True
    per_head: bool = False  # option: each KV head ranks by its own group's score

    def __post_init__(self) -> None:
        check_bool(self.name, "per_head", self.per_head)

    def observed_span(self, n: int) -> tuple[int, int] | None:
        return (n - 1, n) if n > 0 else None

    def reserved(self, n: int) -> int:
        return 1 if n > 0 else 0

    def score_lookahead(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
        """Every given query observes (summed); the last prompt token is still always kept."""
        s, pos = self._last_query(q, q_pos, layer, score_fn, gqa, last=q.shape[2])
        return s.masked_fill((pos == pos.amax(dim=(1, 2), keepdim=True)) & (pos >= 0), INF)

    def _last_query(self, q, q_pos, layer, score_fn, gqa, last: int = 1):  # noqa: ANN001
        k, v, pos = layer.dense()
        s = score_fn(ScoreInputs(q[:, :, -last:], k, v, q_pos[:, -last:], pos, gqa))
        if not self.per_head:
            s = s.masked_fill(pos < 0, 0.0).mean(1, keepdim=True).expand_as(s)
        return _invalid(s, pos), pos

    def score(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
        s, pos = self._last_query(q, q_pos, layer, score_fn, gqa)
        return s.masked_fill(pos == q_pos[:, -1:, None], INF)  # the last token is always kept

    def decode_scores(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
        return self._last_query(q, q_pos, layer, score_fn, gqa)[0]


@register_policy
class H2O(Policy):
    """H2O: scores accumulated over every query seen (prefill, then decode); recent tokens protected.

    `recent`: protected most-recent tokens (None = half the budget, the paper's split; more than the
    prompt simply protects the whole prompt).
    `normalize="visible"`: divide each key's prefill sum by the number of queries that see it and use
    no recent window (kvpress ObservedAttentionPress, prefill only).
    `chunk`: queries scored at once (memory and speed, not results); None (default): sized by
    `score_queries_chunked` to keep each chunk's temporaries small.
    `fused=True`: a prefill layer that evicts takes its attention outputs from the scoring pass, which
    computes every prompt query's attention anyway (`score_and_attend`), instead of a second attention
    pass: a faster prefill, with the layer's attention in float32 instead of the SDPA kernel, so the
    results differ from the unfused prefill (and from `Fanout`'s shared prefill) by rounding.

    State: the per-slot sums live in the layer's accumulator `acc_name` (`update_state`), so decoding
    steps keep adding to them; `score` returns the plain sums and `protect` applies the normalisation.
    """

    name = "h2o"
    decode_time = True
    recent: int | None = None
    normalize: str = "none"  # or "visible"
    chunk: int | None = None
    fused: bool = False
    acc_name: str = field(default="h2o", repr=False)

    def __post_init__(self) -> None:
        check_int(self.name, "recent", self.recent, 0, allow_none=True)
        check_choice(self.name, "normalize", self.normalize, ("none", "visible"))
        check_int(self.name, "chunk", self.chunk, 1, allow_none=True)
        check_bool(self.name, "fused", self.fused)
        if not isinstance(self.acc_name, str) or not self.acc_name:
            raise PressError(f"h2o option acc_name must be a non-empty string, got {_show(self.acc_name)}")

    def observed_span(self, n: int) -> tuple[int, int] | None:
        return (0, n) if n > 0 else None

    def score(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
        return self.score_many(q, q_pos, layer, [score_fn], gqa)[0]

    def update_state(self, layer: LayerCache, scores: Tensor, pos: Tensor) -> None:
        """Add the sums to the accumulator (0 on invalid slots)."""
        layer.add_to_accumulator(self.acc_name, scores.masked_fill(pos < 0, 0.0))

    def protect(self, scores: Tensor, pos: Tensor, q_pos: Tensor, n_kept: Tensor) -> Tensor:
        """The recent window; with normalize="visible", the per-key mean instead and no window (kvpress)."""
        if self.normalize == "visible":
            seen = q_pos[:, -1][:, None, None] + 1  # queries in the prompt per row
            return _invalid(scores / (seen - pos).clamp_min(1), pos)
        return self._protect_recent(scores, pos, q_pos[:, -1] + 1, n_kept)

    @property
    def fuses_attention(self) -> bool:  # type: ignore[override]
        return self.fused

    def score_and_attend(self, q, q_pos, layer, score_fn, gqa) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        """`score`, plus the attention outputs (B, Hq, T, D) of the T new queries (the last slots), taken
        from the same chunks: H2O computes every prompt query's attention for its scores anyway, so the
        model's own attention pass is not needed (`fused`; see `PressRun.compress_layer`)."""
        k, v, pos = layer.dense()
        out = torch.empty_like(q)
        s = score_queries_chunked(
            score_fn, q, q_pos, k, v, pos, gqa, self.chunk, causal_prefix=True, outputs=out
        )
        return _invalid(s.masked_fill(pos < 0, 0.0), pos), out

    def score_many(self, q, q_pos, layer, score_fns, gqa):  # noqa: ANN001
        """One chunked pass over every prompt query for all the scores (their logits, attention and
        outputs computed once per chunk)."""
        k, v, pos = layer.dense()
        return [_invalid(s, pos) for s in self._sums(q, q_pos, k, v, pos, score_fns, gqa)]

    def _sums(self, q, q_pos, k, v, pos, score_fns, gqa) -> list[Tensor]:  # noqa: ANN001
        """Each score summed over the new queries q (the last slots), all from the same chunks
        (`score_queries_chunked`); 0 on invalid slots."""
        sums = score_queries_chunked(
            list(score_fns), q, q_pos, k, v, pos, gqa, self.chunk, causal_prefix=True
        )
        return [s.masked_fill(pos < 0, 0.0) for s in sums]

    def _protect_recent(self, s: Tensor, pos: Tensor, seen: Tensor, budget: Tensor | int) -> Tensor:
        r = torch.as_tensor(budget // 2 if self.recent is None else self.recent, device=s.device)
        r = r.reshape(-1, 1, 1) if r.dim() else r
        return s.masked_fill((pos >= seen[:, None, None] - r) & (pos >= 0), INF)

    def decode_scores(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
        k, v, pos = layer.dense()
        return self._sums(q, q_pos, k, v, pos, [score_fn], gqa)[0]

    def decode_ranking(self, layer: LayerCache, scores: Tensor, pos: Tensor) -> Tensor:
        """The accumulated sums (prefill and every decoding step so far)."""
        return _invalid(layer.acc_dense(self.acc_name).clone(), pos)

    def protect_decode(self, scores, pos, seen, budget):  # noqa: ANN001
        return self._protect_recent(scores, pos, seen, budget)


@register_policy
class StreamingLLM(Policy):
    """StreamingLLM: keep `sinks` first tokens and the most recent ones."""

    name = "streamingllm"
    uses_score = False
    sinks: int = 4

    def __post_init__(self) -> None:
        check_int(self.name, "sinks", self.sinks, 0)

    def score(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
        _, _, pos = layer.dense()
        s = pos.float().masked_fill((pos >= 0) & (pos < self.sinks), INF)
        return _invalid(s, pos)


@register_policy
class Knorm(Policy):
    """Knorm: keep keys with the smallest L2 norm (score = -||k||, post-RoPE, float32)."""

    name = "knorm"
    uses_score = False

    def score(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
        k, _, pos = layer.dense()
        return _invalid(-k.float().norm(dim=-1), pos)


@register_policy
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

    def score(self, q, q_pos, layer, score_fn, gqa):  # noqa: ANN001
        _, _, pos = layer.dense()
        g = torch.Generator().manual_seed(self.seed)
        return _invalid(torch.rand(pos.shape, generator=g).to(pos.device), pos)
