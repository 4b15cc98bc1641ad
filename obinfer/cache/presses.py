"""A press = policy + score + budget allocator (+ layer budget, + query source), and the name grammar
`[<source>-][<layers>-][<allocator>-]<policy>[-<score>]`.

    >>> press = make_press("adakv-snapkv-obk", compression_ratio=0.5)   # settings only, frozen
    >>> run = press.start(GenStats())                                   # the state of one prefill
    >>> logits = model(torch.tensor([ids]), cache, observer=run.prefill_observer())  # compresses

A `Press` holds settings only and can be shared between runs, threads and cache forks; everything a run
accumulates (timings, bytes before compression, observed queries, per-head decode budgets) lives in the
`PressRun` that `Press.start` returns. `FULL` (`make_press("full")`) is the press that compresses nothing:
its observers are None, so callers never test for "no press".

Budgets: `compression_ratio` (fraction removed per head, kvpress semantics) or `budget` (tokens kept
per head). With a budget, decode-time policies (H2O, TOVA) also evict while decoding, so every head
is back within its budget at the end of every step (`PressRun.decode_observer`).

Names come from the registries: policies (`policies.register_policy`), scores (`scores.register_score`),
allocators (`allocators.register_allocator`; `uniform` is the default and has no prefix), layer budgets
(`layer_budgets.register_layer_budget`: `pyramid`, `epi`; `flat` is the default) and observation-query
sources (`lookahead.register_query_source`: `laq`, `laqpp`, for window-based policies; `prompt` is the
default). `PressName` parses a name once: `laq-pyramid-adakv-snapkv-obk` is LAQ's lookahead queries,
PyramidKV's layer split, AdaKV's head split, SnapKV's policy and the obk score.

A press that needs the model (a layer budget needs its number of layers, `epi` its sensitivity profile,
LAQ decodes lookahead tokens) is started with `press.start(model=model)`; `PressRun.prefill` runs a
whole prefill (one shot, or in blocks with `chunk`) and works for every press.

Every setting is checked when the press is made, before any model runs: the ratio or budget, the
allocator's options (adakv: alpha, min_safe), gqa, and each policy option (an unknown option lists the
ones the policy has; see `obinfer/cache/policies.py` for the ranges). Errors are `PressError`, one line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from obinfer.cache import allocators, attention
from obinfer.cache import retention as _retention  # noqa: F401  (registers the trimkv policy)
from obinfer.cache.allocators import (
    ALLOCATORS,
    DEFAULT_ALLOCATOR,
    Allocator,
    allocator_options,
    make_allocator,
)
from obinfer.cache.kv_cache import LayerCache
from obinfer.cache.layer_budgets import (
    DEFAULT_LAYER_BUDGET,
    LAYER_BUDGETS,
    LayerBudget,
    layer_budget_options,
    make_layer_budget,
)
from obinfer.cache.lookahead import (
    DEFAULT_SOURCE,
    QUERY_SOURCES,
    QuerySource,
    make_query_source,
    query_source_options,
)
from obinfer.cache.policies import INF, POLICIES, Policy, PressError, is_int
from obinfer.cache.scores import GQA_MODES, SCORES, ScoreFn, get_score

FULL_NAME = "full"
Observer = Callable[[int, Tensor, Tensor, LayerCache], None]


# ------------------------------------------------------------------------------------------ names
@dataclass(frozen=True)
class PressName:
    """A press name `[<source>-][<layers>-][<allocator>-]<policy>[-<score>]`, parsed once.

    `PressName.parse("adakv-snapkv-obk") == PressName("adakv", "snapkv", "obk")`;
    `PressName.parse("laq-pyramid-snapkv") == PressName("uniform", "snapkv", "attn", "pyramid", "laq")`.
    `str()` gives the canonical name back (the defaults `prompt`, `flat`, `uniform` and the `attn` score
    are left out). `PressName()` is "full" (no press). It unpacks as the three head-level parts:
    `allocator, policy, score = PressName.parse(name)`; `layers` and `source` are attributes.
    """

    allocator: str = DEFAULT_ALLOCATOR
    policy: str = FULL_NAME
    score: str = "attn"
    layers: str = DEFAULT_LAYER_BUDGET
    source: str = DEFAULT_SOURCE

    @classmethod
    def parse(cls, name: str, *, check: bool = True) -> PressName:
        """Parse a press name.

        Args:
            check: the parts must be registered (and the score one the policy takes); else PressError
                listing the valid names. With check=False (names read back from results files) only
                the shape is checked: a two-part name starts with an allocator only if one of that name
                is registered.
        """
        if not isinstance(name, str):
            raise PressError(f"press name must be a string, got {_show(name)}")
        if name == FULL_NAME:
            return cls()
        parts = name.split("-")
        source, layers, default_prefix = DEFAULT_SOURCE, DEFAULT_LAYER_BUDGET, False
        if len(parts) > 1 and parts[0] in QUERY_SOURCES:
            source = parts.pop(0)
            default_prefix = source == DEFAULT_SOURCE
        if len(parts) > 1 and parts[0] in LAYER_BUDGETS:
            layers = parts.pop(0)
            default_prefix = default_prefix or layers == DEFAULT_LAYER_BUDGET
        alloc, explicit = DEFAULT_ALLOCATOR, False
        if len(parts) == 3 or (len(parts) == 2 and parts[0] in ALLOCATORS and parts[0] != DEFAULT_ALLOCATOR):
            alloc, parts, explicit = parts[0], parts[1:], True
        out = cls(alloc, parts[0], parts[1] if len(parts) == 2 else "attn", layers, source)
        ok = len(parts) <= 2 and all(parts) and bool(alloc)
        if ok and check:
            pol = POLICIES.get(out.policy)
            ok = (
                pol is not None
                and out.allocator in ALLOCATORS
                and not (explicit and out.allocator == DEFAULT_ALLOCATOR)
                and not default_prefix
                and (len(parts) == 1 or (out.score in SCORES and pol.uses_score))
                and (source == DEFAULT_SOURCE or (pol.lookahead and pol.uses_score))
            )
        if not ok:
            raise PressError(f"unknown press {name!r}; valid presses: {', '.join(press_names())}")
        return out

    @property
    def is_full(self) -> bool:
        return self.policy == FULL_NAME

    @property
    def family(self) -> str:
        """The name without its score: `adakv-snapkv-obk` -> `adakv-snapkv` (its `attn` baseline)."""
        return str(PressName(self.allocator, self.policy, "attn", self.layers, self.source))

    @property
    def base(self) -> str:
        """The name without its query source and layer budget: `laq-pyramid-snapkv-obk` -> `snapkv-obk`
        (the press a new method is compared against)."""
        return str(PressName(self.allocator, self.policy, self.score))

    def __str__(self) -> str:
        if self.is_full:
            return FULL_NAME
        prefix = "" if self.source == DEFAULT_SOURCE else f"{self.source}-"
        prefix += "" if self.layers == DEFAULT_LAYER_BUDGET else f"{self.layers}-"
        prefix += "" if self.allocator == DEFAULT_ALLOCATOR else f"{self.allocator}-"
        suffix = "" if self.score == "attn" else f"-{self.score}"
        return f"{prefix}{self.policy}{suffix}"

    def __iter__(self) -> Iterator[str]:
        return iter((self.allocator, self.policy, self.score))


# ------------------------------------------------------------------------------------------ presses
@dataclass(frozen=True)
class Press:
    """The settings of a press (frozen; share it freely). `start()` makes the state of one run.

    Attributes:
        policy: a `Policy` instance (its options are its fields).
        score: a registered score name.
        allocator: an `Allocator` instance, or a registered name (then with its default options).
        compression_ratio: fraction of each head's tokens removed, in [0, 1); or
        budget: tokens kept per head (>= 1); exactly one of the two.
        gqa: "sum" or "pre" (how the query heads of a KV head are aggregated).
        layers: a `LayerBudget` or a registered name: how the total is spread over the layers (default
            `flat`: every layer keeps the same; see obinfer/cache/layer_budgets.py).
        source: a `QuerySource` or a registered name: which queries observe (default `prompt`; `laq`:
            lookahead queries, for window-based policies; see obinfer/cache/lookahead.py).
    """

    policy: Policy
    score: str = "attn"
    allocator: Allocator | str = DEFAULT_ALLOCATOR
    compression_ratio: float | None = None
    budget: int | None = None
    gqa: str = "sum"
    layers: LayerBudget | str = DEFAULT_LAYER_BUDGET
    source: QuerySource | str = DEFAULT_SOURCE

    def __post_init__(self) -> None:
        if not isinstance(self.policy, Policy):
            raise PressError(f"policy must be a Policy instance, got {type(self.policy).__name__}")
        if (self.compression_ratio is None) == (self.budget is None):
            raise PressError("give exactly one of compression_ratio and budget")
        cr = self.compression_ratio
        if cr is not None and (not _is_real(cr) or not 0.0 <= cr < 1.0):  # NaN fails too
            raise PressError(f"compression ratio must be a number in [0, 1), got {_show(cr)}")
        if self.budget is not None and (not is_int(self.budget) or self.budget < 1):
            raise PressError(
                f"cache budget must be an integer >= 1 (tokens per head), got {_show(self.budget)}"
            )
        if isinstance(self.allocator, str):
            object.__setattr__(self, "allocator", make_allocator(self.allocator))
        elif not isinstance(self.allocator, Allocator):
            raise PressError(
                f"allocator must be an Allocator or a registered name, got {_show(self.allocator)}"
            )
        if not isinstance(self.gqa, str) or self.gqa not in GQA_MODES:
            raise PressError(f"gqa must be one of {', '.join(GQA_MODES)}, got {self.gqa!r}")
        if not isinstance(self.score, str) or self.score not in SCORES:
            raise PressError(f"unknown score {self.score!r}; valid scores: {', '.join(sorted(SCORES))}")
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", make_layer_budget(self.layers))
        elif not isinstance(self.layers, LayerBudget):
            raise PressError(f"layers must be a LayerBudget or a registered name, got {_show(self.layers)}")
        if isinstance(self.source, str):
            object.__setattr__(self, "source", make_query_source(self.source))
        elif not isinstance(self.source, QuerySource):
            raise PressError(f"source must be a QuerySource or a registered name, got {_show(self.source)}")
        if not self.source.is_prompt and not (self.policy.lookahead and self.policy.uses_score):
            raise PressError(
                f"query source {self.source.name} needs a window-based policy (snapkv, tova), not {self.policy.name}"
            )

    @classmethod
    def full(cls) -> NoPress:
        """The press that compresses nothing (`FULL`)."""
        return FULL

    # ------------------------------------------------------------------ what it is
    @property
    def press_name(self) -> PressName:
        score = self.score if self.policy.uses_score else "attn"
        return PressName(self.allocator.name, self.policy.name, score, self.layers.name, self.source.name)

    @property
    def base_press(self) -> Press:
        """This press with the default query source (what LAQ compresses its copy with)."""
        return replace(self, source=DEFAULT_SOURCE)

    @property
    def looks_ahead(self) -> bool:
        """True when the press decodes lookahead tokens after the prefill (a source with steps > 0)."""
        return not self.source.is_prompt and self.source.steps > 0

    @property
    def name(self) -> str:
        return str(self.press_name)

    @property
    def is_full(self) -> bool:
        """True only for `FULL`, the press that compresses nothing."""
        return False

    @property
    def decode_evicts(self) -> bool:
        """Decode-time eviction runs for H2O / TOVA when an absolute budget is given."""
        return self.budget is not None and self.policy.decode_time

    @property
    def score_fn(self) -> ScoreFn:
        return get_score(self.score)

    def n_kept(self, n_valid: Tensor) -> Tensor:
        """(B,) tokens kept per head for rows of n_valid (B,) tokens."""
        if self.budget is not None:
            return n_valid.clamp(max=self.budget)
        return allocators.n_kept_for(n_valid, self.compression_ratio)

    def observed_span(self, n: int) -> tuple[int, int] | None:
        """[start, end) of the prompt queries whose attention scores the keys (`Policy.observed_span`);
        with lookahead queries only the prompt tail that observes with them (None: no prompt query)."""
        if self.looks_ahead:
            t = min(self.source.tail_queries, n)
            return (n - t, n) if t > 0 else None
        return self.policy.observed_span(n)

    def queries_needed(self, n: int) -> int:
        """How many of the last prompt queries compressing a prompt of n tokens reads (with lookahead:
        those of the base press, which compresses the copy, and the observing tail)."""
        if self.looks_ahead:
            return max(self.policy.queries_needed(n), min(self.source.tail_queries, n))
        return self.policy.queries_needed(n)

    # ------------------------------------------------------------------ runs
    def start(
        self,
        stats: Any = None,
        *,
        memo: dict[int, Tensor] | None = None,
        keep_scores: bool = False,
        model: Any = None,
    ) -> PressRun:
        """The state of one run (one prefill and the decoding steps after it).

        Args:
            stats: a `GenStats` (or anything with scoring_s, compact_s, observed_queries) updated after
                every layer; None for no record.
            memo: layer -> budget-independent scores, shared by runs over the same prefill and the same
                (policy, score, gqa) so each layer is scored once (see `obinfer/cache/fanout.py`).
            keep_scores: keep each layer's final scores and slot positions in `PressRun.scores`.
            model: the `Transformer` the run compresses for; needed by layer budgets (the number of
                layers; `epi`: the sensitivity profile) and lookahead sources (`PressRun.prefill` sets it).
        """
        return PressRun(self, stats, memo=memo, keep_scores=keep_scores, model=model)

    def prefill_observer(self, stats: Any = None) -> Observer | None:
        """Shortcut for `start(stats).prefill_observer()`: prefill compression only (decode-time eviction
        needs the run: `run = press.start(stats)`, then `run.decode_observer()`)."""
        return self.start(stats).prefill_observer()


@dataclass(frozen=True, repr=False)
class NoPress(Press):
    """No compression: the plain full cache. Its runs have no observers and record nothing."""

    policy: Policy | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        pass

    def __repr__(self) -> str:
        return "NoPress()"

    @property
    def press_name(self) -> PressName:
        return PressName()

    @property
    def is_full(self) -> bool:
        return True

    @property
    def decode_evicts(self) -> bool:
        return False

    @property
    def looks_ahead(self) -> bool:
        return False

    def n_kept(self, n_valid: Tensor) -> Tensor:
        return n_valid

    def observed_span(self, n: int) -> tuple[int, int] | None:
        return None

    def queries_needed(self, n: int) -> int:
        return 0

    def start(
        self,
        stats: Any = None,
        *,
        memo: dict[int, Tensor] | None = None,
        keep_scores: bool = False,
        model: Any = None,
    ) -> PressRun:
        return _NoPressRun(self, stats, model=model)


FULL = NoPress()


class PressRun:
    """One run of a press: what a prefill (and the decoding after it) accumulates.

    Attributes:
        press: the settings.
        stats: updated after every layer (scoring_s, compact_s, observed_queries), or None.
        scoring_s: time spent scoring and choosing the kept slots (prefill and decode).
        compact_s: time spent compacting the cache (gathering the kept K/V).
        bytes_before: K/V bytes of the layers just before their compression; after a chunked prefill,
            which never holds the whole prompt, the bytes a one-shot prefill of it would (so that kept /
            before is the press's ratio either way; `peak_bytes` is what the chunked prefill held).
        observed_queries: prompt queries that scored the keys (see GenStats.observed_queries): e.g.
            snapkv's window, or fewer when the prompt is not longer than the window; None until a layer
            is scored.
        head_budgets: layer -> per-segment budgets for decode-time eviction.
        memo: layer -> budget-independent scores (`Policy.score`), or None (see `Press.start`).
        scores: with keep_scores, layer -> (final scores (B, Hkv, S), slot positions (B, Hkv, S)) of the
            full layer, as handed to the allocator; None otherwise.
        model, n_layers: the model (see `Press.start`) and its number of layers, or None.
        lookahead_s: time spent compressing the copy and decoding the lookahead tokens (LAQ).
        layer_budgets: the per-layer budgets (B, L) of the last split (layer budgets only), or None.
    """

    def __init__(
        self,
        press: Press,
        stats: Any = None,
        *,
        memo: dict[int, Tensor] | None = None,
        keep_scores: bool = False,
        model: Any = None,
    ) -> None:
        self.press, self.stats, self.memo = press, stats, memo
        # (score function, memo) of other presses of the same prefill that differ from this one only in
        # the score (set by `Fanout`): scored together with this one (`Policy.score_many`)
        self.shared_memos: list[tuple[ScoreFn, dict[int, Tensor]]] = []
        self.scoring_s, self.compact_s, self.bytes_before, self.lookahead_s = 0.0, 0.0, 0, 0.0
        self.observed_queries: int | None = None
        self.head_budgets: dict[int, list[int]] = {}
        self.scores: dict[int, tuple[Tensor, Tensor]] | None = {} if keep_scores else None
        self.model = model
        self.n_layers: int | None = None if model is None else int(model.cfg.n_layers)
        self._splits: dict[tuple[int, ...], Tensor] = {}
        self.layer_budgets: Tensor | None = None
        self.peak_bytes, self.max_slots = 0, 0  # most K/V bytes held, most slots of a head (chunked)
        self._target_n: Tensor | None = None  # chunked prefill: valid prompt tokens per row
        self._policy: Policy | None = None  # the press's policy bound to the model (`policy`)

    # ------------------------------------------------------------------ layer budgets
    def layer_budget(self, idx: int, n_valid: Tensor) -> tuple[Tensor, Tensor | None]:
        """Tokens per head layer `idx` keeps for rows of n_valid (B,) tokens, and its decode-time budget
        (B,) (None without an absolute budget). Flat: the press's; else the layer's share of the total
        (`obinfer/cache/layer_budgets.py`; the split is computed once per prompt shape)."""
        press = self.press
        n_ref = n_valid if self._target_n is None else self._target_n  # chunked: the whole prompt's
        if press.layers.is_flat:
            decode = None if press.budget is None else torch.full_like(n_valid, press.budget)
            return press.n_kept(n_ref).minimum(n_valid), decode
        if self.n_layers is None:
            raise PressError(
                f"press {press.name} spreads its budget over the layers and needs the model: "
                "start it with press.start(model=model)"
            )
        key = tuple(n_ref.tolist())
        split = self._splits.get(key)
        if split is None:
            if press.budget is None:
                mean, cap = press.n_kept(n_ref), n_ref
            else:
                mean, cap = torch.full_like(n_ref, press.budget), None
            reserve = torch.tensor([press.policy.reserved(int(n)) for n in key], dtype=torch.long)
            split = press.layers.split(
                mean.cpu(), self.n_layers, reserve, None if cap is None else cap.cpu(), self.model
            )
            self._splits[key] = self.layer_budgets = split
        b = split[:, idx].to(n_valid.device)
        return b.minimum(n_valid), (None if press.budget is None else b)

    # ------------------------------------------------------------------ prefill
    def compress_layer(
        self,
        idx: int,
        q: Tensor,
        q_pos: Tensor,
        layer: LayerCache,
        *,
        lookahead: bool = False,
        continued: bool = False,
        attend: bool = False,
        outputs: Tensor | None = None,
    ) -> Tensor | None:
        """Score the layer's slots with the prompt queries q (B, Hq, T, D) and keep the best.

        lookahead: every query of q observes, including queries from after the prompt
        (`Policy.score_lookahead`; LAQ); the memo is not used then.
        continued: q are the newest block of a chunked prefill, the layer already compressed before it:
        the ranking comes from the policy's running state (`Policy.decode_ranking`: H2O's sums over
        every block so far); no memo.
        attend: the layer's attention has not been computed yet (q are its T newest slots): return the
            attention outputs (B, Hq, T, D) of the uncompressed layer. When the layer evicts, a policy
            that scores every query (`Policy.fuses_attention`, H2O) takes them from its own scoring pass
            (float32), which then also counts in `scoring_s`; otherwise they come from
            `attention.attend`, so a press that evicts nothing stays bit-identical to no press. Returns
            None when not attend.
        outputs: when not attend, the layer's attention outputs (B, Hq, T'', D) of the last T'' queries
            of q, if the caller kept them (`Fanout`). A policy with `reuses_outputs` (SnapKV) scores with
            the float32 outputs, from `attend` or from here, instead of recomputing them, so a shared
            prefill compresses exactly as the press's own prefill does.
        """
        press, pol = self.press, self.policy
        out = None
        if attend and not (pol.fuses_attention and layer.is_uniform()):
            out = attention.attend(layer, q, q.shape[2])  # before anything is evicted
        t0 = time.perf_counter()
        self.bytes_before += layer.nbytes()
        _, _, pos = layer.dense()
        n_valid = (pos >= 0).sum(-1).amax(-1)  # (B,) the longest head (one-shot prefill: all alike)
        n_kept, decode_budget = self.layer_budget(idx, n_valid)
        evicts = not (bool((n_kept >= n_valid).all()) and layer.n_invalid == 0)
        if attend and out is None and not evicts:  # nothing evicted: the usual attention, bit for bit
            out = attention.attend(layer, q, q.shape[2])
        if not (evicts or press.decode_evicts or continued or self.scores is not None):
            self.scoring_s += time.perf_counter() - t0
            return out  # nothing to evict, no state to keep: identical to no press (chunked: H2O's sums)
        if evicts or press.decode_evicts:
            self.observed_queries = q.shape[2] if lookahead else pol.observed_queries(int(n_valid.min()))
        raw = None if (self.memo is None or lookahead or continued) else self.memo.get(idx)
        if raw is None:
            if lookahead:
                raw = pol.score_lookahead(q, q_pos, layer, press.score_fn, press.gqa)
            elif attend and out is None:
                raw, out = pol.score_and_attend(q, q_pos, layer, press.score_fn, press.gqa)
                out = out.to(q.dtype)
            else:
                known = out if out is not None else outputs
                reuse = pol.reuses_outputs and known is not None and known.dtype == torch.float32
                kw = {"outputs": known} if reuse else {}
                if (shared := [(f, m) for f, m in self.shared_memos if idx not in m]) and not continued:
                    raw, *others = pol.score_many(
                        q, q_pos, layer, [press.score_fn, *(f for f, _ in shared)], press.gqa, **kw
                    )
                    for (_, m), other in zip(shared, others, strict=True):
                        m[idx] = other
                else:
                    raw = pol.score(q, q_pos, layer, press.score_fn, press.gqa, **kw)
            if self.memo is not None and not (continued or lookahead):
                self.memo[idx] = raw
        if attend and out is None:  # a memo hit: the scores were shared, the attention was not
            out = attention.attend(layer, q, q.shape[2])
        pol.update_state(layer, raw, pos)  # also on a memo hit: the state belongs to this cache
        if continued:
            raw = pol.decode_ranking(layer, raw, pos)
        scores = pol.protect(raw, pos, q_pos, n_kept) if evicts or self.scores is not None else raw
        if self.scores is not None:
            self.scores[idx] = (scores, pos.clone())
        if not evicts:
            if press.decode_evicts:
                H = layer.n_kv_heads
                self.head_budgets[idx] = [int(decode_budget[i // H]) for i in range(layer.n_segments)]
            self.scoring_s += time.perf_counter() - t0
            return out
        mask = press.allocator(scores, n_kept)
        keep = [torch.nonzero(m, as_tuple=True)[0] for row in mask for m in row]
        t1 = time.perf_counter()
        self.scoring_s += t1 - t0
        layer.keep(keep)
        self.compact_s += time.perf_counter() - t1
        if press.decode_evicts:  # uniform: the budget; AdaKV: the head's share, plus a short row's slack
            H, slack = layer.n_kv_heads, (decode_budget - n_kept).tolist()
            self.head_budgets[idx] = [L + slack[i // H] for i, L in enumerate(layer.length)]
        return out

    def _report(self) -> None:
        if self.stats is not None:
            self.stats.scoring_s, self.stats.compact_s = self.scoring_s, self.compact_s
            self.stats.observed_queries = self.observed_queries

    def prefill_observer(self) -> Observer | None:
        """An observer for `Transformer.forward` that compresses each layer right after its attention.

        Raises PressError for a press that looks ahead (LAQ compresses after the whole prefill): run
        it with `PressRun.prefill` (or `Fanout`).
        """
        if self.press.looks_ahead:
            raise PressError(
                f"press {self.press.name} compresses after the prefill (it decodes lookahead tokens): "
                "use run.prefill(model, ids, cache) or Fanout"
            )

        def observe(
            idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache, outputs: Tensor | None = None
        ) -> None:
            self.compress_layer(idx, q, q_pos, layer, outputs=outputs)
            self._report()

        def attend_and_observe(idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> Tensor:
            """The layer's attention outputs, then its compression (`compress_layer(attend=True)`)."""
            out = self.compress_layer(idx, q, q_pos, layer, attend=True)
            self._report()
            return out

        observe.attend_and_observe = attend_and_observe  # used by Transformer.forward when present
        return self._with_input(observe)

    # ------------------------------------------------------------------ whole prefills
    def _bind(self, model: Any) -> None:
        if self.model is None:
            self.model, self.n_layers = model, int(model.cfg.n_layers)

    @property
    def policy(self) -> Policy:
        """The press's policy bound to the run's model (`Policy.bind`; TRIM-KV: its gates file resolved
        and checked); the press's own for policies that need no model."""
        if self._policy is None:
            pol = self.press.policy
            if pol.needs_input:
                if self.model is None:
                    raise PressError(
                        f"press {self.press.name} reads the model's hidden states: start it with "
                        "press.start(model=model) or run.prefill(model, ...)"
                    )
                pol = pol.bind(self.model, self.press.budget)
            self._policy = pol
        return self._policy

    def _with_input(self, observe: Observer) -> Observer:
        """observe, given an `observe_input` hook when the policy reads each layer's input (needs_input)."""
        if self.press.policy.needs_input:

            def observe_input(idx: int, x: Tensor, pos: Tensor, layer: LayerCache) -> None:
                self.policy.observe_input(idx, x, pos, layer)

            observe.observe_input = observe_input  # type: ignore[attr-defined]
        return observe

    def prefill(
        self, model: Any, ids: Tensor, cache: Any, *, n_pad: Tensor | None = None, chunk: int | None = None
    ) -> Tensor:
        """Run the prompt ids (B, T) (left-padded with n_pad (B,)) through `model` into `cache`, compressing
        it as this press does, and return the last position's logits (B, V).

        Most presses compress each layer right after its attention (`prefill_observer`); a press that
        looks ahead records the queries it needs, then compresses every layer after the forward
        (`compress_lookahead`). With `chunk` = N, the prompt is fed in blocks of N tokens and every layer
        is compressed to the press's final budget after each block (`_prefill_chunked`).
        `peak_bytes` records the most K/V bytes the cache held.
        """
        self._bind(model)
        if chunk is not None:
            if not is_int(chunk) or chunk < 1:
                raise PressError(
                    f"prefill chunk must be an integer >= 1 (tokens per block), got {_show(chunk)}"
                )
            return self._prefill_chunked(model, ids, cache, n_pad, int(chunk))
        if not self.press.looks_ahead:
            observe = self.prefill_observer()

            def compress(idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
                self.peak_bytes = max(self.peak_bytes, cache.nbytes())
                if observe is not None:
                    observe(idx, q, q_pos, layer)

            def attend_and_compress(idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> Tensor:
                self.peak_bytes = max(self.peak_bytes, cache.nbytes())
                return observe.attend_and_observe(idx, q, q_pos, layer)

            if observe is not None:
                compress.attend_and_observe = attend_and_compress
                compress = self._with_input(compress)
            logits = model(ids, cache, n_pad=n_pad, observer=compress, last_only=True)[:, -1]
            self.peak_bytes = max(self.peak_bytes, cache.nbytes())
            return logits
        record, rec_q, rec_pos = self._recorder(int(ids.shape[1]))
        logits = model(ids, cache, n_pad=n_pad, observer=record, last_only=True)[:, -1]
        self.peak_bytes = max(self.peak_bytes, cache.nbytes())
        self.compress_lookahead(cache, logits, rec_q, rec_pos)
        return logits

    def _recorder(self, n: int) -> tuple[Observer, dict[int, Tensor], dict[int, Tensor]]:
        """An observer keeping each layer's last queries that a lookahead press reads, and the dicts."""
        keep = max(1, self.press.queries_needed(n))
        rec_q: dict[int, Tensor] = {}
        rec_pos: dict[int, Tensor] = {}

        def record(idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
            rec_q[idx], rec_pos[idx] = q[:, :, -keep:].clone(), q_pos[:, -keep:].clone()

        return record, rec_q, rec_pos

    def _prefill_chunked(
        self, model: Any, ids: Tensor, cache: Any, n_pad: Tensor | None, chunk: int
    ) -> Tensor:
        """Block-wise prefill with bounded memory (EpiCache's first component; docs/cache.md section 2).

        The prompt goes in blocks of `chunk` = N tokens. After each block's attention, every layer is
        compressed to the press's budget M for the whole prompt (the budget, or int(n (1 - ratio)) of the
        n valid prompt tokens; a layer budget's share), scored with that block's queries: SnapKV observes
        the block's last window, TOVA its last query, H2O adds the block's queries to its running sums
        and ranks by them. So no layer holds more than M + N slots per head and no attention spans more
        than M + N keys; activations are those of N tokens. Kept keys keep their RoPE positions. A press
        that looks ahead compresses the earlier blocks with its base press and runs its lookahead after
        the last block. With N >= the prompt, this is the one-shot prefill, exactly. Blocks are counted
        from the end (`block_bounds`): the first one takes the remainder, so the last block is full and a
        left-padded row is cut exactly as it would be alone.
        """
        B, T = ids.shape
        pads = torch.zeros(B, dtype=torch.long) if n_pad is None else n_pad.detach().cpu().long()
        self._target_n = (T - pads).to(cache.seen.device)  # valid prompt tokens per row: the budget's base
        la = self.press.looks_ahead
        record, rec_q, rec_pos = self._recorder(min(chunk, T))
        try:
            for s, e in block_bounds(T, chunk):
                block = ids[:, s:e]
                bp = (pads - s).clamp(0, block.shape[1])
                last = e == T

                def observe(idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache, last: bool = last) -> None:
                    self.peak_bytes = max(self.peak_bytes, cache.nbytes())
                    self.max_slots = max(self.max_slots, max(layer.length))
                    if last and la:
                        record(idx, q, q_pos, layer)
                    else:
                        self.compress_layer(idx, q, q_pos, layer, continued=True)
                        self._report()

                n_pad_b = bp.to(ids.device) if bool(bp.any()) else None
                observe = self._with_input(observe)
                logits = model(block, cache, n_pad=n_pad_b, observer=observe, last_only=True)[:, -1]
            if la:
                self.compress_lookahead(cache, logits, rec_q, rec_pos)
        finally:
            self._target_n = None
        # never held (see peak_bytes): the whole prompt's K/V, T slots per row and KV head in every layer
        self.bytes_before = T * sum(L.n_segments * L.slot_bytes for L in cache.layers)
        return logits

    def compress_lookahead(
        self,
        cache: Any,
        logits: Tensor,
        q: dict[int, Tensor],
        q_pos: dict[int, Tensor],
        *,
        base_memo: dict[int, Tensor] | None = None,
    ) -> None:
        """LAQ (obinfer/cache/lookahead.py) on a prefilled, uncompressed cache, in place.

        A copy of the cache is compressed with the base press (from the recorded prompt queries q, q_pos:
        layer -> the last queries and their positions), the source decodes its lookahead tokens on the
        copy from the prefill's `logits` (B, V), and every layer of `cache` is compressed with the
        lookahead queries (and the source's prompt tail) observing. The copy is dropped; `cache` and its
        position counter hold the prompt alone.
        """
        press = self.press
        if self.model is None:
            raise PressError(
                f"press {press.name} decodes lookahead tokens: start it with press.start(model=model)"
            )
        t0 = time.perf_counter()
        layers = range(len(cache.layers))
        n_valid = [(cache.layers[i].dense()[2] >= 0).sum(-1).amax(-1) for i in layers]  # longest head
        if all(cache.layers[i].n_invalid == 0 for i in layers) and all(
            bool((self.layer_budget(i, n_valid[i])[0] >= n_valid[i]).all()) for i in layers
        ):  # nothing to evict: no lookahead; only the decode-time state (budgets) and scores as asked
            if press.decode_evicts or self.scores is not None:
                with torch.inference_mode():
                    for i in layers:
                        self.compress_layer(i, q[i], q_pos[i], cache.layers[i])
                self._report()
            return
        base = press.base_press.start(memo=base_memo, model=self.model)
        copy = cache.fork()
        with torch.inference_mode():
            for i, layer in enumerate(copy.layers):
                base.compress_layer(i, q[i], q_pos[i], layer)
            la_q, la_pos = press.source.queries(self.model, copy, logits)
        self.peak_bytes = max(self.peak_bytes, cache.nbytes() + copy.nbytes())  # full cache + the copy
        del copy
        self.lookahead_s += time.perf_counter() - t0
        tail = press.source.tail_queries
        with torch.inference_mode():
            for i, layer in enumerate(cache.layers):
                obs, obs_pos = la_q[i], la_pos
                if tail:
                    t = min(tail, q[i].shape[2])
                    obs = torch.cat([q[i][:, :, -t:].to(obs.dtype), obs], dim=2)
                    obs_pos = torch.cat([q_pos[i][:, -t:], la_pos], dim=1)
                self.compress_layer(i, obs, obs_pos, layer, lookahead=True)
        self._report()

    # ------------------------------------------------------------------ decode
    def evict_step(self, idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
        """After a decode step: update scores and evict until each head is within its budget."""
        press, pol = self.press, self.policy
        t0 = time.perf_counter()
        budgets = self.head_budgets.get(idx, [press.budget] * layer.n_segments)
        step = pol.decode_scores(q, q_pos, layer, press.score_fn, press.gqa)
        _, _, pos = layer.dense()
        pol.update_state(layer, step, pos)
        seen = q_pos[:, -1] + 1
        ranking = pol.decode_ranking(layer, step, pos)
        scores = pol.protect_decode(ranking, pos, seen, press.budget).flatten(0, 1)
        over = [i for i in range(layer.n_segments) if layer.length[i] > budgets[i]]
        if len(over) == layer.n_segments and all(layer.length[i] == budgets[i] + 1 for i in over):
            # the common case: one token in, one out of every head, in one vectorized step (argmin takes
            # the first of tied minima: ties go to the lowest slot index)
            _, length = layer.segment_tensors()
            beyond = torch.arange(scores.shape[1], device=scores.device) >= length[:, None]
            layer.remove_slots(scores.masked_fill(beyond, INF).argmin(dim=1))
        elif over:
            keep = []
            for i in range(layer.n_segments):
                L = layer.length[i]
                top = torch.sort(scores[i, :L], descending=True, stable=True).indices[: budgets[i]]
                keep.append(top.sort().values)
            layer.keep(keep)
        self.scoring_s += time.perf_counter() - t0

    def decode_observer(self) -> Observer | None:
        """An observer for decode steps (None when this press does not evict while decoding)."""
        if not self.press.decode_evicts:
            return None

        def observe(idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
            self.evict_step(idx, q, q_pos, layer)
            if self.stats is not None:
                self.stats.scoring_s = self.scoring_s

        return self._with_input(observe)


class _NoPressRun(PressRun):
    """The run of `FULL`: no observers, nothing recorded."""

    def prefill_observer(self) -> Observer | None:
        return None

    def prefill(
        self, model: Any, ids: Tensor, cache: Any, *, n_pad: Tensor | None = None, chunk: int | None = None
    ) -> Tensor:
        """No compression: one forward (a chunk size changes nothing but the activations' size)."""
        if chunk is None or chunk >= ids.shape[1]:
            return model(ids, cache, n_pad=n_pad, last_only=True)[:, -1]
        pads = torch.zeros(ids.shape[0], dtype=torch.long) if n_pad is None else n_pad.detach().cpu().long()
        for s, e in block_bounds(ids.shape[1], chunk):
            bp = (pads - s).clamp(0, e - s)
            n_pad_b = bp.to(ids.device) if bool(bp.any()) else None
            logits = model(ids[:, s:e], cache, n_pad=n_pad_b, last_only=True)
        return logits[:, -1]

    def decode_observer(self) -> Observer | None:
        return None


# ------------------------------------------------------------------------------------------ helpers
def block_bounds(T: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) of the prefill blocks of T tokens, counted from the end: the first block takes the
    remainder, every other one `chunk` tokens (`block_bounds(10, 4) == [(0, 2), (2, 6), (6, 10)]`)."""
    first = T - chunk * ((T - 1) // chunk) if T > 0 else 0
    return [(0, first)] + [(s, s + chunk) for s in range(first, T, chunk)] if T > 0 else []


def _is_real(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _show(v: Any) -> str:
    return repr(v) if type(v) in (int, float) or v is None else f"{v!r} ({type(v).__name__})"


def policy_options(policy: str) -> list[str]:
    """The options (dataclass fields) a policy takes, e.g. ["window", "kernel", "pooling"] for snapkv."""
    return [f.name for f in fields(POLICIES[policy]) if f.init and f.repr]


def policy_options_text(policy: str) -> str:
    opts = policy_options(policy)
    return f"its options are: {', '.join(opts)}" if opts else f"{policy} takes no options"


def press_names() -> list[str]:
    """Every valid press name: "full", then per policy its variants (each score it takes) and those
    variants with every non-default allocator prefix; then all of these with every non-default layer
    budget prefix; then the window-based ones (and their layer-budget variants) with every non-default
    query source prefix."""
    names = [FULL_NAME]
    prefixes = [a for a in ALLOCATORS if a != DEFAULT_ALLOCATOR]
    for pname, cls in POLICIES.items():
        variants = [pname] + ([f"{pname}-{s}" for s in SCORES if s != "attn"] if cls.uses_score else [])
        names += variants + [f"{a}-{v}" for a in prefixes for v in variants]
    base = names[1:]
    layered = [f"{lb}-{v}" for lb in LAYER_BUDGETS if lb != DEFAULT_LAYER_BUDGET for v in base]
    names += layered
    window = [v for v in base + layered if _looks_ahead_ok(v)]
    names += [f"{src}-{v}" for src in QUERY_SOURCES if src != DEFAULT_SOURCE for v in window]
    return names


def _looks_ahead_ok(name: str) -> bool:
    cls = POLICIES[PressName.parse(name).policy]
    return bool(cls.lookahead and cls.uses_score)


def parse_press_name(name: str) -> PressName:
    """`[<allocator>-]<policy>[-<score>]` -> PressName (unpacks as (allocator, policy, score)).

    Raises PressError listing the valid names.
    """
    return PressName.parse(name)


def make_press(
    name: str,
    *,
    compression_ratio: float | None = None,
    budget: int | None = None,
    gqa: str = "sum",
    **options: Any,
) -> Press:
    """Build a press from its name; "full" (or "none") is `FULL`, the press that compresses nothing.

    Args:
        options: options of the policy (its dataclass fields, e.g. window=32 for snapkv,
            normalize="visible" for h2o, per_head=True for tova), of the allocator (adakv: alpha,
            min_safe), of the layer budget (pyramid: beta; epi: exponent, floor, sensitivity, ...) or of
            the query source (laq: lookahead, tail); a name several have goes to the first of these.
    Raises:
        PressError: an unknown name or option (listing the valid ones), or a bad value (naming the
            option and the expected type or range).
    """
    if not isinstance(name, str):
        raise PressError(f"press name must be a string, got {_show(name)}")
    if name in (FULL_NAME, "none"):
        if options:
            raise PressError(f"press {name} takes no options, got {', '.join(options)}")
        return FULL
    parsed = PressName.parse(name)
    allocator, policy, score = parsed
    known = {f.name for f in fields(POLICIES[policy]) if f.init}
    alloc_known = set(allocator_options(allocator)) - known
    layers_known = set(layer_budget_options(parsed.layers)) - known - alloc_known
    source_known = set(query_source_options(parsed.source)) - known - alloc_known - layers_known
    unknown = [
        k for k in options if not any(k in s for s in (known, alloc_known, layers_known, source_known))
    ]
    if unknown:
        text = policy_options_text(policy)
        extra = [
            f"{kind} {part} takes: {', '.join(sorted(opts))}"
            for kind, part, opts in (
                ("layer budget", parsed.layers, layers_known),
                ("query source", parsed.source, source_known),
            )
            if opts
        ]
        raise PressError(f"unknown option {', '.join(unknown)} for {policy}; {'; '.join([text, *extra])}")
    pick = lambda names: {k: v for k, v in options.items() if k in names}  # noqa: E731
    pol = POLICIES[policy](**pick(known))  # checked by the policy
    alloc = make_allocator(allocator, **pick(alloc_known))  # checked by the allocator
    layers = make_layer_budget(parsed.layers, **pick(layers_known))
    source = make_query_source(parsed.source, **pick(source_known))
    return Press(pol, score, alloc, compression_ratio, budget, gqa=gqa, layers=layers, source=source)


def describe_presses() -> list[tuple[str, str]]:
    """(name, one-line description) for `obinfer presses`."""
    out = [(FULL_NAME, "no compression: the plain full cache")]
    for name in press_names()[1:]:
        parsed = PressName.parse(name)
        allocator, policy, score = parsed
        doc = _first_line(POLICIES[policy])
        how = f"{doc} Score: {score}." if POLICIES[policy].uses_score else doc
        if allocator != DEFAULT_ALLOCATOR:
            how += " " + (_first_line(ALLOCATORS[allocator]) or f"{allocator} allocator.")
        if parsed.layers != DEFAULT_LAYER_BUDGET:
            how += " " + (_first_line(LAYER_BUDGETS[parsed.layers]) or f"{parsed.layers} layer budgets.")
        if parsed.source != DEFAULT_SOURCE:
            how += " " + (_first_line(QUERY_SOURCES[parsed.source]) or f"{parsed.source} queries.")
        out.append((name, how))
    return out


def _first_line(obj: Any) -> str:
    return ((obj.__doc__ or "").strip().splitlines() or [""])[0]


__all__ = [
    "FULL",
    "INF",
    "NoPress",
    "Press",
    "PressError",
    "PressName",
    "PressRun",
    "describe_presses",
    "make_press",
    "parse_press_name",
    "policy_options",
    "press_names",
]
