"""Observation-query sources: which queries score the cache (docs/scores.md section 3).

A window-based policy (SnapKV, TOVA: `Policy.lookahead`) scores the cache with some observation
queries. By default (`prompt`, no prefix in press names) they are the prompt's own last queries. A
query source replaces them, for any score and allocator, with no per-score code:

`laq` (Lookahead Q-Cache, arXiv 2505.20334): after the prefill, a *copy* of the cache is compressed
with the base press (the same press without the `laq-` prefix), k pseudo tokens are decoded greedily on
that copy from the prefill's logits (k = `lookahead`, default 8), and each layer's post-RoPE queries of
those k steps are recorded. The **full** prompt cache is then scored with them as the observation
window (`Policy.score_lookahead`: the policy's protection, e.g. SnapKV's last `window` prompt tokens,
is kept) and compressed to the budget; the copy and the pseudo tokens are dropped, so the cache and
its position counter are those of the prompt alone and decoding starts from the prefill's logits.
`laqpp` (LAQ++) also lets the last `tail` = 8 prompt queries observe. `lookahead=0` is the base press.

Cost: the prefill keeps the full cache until the end (no per-layer compression during the forward),
plus the compressed copy: peak K/V = full cache + compressed copy; k extra decoding steps on the copy.

A source is a class registered with `register_query_source` (a frozen dataclass; its fields are
options); `<source>-<press>` becomes a press name for every window-based policy.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from obinfer.cache.policies import POLICIES, PressError, check_int, check_name

DEFAULT_SOURCE = "prompt"  # written without a prefix in press names


class QuerySource:
    """Base of registered query sources (options as dataclass fields). `name` is set on registration."""

    name = "source"

    @property
    def is_prompt(self) -> bool:
        """True for the default: the policy observes its own prompt queries."""
        return False

    @property
    def tail_queries(self) -> int:
        """Last prompt queries that observe along with the source's own (LAQ++)."""
        return 0

    @property
    def steps(self) -> int:
        """Pseudo tokens decoded on the compressed copy (0: the base press)."""
        return 0

    def queries(self, model: Any, copy: Any, logits: Tensor) -> tuple[dict[int, Tensor], Tensor]:
        """Observation queries from a compressed copy of the prefilled cache.

        Args:
            model: the `Transformer`; copy: the compressed `KVCache` copy (it is modified);
            logits: (B, V) the prefill's last logits.
        Returns:
            layer -> (B, Hq, k, D) post-RoPE queries, and their positions (B, k).
        """
        raise NotImplementedError


QUERY_SOURCES: dict[str, type[QuerySource]] = {}


def register_query_source(name: str) -> Callable[[type[QuerySource]], type[QuerySource]]:
    """Class decorator registering a `QuerySource` subclass under `name` (made a frozen dataclass)."""
    check_name("query source", name)
    if name in QUERY_SOURCES:
        raise ValueError(f"query source {name!r} is already registered")
    taken = dict.fromkeys(POLICIES, "policy")
    for mod, attr, kind in (
        ("obinfer.cache.allocators", "ALLOCATORS", "allocator"),
        ("obinfer.cache.layer_budgets", "LAYER_BUDGETS", "layer budget"),
    ):
        taken.update(dict.fromkeys(getattr(sys.modules.get(mod), attr, {}), kind))
    if name in taken:
        raise ValueError(f"query source {name!r} would shadow the {taken[name]} of that name")

    def deco(cls: type[QuerySource]) -> type[QuerySource]:
        if not (isinstance(cls, type) and issubclass(cls, QuerySource)):
            raise TypeError(f"register_query_source takes a QuerySource subclass, got {cls!r}")
        if "__dataclass_fields__" not in cls.__dict__:
            cls = dataclass(frozen=True)(cls)
        cls.name = name
        QUERY_SOURCES[name] = cls
        return cls

    return deco


def query_source_options(name: str) -> list[str]:
    return [f.name for f in fields(QUERY_SOURCES[name]) if f.init]


def make_query_source(name: str, **options: Any) -> QuerySource:
    """The registered source `name` with its options (PressError for an unknown name or option)."""
    if name not in QUERY_SOURCES:
        raise PressError(f"unknown query source {name!r} (choose from {', '.join(QUERY_SOURCES)})")
    unknown = [k for k in options if k not in query_source_options(name)]
    if unknown:
        has = query_source_options(name)
        opts = f"its options are: {', '.join(has)}" if has else f"{name} takes no options"
        raise PressError(f"unknown option {', '.join(unknown)} for query source {name}; {opts}")
    return QUERY_SOURCES[name](**options)


@register_query_source("prompt")
class Prompt(QuerySource):
    """The prompt's own queries (the policy's window)."""

    @property
    def is_prompt(self) -> bool:
        return True


@register_query_source("laq")
class Lookahead(QuerySource):
    """LAQ: k = 8 pseudo tokens decoded on a compressed copy observe instead of the prompt's window.

    Options: `lookahead` (k, >= 0; 0 = the base press), `tail` (last prompt queries observing too, >= 0).
    """

    lookahead: int = 8
    tail: int = 0

    def __post_init__(self) -> None:
        check_int(self.name, "lookahead", self.lookahead, 0)
        check_int(self.name, "tail", self.tail, 0)

    @property
    def tail_queries(self) -> int:
        return self.tail

    @property
    def steps(self) -> int:
        return self.lookahead

    @torch.inference_mode()
    def queries(self, model: Any, copy: Any, logits: Tensor) -> tuple[dict[int, Tensor], Tensor]:
        got: dict[int, list[Tensor]] = {}
        pos: list[Tensor] = []

        def record(idx: int, q: Tensor, q_pos: Tensor, layer: Any) -> None:
            got.setdefault(idx, []).append(q)
            if idx == 0:
                pos.append(q_pos)

        tok = logits.argmax(-1)
        for _ in range(self.lookahead):  # greedy, on the compressed copy
            tok = model(tok[:, None], copy, observer=record, last_only=True)[:, -1].argmax(-1)
        return {i: torch.cat(qs, dim=2) for i, qs in got.items()}, torch.cat(pos, dim=1)


@register_query_source("laqpp")
class LookaheadPlus(Lookahead):
    """LAQ++: the k = 8 lookahead queries and the last 8 prompt queries observe together."""

    tail: int = 8


__all__ = [
    "DEFAULT_SOURCE",
    "QUERY_SOURCES",
    "Lookahead",
    "LookaheadPlus",
    "Prompt",
    "QuerySource",
    "make_query_source",
    "query_source_options",
    "register_query_source",
]
