"""A press = policy + score + budget allocator, and the name grammar `[adakv-]<policy>[-<score>]`.

    >>> press = make_press("adakv-snapkv-obk", compression_ratio=0.5)
    >>> stats = GenStats()
    >>> logits = model(torch.tensor([ids]), cache, observer=press.prefill_observer(stats))  # compresses

Budgets: `compression_ratio` (fraction removed per head, kvpress semantics) or `budget` (tokens kept
per head). With a budget, decode-time policies (H2O, TOVA) also evict while decoding, so every head
is back within its budget at the end of every step.

Every setting is checked when the press is made, before any model runs: the ratio or budget, the
allocator's alpha / min_safe, gqa, and each policy option (an unknown option lists the ones the policy
has; see `obinfer/cache/policies.py` for the ranges). Errors are `PressError`, one line.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from obinfer.cache import allocators
from obinfer.cache.kv_cache import LayerCache
from obinfer.cache.policies import INF, POLICIES, Policy, PressError, is_int
from obinfer.cache.scores import GQA_MODES, SCORES, get_score

ALLOCATORS = ("uniform", "adakv")


@dataclass
class Press:
    policy: Policy
    score: str = "attn"
    allocator: str = "uniform"
    compression_ratio: float | None = None
    budget: int | None = None
    alpha: float = 0.2  # AdaKV safeguard
    min_safe: int = 0  # AdaKV: n_safe >= min_safe (1 matches kvpress)
    gqa: str = "sum"
    scoring_s: float = 0.0  # time spent scoring and choosing the kept slots
    compact_s: float = 0.0  # time spent compacting the cache (gathering the kept K/V)
    bytes_before: int = 0  # K/V bytes of the layers just before their compression
    # prompt queries that scored the keys in the last prefill (see GenStats.observed_queries): e.g.
    # snapkv's window, or fewer when the prompt is not longer than the window; None until a layer is scored
    observed_queries: int | None = None
    head_budgets: dict[int, list[int]] = field(default_factory=dict, repr=False)
    # layer -> budget-independent scores; share one dict between presses that differ only in their budget
    # (same policy, score, gqa) and compress forks of the same prefill, and each layer is scored once
    score_memo: dict[int, Tensor] | None = field(default=None, repr=False)

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
        if not isinstance(self.allocator, str) or self.allocator not in ALLOCATORS:
            raise PressError(f"unknown allocator {self.allocator!r} (choose from {', '.join(ALLOCATORS)})")
        if not _is_real(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise PressError(f"AdaKV alpha must be a number in [0, 1], got {_show(self.alpha)}")
        if not is_int(self.min_safe) or self.min_safe < 0:
            raise PressError(f"AdaKV min_safe must be an integer >= 0, got {_show(self.min_safe)}")
        if not isinstance(self.gqa, str) or self.gqa not in GQA_MODES:
            raise PressError(f"gqa must be one of {', '.join(GQA_MODES)}, got {self.gqa!r}")
        if not isinstance(self.score, str) or self.score not in SCORES:
            raise PressError(f"unknown score {self.score!r}; valid scores: {', '.join(sorted(SCORES))}")
        self._score_fn = get_score(self.score)

    @property
    def name(self) -> str:
        prefix = "adakv-" if self.allocator == "adakv" else ""
        suffix = f"-{self.score}" if self.policy.uses_score and self.score != "attn" else ""
        return f"{prefix}{self.policy.name}{suffix}"

    def n_kept(self, n_valid: Tensor) -> Tensor:
        """(B,) tokens kept per head for rows of n_valid (B,) tokens."""
        if self.budget is not None:
            return n_valid.clamp(max=self.budget)
        return allocators.n_kept_for(n_valid, self.compression_ratio)

    # ------------------------------------------------------------------ prefill
    def compress_layer(self, idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
        """Score the layer's slots with the prompt queries q (B, Hq, T, D) and keep the best."""
        t0 = time.perf_counter()
        self.bytes_before += layer.nbytes()
        _, _, pos = layer.dense()
        n_valid = (pos[:, 0] >= 0).sum(-1)  # (B,)
        n_kept = self.n_kept(n_valid)
        if bool((n_kept >= n_valid).all()) and layer.n_invalid == 0:
            if self.decode_evicts:
                self.policy.prefill_scores(q, q_pos, layer, self._score_fn, self.gqa, n_kept)  # accumulators
                self.observed_queries = self.policy.observed_queries(int(n_valid.min()))
                self.head_budgets[idx] = [self.budget] * layer.n_segments
            self.scoring_s += time.perf_counter() - t0
            return  # nothing to evict: identical to no press
        self.observed_queries = self.policy.observed_queries(int(n_valid.min()))
        raw = None if self.score_memo is None else self.score_memo.get(idx)
        if raw is None:
            raw = self.policy.raw_scores(q, q_pos, layer, self._score_fn, self.gqa)
            if self.score_memo is not None:
                self.score_memo[idx] = raw
        scores = self.policy.protect(raw, pos, q_pos, n_kept)
        if self.allocator == "adakv":
            mask = allocators.adakv(scores, n_kept, self.alpha, self.min_safe)
        else:
            mask = allocators.uniform(scores, n_kept)
        keep = [torch.nonzero(m, as_tuple=True)[0] for row in mask for m in row]
        t1 = time.perf_counter()
        self.scoring_s += t1 - t0
        layer.keep(keep)
        self.compact_s += time.perf_counter() - t1
        if self.decode_evicts:  # uniform: the budget; AdaKV: the head's share, plus a short row's slack
            H, slack = layer.n_kv_heads, (self.budget - n_kept).tolist()
            self.head_budgets[idx] = [L + slack[i // H] for i, L in enumerate(layer.length)]

    def prefill_observer(self, stats: Any = None):  # noqa: ANN201
        """An observer for `Transformer.forward` that compresses each layer right after its attention."""
        self.scoring_s, self.compact_s, self.bytes_before, self.head_budgets = 0.0, 0.0, 0, {}
        self.observed_queries = None

        def observe(idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
            self.compress_layer(idx, q, q_pos, layer)
            if stats is not None:
                stats.scoring_s, stats.compact_s = self.scoring_s, self.compact_s
                stats.observed_queries = self.observed_queries

        return observe

    # ------------------------------------------------------------------ decode
    @property
    def decode_evicts(self) -> bool:
        """Decode-time eviction runs for H2O / TOVA when an absolute budget is given."""
        return self.budget is not None and self.policy.decode_time

    def evict_step(self, idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
        """After a decode step: update scores and evict until each head is within its budget."""
        t0 = time.perf_counter()
        budgets = self.head_budgets.get(idx, [self.budget] * layer.n_segments)
        scores = self.policy.decode_scores(q, q_pos, layer, self._score_fn, self.gqa)
        _, _, pos = layer.dense()
        seen = q_pos[:, -1] + 1
        scores = self.policy.protect_decode(scores, pos, seen, self.budget).flatten(0, 1)
        over = [i for i in range(layer.n_segments) if layer.length[i] > budgets[i]]
        if len(over) == layer.n_segments and all(layer.length[i] == budgets[i] + 1 for i in over):
            for i in over:  # the common case: one token in, one out, O(1) per head
                L = layer.length[i]
                layer.remove_slot(i, int(_argmin_first(scores[i, :L])))
        elif over:
            keep = []
            for i in range(layer.n_segments):
                L = layer.length[i]
                top = torch.sort(scores[i, :L], descending=True, stable=True).indices[: budgets[i]]
                keep.append(top.sort().values)
            layer.keep(keep)
        self.scoring_s += time.perf_counter() - t0

    def decode_observer(self, stats: Any = None):  # noqa: ANN201
        """An observer for decode steps (None when this press does not evict while decoding)."""
        if not self.decode_evicts:
            return None

        def observe(idx: int, q: Tensor, q_pos: Tensor, layer: LayerCache) -> None:
            self.evict_step(idx, q, q_pos, layer)
            if stats is not None:
                stats.scoring_s = self.scoring_s

        return observe


def _is_real(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _show(v: Any) -> str:
    return repr(v) if type(v) in (int, float) or v is None else f"{v!r} ({type(v).__name__})"


def policy_options(policy: str) -> list[str]:
    """The options (dataclass fields) a policy takes, e.g. ["window", "kernel", "pooling"] for snapkv."""
    return [f.name for f in fields(POLICIES[policy]) if f.init and f.repr]


def _argmin_first(s: Tensor) -> Tensor:
    """Index of the lowest score; ties -> the lowest slot index."""
    return torch.nonzero(s == s.min(), as_tuple=True)[0][0]


def press_names() -> list[str]:
    """Every valid press name: policies, with each score, and their AdaKV variants."""
    names = ["full"]
    for pname, cls in POLICIES.items():
        variants = [pname] + ([f"{pname}-{s}" for s in SCORES if s != "attn"] if cls.uses_score else [])
        names += variants + [f"adakv-{v}" for v in variants]
    return names


def parse_press_name(name: str) -> tuple[str, str, str]:
    """`[adakv-]<policy>[-<score>]` -> (allocator, policy, score). Raises PressError listing valid names."""
    rest, allocator = name, "uniform"
    if rest.startswith("adakv-"):
        rest, allocator = rest[len("adakv-") :], "adakv"
    policy, _, score = rest.partition("-")
    if policy not in POLICIES or (score and (score not in SCORES or not POLICIES[policy].uses_score)):
        raise PressError(f"unknown press {name!r}; valid presses: {', '.join(press_names())}")
    return allocator, policy, score or "attn"


def make_press(
    name: str,
    *,
    compression_ratio: float | None = None,
    budget: int | None = None,
    gqa: str = "sum",
    alpha: float = 0.2,
    **policy_options: Any,
) -> Press | None:
    """Build a press from its name; "full" (or "none") means no press and returns None.

    Args:
        policy_options: fields of the policy dataclass, e.g. window=32 for snapkv, normalize="visible"
            for h2o, per_head=True for tova.
    Raises:
        PressError: an unknown name or option (listing the valid ones), or a bad value (naming the
            option and the expected type or range).
    """
    if not isinstance(name, str):
        raise PressError(f"press name must be a string, got {_show(name)}")
    if name in ("full", "none"):
        if policy_options:
            raise PressError(f"press {name} takes no options, got {', '.join(policy_options)}")
        return None
    allocator, policy, score = parse_press_name(name)
    known = {f.name for f in fields(POLICIES[policy]) if f.init}
    unknown = [k for k in policy_options if k not in known]
    if unknown:
        has = policy_options_text(policy)
        raise PressError(f"unknown option {', '.join(unknown)} for {policy}; {has}")
    pol = POLICIES[policy](**policy_options)  # each option is checked by the policy (PressError)
    return Press(pol, score, allocator, compression_ratio, budget, alpha=alpha, gqa=gqa)


def policy_options_text(policy: str) -> str:
    opts = policy_options(policy)
    return f"its options are: {', '.join(opts)}" if opts else f"{policy} takes no options"


def describe_presses() -> list[tuple[str, str]]:
    """(name, one-line description) for `obinfer presses`."""
    out = [("full", "no compression: the plain full cache")]
    for name in press_names()[1:]:
        allocator, policy, score = parse_press_name(name)
        doc = (POLICIES[policy].__doc__ or "").strip().splitlines()[0]
        how = f"{doc} Score: {score}." if POLICIES[policy].uses_score else doc
        if allocator == "adakv":
            how += " AdaKV head-wise budgets (alpha 0.2)."
        out.append((name, how))
    return out


__all__ = [
    "INF",
    "Press",
    "PressError",
    "make_press",
    "parse_press_name",
    "policy_options",
    "press_names",
    "describe_presses",
]
