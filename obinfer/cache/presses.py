"""A press = policy + score + budget allocator, and the name grammar `[<allocator>-]<policy>[-<score>]`.

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

Names come from the registries: policies (`policies.register_policy`), scores (`scores.register_score`)
and allocators (`allocators.register_allocator`; `uniform` is the default and has no prefix).
`PressName` parses a name once.

Every setting is checked when the press is made, before any model runs: the ratio or budget, the
allocator's options (adakv: alpha, min_safe), gqa, and each policy option (an unknown option lists the
ones the policy has; see `obinfer/cache/policies.py` for the ranges). Errors are `PressError`, one line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from obinfer.cache import allocators
from obinfer.cache.allocators import (
    ALLOCATORS,
    DEFAULT_ALLOCATOR,
    Allocator,
    allocator_options,
    make_allocator,
)
from obinfer.cache.kv_cache import LayerCache
from obinfer.cache.policies import INF, POLICIES, Policy, PressError, is_int
from obinfer.cache.scores import GQA_MODES, SCORES, ScoreFn, get_score

FULL_NAME = "full"
Observer = Callable[[int, Tensor, Tensor, LayerCache], None]


# ------------------------------------------------------------------------------------------ names
@dataclass(frozen=True)
class PressName:
    """A press name `[<allocator>-]<policy>[-<score>]`, parsed once.

    `PressName.parse("adakv-snapkv-obk") == PressName("adakv", "snapkv", "obk")`; `str()` gives the
    canonical name back (the default allocator and the `attn` score are left out). `PressName()` is
    "full" (no press). It unpacks: `allocator, policy, score = PressName.parse(name)`.
    """

    allocator: str = DEFAULT_ALLOCATOR
    policy: str = FULL_NAME
    score: str = "attn"

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
        alloc, explicit = DEFAULT_ALLOCATOR, False
        if len(parts) == 3 or (len(parts) == 2 and parts[0] in ALLOCATORS and parts[0] != DEFAULT_ALLOCATOR):
            alloc, parts, explicit = parts[0], parts[1:], True
        out = cls(alloc, parts[0], parts[1] if len(parts) == 2 else "attn")
        ok = len(parts) <= 2 and all(parts) and bool(alloc)
        if ok and check:
            pol = POLICIES.get(out.policy)
            ok = (
                pol is not None
                and out.allocator in ALLOCATORS
                and not (explicit and out.allocator == DEFAULT_ALLOCATOR)
                and (len(parts) == 1 or (out.score in SCORES and pol.uses_score))
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
        return str(PressName(self.allocator, self.policy))

    def __str__(self) -> str:
        if self.is_full:
            return FULL_NAME
        prefix = "" if self.allocator == DEFAULT_ALLOCATOR else f"{self.allocator}-"
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
    """

    policy: Policy
    score: str = "attn"
    allocator: Allocator | str = DEFAULT_ALLOCATOR
    compression_ratio: float | None = None
    budget: int | None = None
    gqa: str = "sum"

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

    @classmethod
    def full(cls) -> NoPress:
        """The press that compresses nothing (`FULL`)."""
        return FULL

    # ------------------------------------------------------------------ what it is
    @property
    def press_name(self) -> PressName:
        score = self.score if self.policy.uses_score else "attn"
        return PressName(self.allocator.name, self.policy.name, score)

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
        """[start, end) of the prompt queries whose attention scores the keys (`Policy.observed_span`)."""
        return self.policy.observed_span(n)

    def queries_needed(self, n: int) -> int:
        """How many of the last prompt queries compressing a prompt of n tokens reads."""
        return self.policy.queries_needed(n)

    # ------------------------------------------------------------------ runs
    def start(
        self, stats: Any = None, *, memo: dict[int, Tensor] | None = None, keep_scores: bool = False
    ) -> PressRun:
        """The state of one run (one prefill and the decoding steps after it).

        Args:
            stats: a `GenStats` (or anything with scoring_s, compact_s, observed_queries) updated after
                every layer; None for no record.
            memo: layer -> budget-independent scores, shared by runs over the same prefill and the same
                (policy, score, gqa) so each layer is scored once (see `obinfer/cache/fanout.py`).
            keep_scores: keep each layer's final scores and slot positions in `PressRun.scores`.
        """
        return PressRun(self, stats, memo=memo, keep_scores=keep_scores)

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

    def n_kept(self, n_valid: Tensor) -> Tensor:
        return n_valid

    def observed_span(self, n: int) -> tuple[int, int] | None:
        return None

    def queries_needed(self, n: int) -> int:
        return 0

    def start(
        self, stats: Any = None, *, memo: dict[int, Tensor] | None = None, keep_scores: bool = False
    ) -> PressRun:
        return _NoPressRun(self, stats)


FULL = NoPress()


