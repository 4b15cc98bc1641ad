"""Budget allocators: turn per-slot scores into the slots each KV head keeps (docs/scores.md sections 1, 3).

Input scores are (B, Hkv, n) float tensors, higher = keep, with ``+inf`` for protected slots (always
kept) and ``-inf`` for invalid slots (never kept). Output is a (B, Hkv, n) bool keep-mask. Batch rows
are independent.

Ties are broken deterministically by a stable descending sort: the lower slot index wins (and, across
heads in :func:`adakv`, the lower slot index first, then the lower head). Protected slots outrank every
finite score; if a head has more protected slots than its budget, it keeps only ``n_kept`` of them, the
lowest slot indices (policies that want the most recent ones must give them graded scores). kvpress
scores its protected window ``max + 1`` and takes an unordered top-k, so which protected slots survive
in that case is unspecified there.

The user-facing settings (``compression_ratio``, ``alpha``, ``min_safe``) are checked here too and raise
``PressError`` (a ``ValueError``); malformed score or budget tensors raise a plain ``ValueError``.

Allocators are registered by name (:data:`ALLOCATORS`) with :func:`register_allocator`: a function
``(scores, n_kept) -> mask`` with no options (:func:`uniform`), or an :class:`Allocator` subclass whose
dataclass fields are its options, checked when it is made (:class:`AdaKV`: ``alpha``, ``min_safe``).
``uniform`` is the default (press names without a prefix); any other registered name ``a`` makes
``a-<policy>[-<score>]`` press names (``adakv-snapkv-obk``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from obinfer.cache.policies import POLICIES, PressError, check_name, is_int

NEG_INF = float("-inf")


def _fraction(name: str, v: object) -> float:
    """v as a float in [0, 1], or PressError naming it."""
    if not isinstance(v, Real) or isinstance(v, bool) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
        raise PressError(f"{name} must be a number in [0, 1], got {v!r}")
    return float(v)


def n_kept_for(n_valid: Tensor | int, compression_ratio: float) -> Tensor | int:
    """Tokens a head of ``n_valid`` tokens keeps at compression ratio ``cr`` (fraction removed).

    ``int(n * (1 - cr))`` with Python's float truncation (kvpress: ``int(100 * (1 - 0.9)) == 9``), and at
    least 1 when n >= 1 (kvpress's ``max(1, ...)``); 0 when n == 0.

    Args:
        n_valid: int or long tensor of any shape (e.g. (B,) valid tokens per row).
        compression_ratio: in [0, 1].

    Returns:
        int, or long tensor of the same shape.
    """
    _fraction("compression_ratio", compression_ratio)
    keep = 1.0 - compression_ratio
    if isinstance(n_valid, int):
        return max(1, int(n_valid * keep)) if n_valid >= 1 else 0
    n = n_valid.long()
    kept = torch.floor(n.double() * keep).long()  # same IEEE float64 product as Python, then truncate
    return torch.where(n >= 1, kept.clamp_min(1), torch.zeros_like(n))


def _check(scores: Tensor) -> None:
    if scores.dim() != 3:
        raise ValueError(f"scores must be (B, Hkv, n), got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")


def _budget(n_kept: Tensor | int, B: int, device: torch.device) -> Tensor:
    """n_kept as a long tensor of shape (B, 1) or (B, Hkv) broadcastable against (B, Hkv)."""
    t = torch.as_tensor(n_kept, dtype=torch.long, device=device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != B:
        raise ValueError(f"n_kept must be an int, (B,) or (B, Hkv) with B={B}; got shape {tuple(t.shape)}")
    if (t < 0).any():
        raise ValueError("n_kept must be >= 0")
    return t


def _top_mask(scores: Tensor, budget: Tensor) -> Tensor:
    """Keep the top ``budget`` entries along the last dim (never -inf); stable, lower index wins.

    Args:
        scores: (..., m) float.
        budget: long, broadcastable to scores.shape[:-1].

    Returns:
        (..., m) bool mask.
    """
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    rank = torch.arange(scores.shape[-1], device=scores.device)
    keep_sorted = (rank < budget[..., None]) & (vals > NEG_INF)
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


# ------------------------------------------------------------------------------------------ registry
class Allocator:
    """Base of registered allocators: `allocator(scores, n_kept) -> keep-mask`, options as fields.

    scores: (B, Hkv, n) float, +inf protected, -inf invalid; n_kept: (B,) long, the per-head budget of
    each row. Returns a (B, Hkv, n) bool keep-mask. `name` is set by `register_allocator`.
    """

    name = "allocator"

    def __call__(self, scores: Tensor, n_kept: Tensor) -> Tensor:
        raise NotImplementedError


ALLOCATORS: dict[str, type[Allocator]] = {}
DEFAULT_ALLOCATOR = "uniform"  # written without a prefix in press names


def register_allocator(name: str) -> Callable[[Any], Any]:
    """Decorator registering an allocator under `name`: an `Allocator` subclass (made a frozen dataclass
    if it is not one; its fields are the options) or a plain function (scores, n_kept) -> mask (no
    options). Returns what it decorates."""
    check_name("allocator", name)
    if name in ALLOCATORS:
        raise ValueError(f"allocator {name!r} is already registered")
    if name in POLICIES:
        raise ValueError(f"allocator {name!r} would shadow the policy of that name")
    for mod, attr, kind in (
        ("obinfer.cache.layer_budgets", "LAYER_BUDGETS", "layer budget"),
        ("obinfer.cache.lookahead", "QUERY_SOURCES", "query source"),
    ):
        if name in getattr(sys.modules.get(mod), attr, {}):
            raise ValueError(f"allocator {name!r} would shadow the {kind} of that name")

    def deco(obj: Any) -> Any:
        if isinstance(obj, type):
            if not issubclass(obj, Allocator):
                raise TypeError(f"register_allocator takes an Allocator subclass or a function, got {obj!r}")
            cls = obj if "__dataclass_fields__" in obj.__dict__ else dataclass(frozen=True)(obj)
        elif callable(obj):
            cls = _function_allocator(obj)
        else:
            raise TypeError(f"register_allocator takes an Allocator subclass or a function, got {obj!r}")
        cls.name = name
        ALLOCATORS[name] = cls
        return cls if isinstance(obj, type) else obj

    return deco


def _function_allocator(fn: Callable[[Tensor, Tensor], Tensor]) -> type[Allocator]:
    """An option-less Allocator class calling fn (its docstring too)."""

    def call(self: Allocator, scores: Tensor, n_kept: Tensor) -> Tensor:
        return fn(scores, n_kept)

    cls = type(
        fn.__name__,
        (Allocator,),
        {"__call__": call, "__doc__": fn.__doc__ or f"{fn.__name__} allocator.", "__module__": fn.__module__},
    )
    return dataclass(frozen=True)(cls)


def allocator_options(name: str) -> list[str]:
    """The options (dataclass fields) a registered allocator takes, e.g. ["alpha", "min_safe"] for adakv."""
    return [f.name for f in fields(ALLOCATORS[name]) if f.init]


def make_allocator(name: str, **options: Any) -> Allocator:
    """The registered allocator `name` with its options (PressError for an unknown name or option)."""
    if name not in ALLOCATORS:
        raise PressError(f"unknown allocator {name!r} (choose from {', '.join(ALLOCATORS)})")
    unknown = [k for k in options if k not in allocator_options(name)]
    if unknown:
        has = allocator_options(name)
        opts = f"its options are: {', '.join(has)}" if has else f"{name} takes no options"
        raise PressError(f"unknown option {', '.join(unknown)} for allocator {name}; {opts}")
    return ALLOCATORS[name](**options)


# ---------------------------------------------------------------------------------------- allocators
@register_allocator("uniform")
def uniform(scores: Tensor, n_kept: Tensor | int) -> Tensor:
    """Every KV head keeps its own top ``n_kept`` slots (fewer if it has fewer valid slots).

    Args:
        scores: (B, Hkv, n) float, +inf protected, -inf invalid.
        n_kept: int, (B,) long per row, or (B, Hkv) long per head.

    Returns:
        (B, Hkv, n) bool keep-mask.
    """
    _check(scores)
    return _top_mask(scores, _budget(n_kept, scores.shape[0], scores.device))


def adakv(scores: Tensor, n_kept: Tensor | int, alpha: float = 0.2, min_safe: int = 0) -> Tensor:
    """AdaKV allocation (scores.md section 3): heads of a layer share one budget of Hkv * n_kept.

    1. each head keeps its top ``n_safe = max(min_safe, int(n_kept * alpha))`` slots unconditionally
       (protected +inf slots are among them when present);
    2. over the whole row (all Hkv heads) the global top ``Hkv * n_kept`` slots are kept, safeguarded
       ones first. Heads end up with different lengths.

    ``min_safe=0`` follows the spec; ``min_safe=1`` matches kvpress (``max(1, int(alpha * n_kept))``).

    Args:
        scores: (B, Hkv, n) float, +inf protected, -inf invalid.
        n_kept: int or (B,) long: the per-head budget of each row.
        alpha: safeguard fraction in [0, 1].
        min_safe: lower bound on n_safe.

    Returns:
        (B, Hkv, n) bool keep-mask; each row keeps min(Hkv * n_kept, valid slots) slots.
    """
    _check(scores)
    _check_adakv_options(alpha, min_safe)
    B, Hkv, n = scores.shape
    budget = _budget(n_kept, B, scores.device)
    if budget.shape[1] != 1:
        raise ValueError("adakv takes one budget per row: n_kept must be an int or (B,)")
    n_safe = torch.floor(budget.double() * alpha).long().clamp_min(min_safe)
    safe = _top_mask(scores, n_safe)
    boosted = scores.masked_fill(safe, float("inf"))
    flat = boosted.transpose(1, 2).reshape(B, n * Hkv)  # slot-major: ties -> lower slot, then lower head
    keep = _top_mask(flat, budget[:, 0] * Hkv)
    return keep.reshape(B, n, Hkv).transpose(1, 2)


def _check_adakv_options(alpha: object, min_safe: object) -> None:
    _fraction("alpha", alpha)
    if not is_int(min_safe) or min_safe < 0:
        raise PressError(f"min_safe must be an integer >= 0, got {min_safe!r}")


@register_allocator("adakv")
class AdaKV(Allocator):
    """AdaKV head-wise budgets (alpha 0.2).

    Options: `alpha` (safeguard fraction in [0, 1]), `min_safe` (lower bound on each head's
    safeguarded slots; 1 matches kvpress). See :func:`adakv`.
    """

    alpha: float = 0.2
    min_safe: int = 0

    def __post_init__(self) -> None:
        _check_adakv_options(self.alpha, self.min_safe)

    def __call__(self, scores: Tensor, n_kept: Tensor) -> Tensor:
        return adakv(scores, n_kept, self.alpha, self.min_safe)


def keep_indices(mask: Tensor) -> list[list[Tensor]]:
    """Sorted kept slot indices per (row, head).

    Args:
        mask: (B, Hkv, n) bool keep-mask.

    Returns:
        ``out[b][h]``: 1-D long tensor of the kept slots of head h in row b, ascending.
    """
    return [[torch.nonzero(m, as_tuple=True)[0] for m in row] for row in mask]