class PressRun:
    """One run of a press: what a prefill (and the decoding after it) accumulates.

    Attributes:
        press: the settings.
        stats: updated after every layer (scoring_s, compact_s, observed_queries), or None.
        scoring_s: time spent scoring and choosing the kept slots (prefill and decode).
        compact_s: time spent compacting the cache (gathering the kept K/V).
        bytes_before: K/V bytes of the layers just before their compression.
        observed_queries: prompt queries that scored the keys (see GenStats.observed_queries): e.g.
            snapkv's window, or fewer when the prompt is not longer than the window; None until a layer
            is scored.
        head_budgets: layer -> per-segment budgets for decode-time eviction.
        memo: layer -> budget-independent scores (`Policy.score`), or None (see `Press.start`).
        scores: with keep_scores, layer -> (final scores (B, Hkv, S), slot positions (B, Hkv, S)) of the
            full layer, as handed to the allocator; None otherwise.
    """

    def __init__(
        self,
        press: Press,
        stats: Any = None,
        *,
        memo: dict[int, Tensor] | None = None,
        keep_scores: bool = False,
    ) -> None:
        self.press, self.stats, self.memo = press, stats, memo
        self.scoring_s, self.compact_s, self.bytes_before = 0.0, 0.0, 0
        self.observed_queries: int | None = None
        self.head_budgets: dict[int, list[int]] = {}
        self.scores: dict[int, tuple[Tensor, Tensor]] | None = {} if keep_scores else None

    # ------------------------------------------------------------------ prefill
    def compress_layer(self, idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
        """Score the layer's slots with the prompt queries q (B, Hq, T, D) and keep the best."""
        press, pol = self.press, self.press.policy
        t0 = time.perf_counter()
        self.bytes_before += layer.nbytes()
        _, _, pos = layer.dense()
        n_valid = (pos[:, 0] >= 0).sum(-1)  # (B,)
        n_kept = press.n_kept(n_valid)
        evicts = not (bool((n_kept >= n_valid).all()) and layer.n_invalid == 0)
        if not (evicts or press.decode_evicts or self.scores is not None):
            self.scoring_s += time.perf_counter() - t0
            return  # nothing to evict, no state to keep: identical to no press
        if evicts or press.decode_evicts:
            self.observed_queries = pol.observed_queries(int(n_valid.min()))
        raw = None if self.memo is None else self.memo.get(idx)
        if raw is None:
            raw = pol.score(q, q_pos, layer, press.score_fn, press.gqa)
            if self.memo is not None:
                self.memo[idx] = raw
        pol.update_state(layer, raw, pos)  # also on a memo hit: the state belongs to this cache
        scores = pol.protect(raw, pos, q_pos, n_kept) if evicts or self.scores is not None else raw
        if self.scores is not None:
            self.scores[idx] = (scores, pos.clone())
        if not evicts:
            if press.decode_evicts:
                self.head_budgets[idx] = [press.budget] * layer.n_segments
            self.scoring_s += time.perf_counter() - t0
            return
        mask = press.allocator(scores, n_kept)
        keep = [torch.nonzero(m, as_tuple=True)[0] for row in mask for m in row]
        t1 = time.perf_counter()
        self.scoring_s += t1 - t0
        layer.keep(keep)
        self.compact_s += time.perf_counter() - t1
        if press.decode_evicts:  # uniform: the budget; AdaKV: the head's share, plus a short row's slack
            H, slack = layer.n_kv_heads, (press.budget - n_kept).tolist()
            self.head_budgets[idx] = [L + slack[i // H] for i, L in enumerate(layer.length)]

    def prefill_observer(self) -> Observer | None:
        """An observer for `Transformer.forward` that compresses each layer right after its attention."""

        def observe(idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
            self.compress_layer(idx, q, q_pos, layer)
            if self.stats is not None:
                self.stats.scoring_s, self.stats.compact_s = self.scoring_s, self.compact_s
                self.stats.observed_queries = self.observed_queries

        return observe

    # ------------------------------------------------------------------ decode
    def evict_step(self, idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
        """After a decode step: update scores and evict until each head is within its budget."""
        press, pol = self.press, self.press.policy
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

        return observe


class _NoPressRun(PressRun):
    """The run of `FULL`: no observers, nothing recorded."""

    def prefill_observer(self) -> Observer | None:
        return None

    def decode_observer(self) -> Observer | None:
        return None


# ------------------------------------------------------------------------------------------ helpers
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
    variants with every non-default allocator prefix."""
    names = [FULL_NAME]
    prefixes = [a for a in ALLOCATORS if a != DEFAULT_ALLOCATOR]
    for pname, cls in POLICIES.items():
        variants = [pname] + ([f"{pname}-{s}" for s in SCORES if s != "attn"] if cls.uses_score else [])
        names += variants + [f"{a}-{v}" for a in prefixes for v in variants]
    return names


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
            normalize="visible" for h2o, per_head=True for tova) or of the allocator (adakv: alpha,
            min_safe); a name both have goes to the policy.
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
    allocator, policy, score = PressName.parse(name)
    known = {f.name for f in fields(POLICIES[policy]) if f.init}
    alloc_known = set(allocator_options(allocator)) - known
    alloc_opts = {k: v for k, v in options.items() if k in alloc_known}
    unknown = [k for k in options if k not in known and k not in alloc_known]
    if unknown:
        raise PressError(f"unknown option {', '.join(unknown)} for {policy}; {policy_options_text(policy)}")
    pol = POLICIES[policy](**{k: v for k, v in options.items() if k in known})  # checked by the policy
    alloc = make_allocator(allocator, **alloc_opts)  # checked by the allocator
    return Press(pol, score, alloc, compression_ratio, budget, gqa=gqa)


def describe_presses() -> list[tuple[str, str]]:
    """(name, one-line description) for `obinfer presses`."""
    out = [(FULL_NAME, "no compression: the plain full cache")]
    for name in press_names()[1:]:
        allocator, policy, score = PressName.parse(name)
        doc = _first_line(POLICIES[policy])
        how = f"{doc} Score: {score}." if POLICIES[policy].uses_score else doc
        if allocator != DEFAULT_ALLOCATOR:
            how += " " + (_first_line(ALLOCATORS[allocator]) or f"{allocator} allocator.")
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
